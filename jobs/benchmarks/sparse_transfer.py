"""Sparse-transfer benchmark (issue 14): prune, then recover on domain text; prints ONE JSON line.

    .venv/bin/python jobs/benchmarks/sparse_transfer.py [--workdir /tmp/raycompress-sparse-transfer] [--steps 60]

Needs the default model converted once (`make model`). Two runs of `raycompress run`, as a user
types it, on `jobs/smollm2-biomed-recover.yaml` (SmolLM2-135M-Instruct, SparseGPT 50% on
biomedical calibration, then `train` on the biomedical pool with the mask fixed; evaluated on
WikiText-2 and the biomedical abstracts, 16384 tokens each):

1. one-shot + recovery: select -> compress -> train (init: compressed) -> evaluate;
2. GMP: the same folder's select and compress reused, `train` redone from the dense model with
   gradual magnitude pruning 0 -> 50% (cubic schedule, Zhu & Gupta 2017) inside the same budget.

Sparsities are measured here from the checkpoints' safetensors (exact zeros of the decoder-layer
linears' weights). JSON keys: sparsity_before, sparsity_after, domain_ppl_{dense,pruned,recovered},
general_ppl_{dense,pruned,recovered}, domain_recovered_fraction = (pruned - recovered) / (pruned -
dense) on domain perplexity, general_recovered_fraction (the same on WikiText-2), steps, tokens,
seconds (the train stage), wall_seconds, and `gmp` with the same keys for run 2 ("pruned" there is
still the one-shot checkpoint, for comparison).
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

import yaml

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "jobs" / "smollm2-biomed-recover.yaml"
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


def gmp_job(job: dict, steps: int) -> dict:
    """The same job, `train` from the dense model with GMP 0 -> the one-shot sparsity, ending at 5/6 of the budget."""
    n = 10
    interval = max(1, (steps * 5 // 6) // n)
    gmp = {"initial_sparsity": 0.0, "final_sparsity": job["compress"]["sparsity"], "start_step": 0,
           "n_prunes": n, "interval": interval, "scope": "layer"}
    return {**job, "train": {**job["train"], "init": "dense", "gmp": gmp}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/raycompress-sparse-transfer"))
    ap.add_argument("--steps", type=int, default=None, help="override train.steps (default: the job file's)")
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    job = yaml.safe_load(JOB.read_text())
    job["base_dir"] = str(JOB.parent)
    if args.steps:
        job["train"]["steps"] = args.steps
    t0 = time.perf_counter()
    oneshot, gmp = args.workdir / "oneshot", args.workdir / "gmp"
    (args.workdir / "oneshot.yaml").write_text(yaml.safe_dump(job))
    run_cli(["run", args.workdir / "oneshot.yaml", "--output", oneshot])
    shutil.copytree(oneshot, gmp, ignore=shutil.ignore_patterns("train"))
    (args.workdir / "gmp.yaml").write_text(yaml.safe_dump(gmp_job(job, job["train"]["steps"])))
    run_cli(["run", args.workdir / "gmp.yaml", "--output", gmp, "--force-stage", "train"])
    row = figures(oneshot)
    row["gmp"] = figures(gmp)
    row["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
