"""Sparse-transfer benchmark (issue 14): prune, then recover on domain text; prints ONE JSON line.

    .venv/bin/python jobs/benchmarks/sparse_transfer.py [--workdir DIR] [--steps 60] [--no-gmp] [--smoke]

Needs the default model converted once (`make model`). Two runs of `raycompress run`, as a user
types it, on `jobs/smollm2-biomed-recover.yaml` (SmolLM2-135M-Instruct, SparseGPT 50% on
biomedical calibration, then `train` on the biomedical pool with the mask fixed; evaluated on
WikiText-2 and the biomedical abstracts, 16384 tokens each):

1. one-shot + recovery: select -> compress -> train (init: compressed) -> evaluate;
2. GMP: the same folder's select and compress reused, `train` redone from the dense model with
   gradual magnitude pruning 0 -> 50% (cubic schedule, Zhu & Gupta 2017) inside the same budget;
3. the honest baseline (Sparse*BERT, Kurtic et al. 2022, compare sparse-transferred models with the
   dense model transferred the same way): `train` redone from the dense model, no mask and no GMP,
   on the same data, steps, batch and learning rate.

Sparsities are measured here from the checkpoints' safetensors (exact zeros of the decoder-layer
linears' weights). JSON keys: sparsity_before, sparsity_after, domain_ppl_{dense,pruned,recovered},
general_ppl_{dense,pruned,recovered}, domain_recovered_fraction = (pruned - recovered) / (pruned -
dense) on domain perplexity, general_recovered_fraction (the same on WikiText-2), steps, tokens,
seconds (the train stage), wall_seconds, and `gmp` with the same keys for run 2 ("pruned" there is
still the one-shot checkpoint, for comparison). Against run 3: `dense_trained` (its domain_ppl,
general_ppl, steps, tokens, seconds, final_loss), {domain,general}_ppl_dense_trained, and per run
{domain,general}_recovered_vs_dense_trained = (pruned - recovered) / (pruned - dense_trained), the
share of the gap to the trained dense model that recovery closes (1.0: as good as dense training),
and {domain,general}_ppl_ratio_vs_dense_trained = recovered / dense_trained.
The work folder is --workdir, else a new temporary folder; the job file is read with the
project's loader (its paths resolve against its own folder). --smoke: the smoke job's random tiny
Llama, 4 x 32 calibration tokens, 2 train steps of 1 x 16 tokens on 1 worker, 256 tokens per task;
runs 1 and 3 only (the test suite runs it).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "jobs" / "smollm2-biomed-recover.yaml"
sys.path.insert(0, str(REPO / "jobs" / "benchmarks"))
from _common import emit, job_mapping, skipped, smoke_job, work_folder, write_job  # noqa: E402
DOMAIN, GENERAL = "biomed_abstracts", "wikitext2"


def run_cli(args: list[str]) -> float:
    """`raycompress ARGS` from the repository root; returns seconds; exits on failure with its output."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "raycompress", *map(str, args)], cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ))
    if proc.returncode:
        sys.exit(f"raycompress {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout[-4000:]}")
    return time.perf_counter() - t0


def sparsity(folder: Path) -> float:
    """Exact zeros / elements over the decoder layers' linear weights of a safetensors folder."""
    from safetensors import safe_open

    zeros = total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                if ".layers." in k and k.endswith("proj.weight"):
                    w = st.get_tensor(k)
                    zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    return zeros / total


def _ppl(results: dict, model: str, task: str) -> float:
    """The task's primary perplexity (word perplexity, as lm-evaluation-harness reports it)."""
    t = results[model]["tasks"][task]
    return round(float(t["metrics"][t["primary"]]), 4)


def _fraction(pruned: float, recovered: float, dense: float) -> float | None:
    return None if pruned == dense else round((pruned - recovered) / (pruned - dense), 4)


def figures(out: Path) -> dict:
    """The JSON keys of one run folder."""
    res = json.loads((out / "evaluate" / "results.json").read_text())
    summary = json.loads((out / "train" / "summary.json").read_text())
    start = out / "compress" / "model" if summary["init"] == "compressed" else None
    row = {"sparsity_before": round(sparsity(start) if start else summary["sparsity_start"], 6),
           "sparsity_after": round(sparsity(out / "train" / "model"), 6)}
    for key, task in (("domain", DOMAIN), ("general", GENERAL)):
        d, p, r = (_ppl(res, m, task) for m in ("dense", "compressed", "recovered"))
        row.update({f"{key}_ppl_dense": d, f"{key}_ppl_pruned": p, f"{key}_ppl_recovered": r,
                    f"{key}_recovered_fraction": _fraction(p, r, d)})
    row.update({k: summary[k] for k in ("steps", "tokens", "seconds", "final_loss")})
    return row


