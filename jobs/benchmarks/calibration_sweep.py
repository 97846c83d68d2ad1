"""Calibration-sweep benchmark (issue 15): a small version of `jobs/sweeps/biomed.yaml` on this
machine; prints ONE JSON line.

    .venv/bin/python jobs/benchmarks/calibration_sweep.py [--workdir /tmp/raycompress-calsweep]
        [--seeds 0 1 2] [--n-samples 16] [--seq-len 256] [--candidate-pool 256] [--max-tokens 4096] [--skip-serial]
        [--smoke]

Needs the default model converted once (`make model`). The base job is the default one
(`jobs/smollm2-biomed-sparsegpt50.yaml`: SmolLM2-135M-Instruct, ZipCal, SparseGPT 50%) made
small: `--n-samples` x `--seq-len` calibration tokens, ZipCal drawing `--candidate-pool` random
candidate windows per greedy step (below the pool's window count, so that the seed changes the
selection: with the default 2000 every window is a candidate here and all seeds select the same
rows), evaluated on WikiText-2 and the biomedical
abstracts (`--max-tokens` each), one actor per stage with one CPU. Points: pure biomedical, pure
general (State of the Union), mixes 3:1 and 1:1, and MixCal on the 1:1 mix at lambda 0 and 0.25,
each over `--seeds`. The sweep is run twice with `raycompress sweep`, as a user types it, into
fresh folders: 2 points at once, then 1 at a time (skipped with --skip-serial), and the two
sweeps' numbers are compared.

JSON keys: seeds, points, runs; seed_sd_domain_ppl and seed_sd_general_ppl (relative sd over seeds,
mean over points); best_mix (the mix point with the highest mean of domain and general retention),
domain_ratio = best mix domain ppl / pure-domain domain ppl, general_ratio = best mix general ppl /
pure-general general ppl, mixcal_general_gain = general ppl at lambda 0 / at the best lambda > 0
(same 1:1 mix); per point mean and sd of both perplexities; wall_s_parallel2, wall_s_parallel1,
parallel_speedup, and identical_across_parallelism (every point's metrics equal in both sweeps).
The work folder is --workdir, else a new temporary folder. The base job is read with the
project's loader (its paths resolve against its own folder). --smoke: the smoke job's random tiny
Llama, points biomed and mix1-1 only, seed 0, 4 x 32 calibration tokens, 256 tokens per
task, one sweep (the test suite runs it); figures that need the missing points are null.
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
sys.path.insert(0, str(REPO / "jobs" / "benchmarks"))
from _common import absolute_paths, emit, job_mapping, smoke_job, work_folder, write_job  # noqa: E402

BASE = REPO / "jobs" / "smollm2-biomed-sparsegpt50.yaml"
MIX11 = {"biomed": 0.5, "general": 0.5}
CALIBRATION = {
    "biomed": {"select.mix": {"biomed": 1.0}},
    "sotu": {"select.mix": {"general": 1.0}},
    "mix3-1": {"select.mix": {"biomed": 0.75, "general": 0.25}},
    "mix1-1": {"select.mix": MIX11},
    "mixcal0": {"select.mix": MIX11, "compress.mixcal": {"general_sources": ["general"], "lam": 0.0}},
    "mixcal0.25": {"select.mix": MIX11, "compress.mixcal": {"general_sources": ["general"], "lam": 0.25}},
}
MIXES = ("mix3-1", "mix1-1", "mixcal0", "mixcal0.25")
LAMBDAS = ("mixcal0.25",)
SMOKE_POINTS = ("biomed", "mix1-1")


def write_files(work: Path, args) -> dict[int, Path]:
    """The small base job and one sweep file per parallelism; returns {parallel: sweep file}."""
    job = absolute_paths(job_mapping(BASE))  # a sweep resolves its base job's paths against the sweep's folder
    if args.smoke:
        job["model"] = absolute_paths(smoke_job())["model"]
    job["select"].update(n_samples=args.n_samples, seq_len=args.seq_len, candidate_pool=args.candidate_pool)
    job["evaluate"] = {"task_dirs": [str(REPO / "jobs" / "tasks")],
                       "tasks": [{"name": "wikitext2", "max_tokens": args.max_tokens},
                                 {"name": "biomed_abstracts", "max_tokens": args.max_tokens}]}
    job["ray"] = {"num_cpus": 2, "compress_actors": 1, "eval_actors": 1, "select_actors": 1, "cpus_per_actor": 1}
    write_job(work / "base.yaml", job)
    points = {k: v for k, v in CALIBRATION.items() if not args.smoke or k in SMOKE_POINTS}
    out = {}
    for parallel in (2, 1):
        sweep = {"base": "base.yaml", "name": "calsweep", "seeds": args.seeds, "parallel": parallel,
                 "domain": "biomed", "axes": {"calibration": points}}
        out[parallel] = write_job(work / f"sweep-p{parallel}.yaml", sweep)
    return out


def run_sweep(sweep_file: Path, out: Path) -> float:
    """`raycompress sweep` as a subprocess; returns wall seconds; exits on failure with its output."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "raycompress", "sweep", str(sweep_file), "--output", str(out)],
                          cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ))
    if proc.returncode:
        sys.exit(f"raycompress sweep {sweep_file} failed ({proc.returncode}):\n{proc.stdout[-4000:]}")
    return time.perf_counter() - t0


