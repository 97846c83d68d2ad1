"""Benchmark: our compression vs llm-compressor's `oneshot` on the same model and calibration set.

    .venv/bin/python jobs/benchmarks/peer_llmcompressor.py [--job JOB.yaml] [--algorithms sparsegpt,wanda]
        [--output DIR] [--smoke]

Needs `make peer-env` (llm-compressor in `.venv-peer`). Steps: run our select stage once (the
calibration set both sides use), then for each algorithm run `raycompress compress` and the
peer's `_peer_oneshot.py`, each as its own process tree whose summed RSS is sampled; finally score
both checkpoints' perplexity on the job's perplexity tasks with the same code and windows.
Prints ONE JSON line: per algorithm, ours and peer's perplexities, wall seconds, peak RSS, and
the ratios ours/peer. The work folder is --output, else a new temporary folder; the job file is
read with the project's loader (its paths resolve against its own folder). --smoke: the smoke
job's random tiny Llama, 4 x 32 calibration tokens, SparseGPT only; without `.venv-peer` it prints
{"skipped": ...} naming what is missing.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "jobs" / "benchmarks"))
from _common import claim, emit, job_mapping, offline, skipped, smoke_job, work_folder, write_job  # noqa: E402


def run_measured(cmd: list[str], log: Path) -> tuple[str, float, float]:
    """(stdout, wall seconds, peak summed RSS MiB of the process tree) for one command; stderr -> `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
        return _watch(proc, cmd, log, t0)


def _watch(proc, cmd, log, t0) -> tuple[str, float, float]:
    peak = [0.0]
    stop = threading.Event()

    def sample():
        ps = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                tree = [ps, *ps.children(recursive=True)]
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree if p.is_running()) / 2**20)
            except psutil.Error:
                pass
            stop.wait(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    stop.set()
    th.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}; see {log}")
    return out, time.perf_counter() - t0, peak[0]


def load_dense(model_dir: Path):
    """`model_dir` as a float32 causal LM whose linears all hold a dense `weight`: a
    compressed-tensors checkpoint runs fake-quantized as it is served (`models.load.load_causal_lm`)."""
    import torch

    from raycompress.models.load import load_causal_lm

    return load_causal_lm(model_dir, torch.float32)


def perplexities(job, model_dir: Path) -> dict:
    """Token perplexity of `model_dir` on the job's perplexity tasks (lm-eval's rolling windows per
    document), scored in this process with the same code as the eval pool; a quantized checkpoint
    is scored dequantized (`load_dense`)."""
    from transformers import AutoTokenizer

    from raycompress.evaluation.local import evaluate_in_process
    from raycompress.evaluation.taskfiles import resolve_tasks

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = load_dense(model_dir)
    tasks = [t for t in resolve_tasks(job) if t.kind == "perplexity"]
    records = evaluate_in_process(model, tok, tasks, job.resolve, job.evaluate.batch_tokens)["tasks"]
    return {name: round(r["metrics"]["token_perplexity"], 4) for name, r in records.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", type=Path, default=ROOT / "jobs/smollm2-biomed-sparsegpt50.yaml")
    ap.add_argument("--output", type=Path, default=None, help="work folder (default: a new temporary folder)")
    ap.add_argument("--algorithms", default="sparsegpt,wanda")
    ap.add_argument("--peer-python", type=Path, default=ROOT / ".venv-peer/bin/python")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, SparseGPT only (the test suite runs it)")
    args = ap.parse_args()
    offline()
    from raycompress.config import JobConfig
    from raycompress.models.fetch import resolve_model

    if not args.peer_python.exists():
        if args.smoke:
            emit(skipped(f"{args.peer_python} missing: llm-compressor runs there (make peer-env)", smoke=True))
            return 0
        raise SystemExit(f"{args.peer_python} missing: run `make peer-env` first")
    args.output = work_folder(args.output, "bench-peer")
    job_raw = smoke_job() if args.smoke else job_mapping(args.job)
    args.job = write_job(args.output / "job.yaml", job_raw)
    job = JobConfig.model_validate(job_raw)
    if args.smoke:
        args.algorithms = "sparsegpt"
    model_dir = resolve_model(job.model, job.base_dir, job.storage.cache_dir).local()
    cli = str(Path(sys.executable).parent / "raycompress")
    base = args.output / "select-run"
    run_measured([cli, "select", str(args.job), "--output", str(base)], args.output / "select.log")
    calib = base / "select" / "calibration.parquet"
    result = {"model": job.model, "calibration": {"n": job.select.n_samples, "seq_len": job.select.seq_len}, "algorithms": {}}
    for algo in args.algorithms.split(","):
        raw = {**job_raw, "compress": {**job_raw["compress"], "algorithm": algo}}
        ours_dir = args.output / f"ours-{algo}"
        shutil.rmtree(ours_dir, ignore_errors=True)
        shutil.copytree(base / "select", claim(ours_dir) / "select")
        job_file = write_job(ours_dir / "job.yaml", raw)
        _, ours_wall, ours_rss = run_measured([cli, "compress", str(job_file), "--output", str(ours_dir)],
                                                   args.output / f"ours-{algo}.log")
        stage = json.loads((ours_dir / "state.json").read_text())["stages"]["compress"]
        peer_dir = args.output / f"peer-{algo}"
        out, peer_wall, peer_rss = run_measured([str(args.peer_python), str(ROOT / "jobs/benchmarks/_peer_oneshot.py"),
                                                 "--model", str(model_dir), "--calibration", str(calib), "--algorithm", algo,
                                                 "--sparsity", str(job.compress.sparsity), "--output", str(peer_dir)],
                                                args.output / f"peer-{algo}.log")
        peer = json.loads(out.strip().splitlines()[-1])
        ppl_ours, ppl_peer = perplexities(job, ours_dir / "compress" / "model"), perplexities(job, peer_dir)
        result["algorithms"][algo] = {
            "ours": {"perplexity": ppl_ours, "process_wall_s": round(ours_wall, 1), "stage_wall_s": stage["wall_s"],
                     "peak_rss_mb": round(ours_rss)},
            "peer": {"perplexity": ppl_peer, "process_wall_s": round(peer_wall, 1), "oneshot_wall_s": round(peer["wall_s"], 1),
                     "peak_rss_mb": round(peer_rss)},
            "ppl_ratio": {t: round(ppl_ours[t] / ppl_peer[t], 4) for t in ppl_ours},
            "wall_ratio_process": round(ours_wall / peer_wall, 3),
            "peak_rss_ratio": round(ours_rss / peer_rss, 3),
        }
    result["dense_perplexity"] = perplexities(job, model_dir)
    result["smoke"] = args.smoke
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