def versus_dense_trained(row: dict, trained: dict) -> dict:
    """`row` (one run's figures) with its recovered model compared with the dense model trained on
    the same data and budget (`trained`: the dense-trained run's figures)."""
    out = dict(row)
    for key in ("domain", "general"):
        dt, p, r = trained[f"{key}_ppl_recovered"], row[f"{key}_ppl_pruned"], row[f"{key}_ppl_recovered"]
        out[f"{key}_ppl_dense_trained"] = dt
        out[f"{key}_recovered_vs_dense_trained"] = _fraction(p, r, dt)
        out[f"{key}_ppl_ratio_vs_dense_trained"] = round(r / dt, 4)
    return out


def dense_trained_job(job: dict) -> dict:
    """The same job, `train` from the dense model with nothing held at zero: the baseline."""
    return {**job, "train": {**job["train"], "init": "dense", "gmp": None}}


def smoke(job: dict) -> dict:
    """--smoke: the recover job on the smoke job's tiny Llama, the fewest tokens and steps."""
    tiny = smoke_job()
    job = {**job, "model": tiny["model"], "base_dir": tiny["base_dir"], "ray": tiny["ray"]}
    job["select"] = {**job["select"], "n_samples": 4, "seq_len": 32}
    job["train"] = {**job["train"], "steps": 2, "seq_len": 16, "batch_size": 1, "num_workers": 1, "checkpoint_every": 0}
    job["evaluate"] = {"tasks": [{"name": t, "max_tokens": 256, "max_length": 32} for t in (GENERAL, DOMAIN)]}
    return job


def rerun_train(src: Path, out: Path, job: dict, job_file: Path) -> Path:
    """`src`'s select and compress reused in `out`, `train` (and what follows) redone for `job`."""
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("train", ".lock"))
    run_cli(["run", write_job(job_file, job), "--output", out, "--force-stage", "train"])
    return out


def gmp_job(job: dict, steps: int) -> dict:
    """The same job, `train` from the dense model with GMP 0 -> the one-shot sparsity, ending at 5/6 of the budget."""
    n = 10
    interval = max(1, (steps * 5 // 6) // n)
    gmp = {"initial_sparsity": 0.0, "final_sparsity": job["compress"]["sparsity"], "start_step": 0,
           "n_prunes": n, "interval": interval, "scope": "layer"}
    return {**job, "train": {**job["train"], "init": "dense", "gmp": gmp}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None, help="work folder (default: a new temporary folder)")
    ap.add_argument("--steps", type=int, default=None, help="override train.steps (default: the job file's)")
    ap.add_argument("--no-gmp", action="store_true", help="skip run 2 (GMP from dense)")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, runs 1 and 3 (the test suite runs it)")
    args = ap.parse_args()
    if args.workdir is not None:
        shutil.rmtree(args.workdir, ignore_errors=True)
    work = work_folder(args.workdir, "sparse-transfer")
    job = job_mapping(JOB)  # base_dir: the job file's folder, wherever the copies below are written
    if args.smoke:
        job = smoke(job)
    if args.steps:
        job["train"]["steps"] = args.steps
    t0 = time.perf_counter()
    oneshot = work / "oneshot"
    run_cli(["run", write_job(work / "oneshot.yaml", job), "--output", oneshot])
    trained = rerun_train(oneshot, work / "dense_trained", dense_trained_job(job), work / "dense_trained.yaml")
    base = figures(trained)
    dense_trained = {"domain_ppl": base["domain_ppl_recovered"], "general_ppl": base["general_ppl_recovered"],
                     **{k: base[k] for k in ("steps", "tokens", "seconds", "final_loss")}}
    row = versus_dense_trained(figures(oneshot), base)
    if args.smoke or args.no_gmp:
        row["gmp"] = skipped("--smoke" if args.smoke else "--no-gmp")
    else:
        gmp = rerun_train(oneshot, work / "gmp", gmp_job(job, job["train"]["steps"]), work / "gmp.yaml")
        row["gmp"] = versus_dense_trained(figures(gmp), base)
    row.update(dense_trained=dense_trained, smoke=args.smoke, work=str(work),
               wall_seconds=round(time.perf_counter() - t0, 1))
    emit(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