def summarize(report: dict) -> dict:
    """The benchmark's figures from a sweep.json."""
    pts = report["points"]
    mean = lambda label, fig: pts[label][fig]["mean"]  # noqa: E731
    score = {m: (pts[m]["retention"]["biomed"]["mean"] + pts[m]["retention"]["general"]["mean"]) / 2
             for m in MIXES if m in pts}
    best = max(score, key=score.get)
    lams = [m for m in LAMBDAS if m in pts]
    best_lam = min(lams, key=lambda m: mean(m, "general_ppl")) if lams else None
    return {
        "seeds": report["seeds"], "points": len(pts), "runs": report["runs"],
        "seed_sd_domain_ppl": report["seed_noise"]["domain_ppl"],
        "seed_sd_general_ppl": report["seed_noise"]["general_ppl"],
        "best_mix": best, "domain_ratio": mean(best, "domain_ppl") / mean("biomed", "domain_ppl"),
        "general_ratio": mean(best, "general_ppl") / mean("sotu", "general_ppl") if "sotu" in pts else None,
        "best_lambda_point": best_lam,
        "mixcal_general_gain": (mean("mixcal0", "general_ppl") / mean(best_lam, "general_ppl")
                                if best_lam and "mixcal0" in pts else None),
        "per_point": {k: {f: [round(p[f]["mean"], 3), round(p[f]["sd"] or 0.0, 3)] for f in ("domain_ppl", "general_ppl")}
                      for k, p in pts.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None, help="work folder (default: a new temporary folder)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--candidate-pool", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--skip-serial", action="store_true", help="run only the 2-at-once sweep")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, 3 points, 1 seed (the test suite runs it)")
    args = ap.parse_args()
    if args.smoke:
        args.seeds, args.n_samples, args.seq_len, args.max_tokens, args.skip_serial = [0], 4, 32, 256, True
    if args.workdir is not None:
        shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir = work_folder(args.workdir, "calsweep")
    files = write_files(args.workdir, args)
    wall2 = run_sweep(files[2], args.workdir / "p2")
    rep2 = json.loads((args.workdir / "p2" / "sweep.json").read_text())
    out = {**summarize(rep2), "wall_s_parallel2": round(wall2, 1), "points_at_once": rep2["points_at_once"]}
    if not args.skip_serial:
        wall1 = run_sweep(files[1], args.workdir / "p1")
        rep1 = json.loads((args.workdir / "p1" / "sweep.json").read_text())
        same = all(rep1["points"][k]["tasks"] == rep2["points"][k]["tasks"] for k in rep2["points"])
        out.update(wall_s_parallel1=round(wall1, 1), parallel_speedup=round(wall1 / wall2, 3),
                   identical_across_parallelism=same)
    emit({**out, "smoke": args.smoke})


if __name__ == "__main__":
    main()
