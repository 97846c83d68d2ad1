"""Benchmark of Cus-Prun on SmolLM2: real CPU speed-up of the pruned model; prints ONE JSON line.

    .venv/bin/python jobs/benchmarks/cus_prun.py [--sparsities 0.125,0.25] [--no-eval] [--output DIR] [--smoke]

For each sparsity (fraction of FFN neurons removed per decoder layer) the job
`jobs/smollm2-biomed-cusprun.yaml` (read with the project's loader: its paths resolve against its
own folder) runs select -> compress (-> evaluate) into WORK/s<sparsity>, WORK being --output or a
new temporary folder; then dense and pruned checkpoints are timed in this process with
the same threads (default 2):
- prefill: tokens/s of a forward pass over a (4, 512) batch of token ids;
- decode: tokens/s of greedy generation of 32 new tokens after a 128-token prompt, batch 1, KV cache;
medians of 5 rounds, the models timed in turn within each round.
Reported: parameters, intermediate_size, both throughputs and their pruned/dense ratios, and the
job's evaluation (dense and pruned) when --no-eval is not given.
--smoke: the same job on `jobs/smoke.yaml`'s random tiny Llama (FFN 192, neurons kept in multiples
of 8), 6 x 32 calibration tokens, one sparsity (0.25), no evaluation, one timing round of short inputs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "jobs" / "smollm2-biomed-cusprun.yaml"
sys.path.insert(0, str(ROOT / "jobs" / "benchmarks"))
from _common import claim, emit, job_mapping, smoke_job, work_folder  # noqa: E402


def job_raw(smoke: bool) -> dict:
    """The Cus-Prun job as a mapping (base_dir: the job file's folder); with `smoke`, on the smoke
    job's random tiny Llama with the fewest calibration tokens."""
    raw = job_mapping(JOB)
    if smoke:
        tiny = smoke_job(n_samples=6, seq_len=32)
        raw["model"] = f"random:{(Path(tiny['base_dir']) / tiny['model'].removeprefix('random:')).resolve()}"
        raw["select"].update(n_samples=6, seq_len=32)
        raw["compress"]["cus_prun"]["multiple_of"] = 8
        raw["evaluate"], raw["ray"] = tiny["evaluate"], tiny["ray"]
    return raw


def run_job_variant(raw: dict, sparsity: float, out: Path, evaluate: bool, include_dense: bool,
                    select_from: Path | None) -> Path:
    """select (or a copy of `select_from`'s calibration set) + compress (+ evaluate, report) for one
    sparsity; returns the pruned checkpoint."""
    import shutil

    from raycompress.config import JobConfig
    from raycompress.distributed.orchestrator import Stage, run_job
    from raycompress.models.fetch import resolve_model, set_offline

    set_offline()
    raw = {**raw, "name": f"smollm2-biomed-cusprun{round(sparsity * 1000)}",
           "compress": {**raw["compress"], "sparsity": sparsity},
           "evaluate": {**raw["evaluate"], "include_dense": include_dense}}
    job = JobConfig.model_validate(raw)  # base_dir: the job file's folder (job_raw)
    stages = [Stage.COMPRESS] + ([Stage.EVALUATE, Stage.REPORT] if evaluate else [])
    if select_from is None:
        stages.insert(0, Stage.SELECT)
    elif not (out / "select").is_dir():  # every sparsity prunes with the same calibration set
        shutil.copytree(select_from / "select", claim(out) / "select")
    run_job(job, out, stages, resolve_model(job.model, job.base_dir, job.storage.cache_dir))
    return out / "compress" / "model"


@torch.no_grad()
def throughputs(models: dict[str, Path], threads: int, rounds: int = 5, shape: tuple[int, int, int] = (4, 512, 128),
                new_tokens: int = 32) -> dict[str, dict]:
    """Prefill and decode tokens/s of each checkpoint on this CPU. The models are timed in turn
    within each round (A B A B ...), so that load from other processes hits all of them alike."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    loaded = {k: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for k, p in models.items()}
    vocab = min(m.config.vocab_size for m in loaded.values())
    rows, length, prompt_len = shape  # prefill batch (rows, length); decode prompt (1, prompt_len)
    batch = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(0))
    prompt = batch[:1, :prompt_len]
    prefill: dict[str, list[float]] = {k: [] for k in loaded}
    decode: dict[str, list[float]] = {k: [] for k in loaded}
    for m in loaded.values():  # warm-up
        m(input_ids=batch[:1, :64])
        m.generate(prompt, max_new_tokens=4, do_sample=False)
    for _ in range(rounds):
        for k, m in loaded.items():
            t0 = time.perf_counter()
            m(input_ids=batch)
            prefill[k].append(batch.numel() / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            out = m.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            decode[k].append((out.shape[1] - prompt.shape[1]) / (time.perf_counter() - t0))
    return {k: {"params": sum(p.numel() for p in m.parameters()),
                "intermediate_size": int(m.config.intermediate_size),
                "prefill_tokens_per_s": round(statistics.median(prefill[k]), 1),
                "decode_tokens_per_s": round(statistics.median(decode[k]), 2)} for k, m in loaded.items()}


def primary_metrics(run: Path) -> dict:
    """{model label: {task: primary metric}} from a run's evaluate/results.json."""
    res = json.loads((run / "evaluate" / "results.json").read_text())
    return {label: {t: r["metrics"][r["primary"]] for t, r in m["tasks"].items()} for label, m in res.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsities", default="0.125,0.25")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--output", type=Path, default=None, help="work folder (default: a new temporary folder)")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, one sparsity (the test suite runs it)")
    args = ap.parse_args()
    from raycompress.models.fetch import resolve_model

    work = work_folder(args.output, "bench-cusprun")
    raw = job_raw(args.smoke)
    sparsities = [0.25] if args.smoke else [float(x) for x in args.sparsities.split(",")]
    evaluate = not (args.no_eval or args.smoke)
    dense_dir = resolve_model(raw["model"], raw["base_dir"], (raw.get("storage") or {}).get("cache_dir")).local()
    result: dict = {"model": raw["model"], "threads": args.threads, "work": str(work), "runs": {}}
    pruned = {}
    for n, s in enumerate(sparsities):
        run = work / f"s{s}"
        first = work / f"s{next(iter(pruned))}" if pruned else None
        pruned[s] = run_job_variant(raw, s, run, evaluate, include_dense=(n == 0), select_from=first)
        if evaluate:
            result["runs"][str(s)] = {"quality": primary_metrics(run)}
    import ray

    ray.shutdown()  # time the models without Ray's processes competing for the CPUs
    timing = dict(rounds=1, shape=(1, 32, 16), new_tokens=4) if args.smoke else {}
    timed = throughputs({"dense": dense_dir, **{str(k): v for k, v in pruned.items()}}, args.threads, **timing)
    dense = result["dense"] = timed.pop("dense")
    for s, t in timed.items():
        run = result["runs"].setdefault(s, {})
        run.update(t)
        run["prefill_speedup"] = round(t["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"], 3)
        run["decode_speedup"] = round(t["decode_tokens_per_s"] / dense["decode_tokens_per_s"], 3)
        run["param_ratio"] = round(t["params"] / dense["params"], 4)
    result["smoke"] = args.smoke
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
