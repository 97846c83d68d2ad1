"""Scale benchmark: our compress stage on Llama-3-70B-shaped layers, on the CPUs of this machine; prints ONE JSON line.

    .venv/bin/python jobs/benchmarks/scale.py [--workdir /tmp/raycompress-scale] [--actors 1,2]
        [--algorithms sparsegpt,gptq_w4g128,FP8,W8A8-INT8,NVFP4]
        [--layers 2 --hidden 8192 --ffn 28672 --heads 64 --kv-heads 8 --vocab 4096] [--samples 8 --seq-len 512] [--no-peer] [--smoke]

Builds a synthetic bf16 Llama checkpoint (`_synthetic.py`, reused when its shapes match) and a
random calibration set, then runs `raycompress compress` as a subprocess for SparseGPT 50%,
GPTQ W4 g128 and the quantization schemes FP8 (rtn), W8A8-INT8 (SmoothQuant α 0.5 + GPTQ) and
NVFP4 (rtn), each with 1 and 2 compression actors sharing `--cpus` cores (each actor gets cpus / K
cores and as many torch threads), and reads the pipeline's own measurements from
OUT/compress/compression.json: seconds, bytes moved and FLOPs per layer, peak and analytic RSS
per actor, and per-actor time in stats / solve / propagate / io / reduce.

Derived numbers:
- gemm_gflops: best of 3 fp32 matmuls of `--gemm-size`² (2·n³ FLOPs) with the thread count of a
  1-actor run, measured in this process before the runs.
- achieved_gflops = Σ flops_per_layer / Σ seconds_per_layer (1-actor runs, per algorithm).
- scaling_2_vs_1 = seconds_per_layer(1 actor) / seconds_per_layer(2 actors).
- projected_70b_hours (1-actor run): 80 layers at 128 × 2048 = 262144 calibration tokens,
      per_layer_s = (stats_s + propagate_s) / L × 262144 / calibration_tokens
                    + (solve_s + io_s + reduce_s) / L
      hours       = 80 × per_layer_s / 3600
  where the *_s are the actor's actor_timings_s (summed over the run's L layers): statistics and
  propagation grow with the token count, solve / io / reduce do not.
- peer (when .venv-peer/bin/python exists): llm-compressor `oneshot` SparseGPT 50% on the same
  checkpoint and calibration Parquet (`_peer_oneshot.py`); peer_seconds_per_layer = its oneshot
  wall / layers; peak RSS of its process tree; ratios ours / peer (ours: the 1-actor run).
Aims: rss_ratio ≤ 1.2, bytes_ratio ≤ 1.1 (2 actors), achieved / gemm ≥ 0.5, scaling ≥ 1.7.
A run whose compression.json lacks a key is reported under "errors" naming the key, and the
script exits 1; no value is invented. The work folder is --workdir, else a new temporary folder.
--smoke: one point: a 1-layer Llama of hidden 64, 4 x 16 calibration tokens, SparseGPT with 1 actor,
a 64² GEMM, no peer (the test suite runs it).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "jobs" / "benchmarks"))
from _common import emit, work_folder  # noqa: E402
from _synthetic import (LlamaShape, MissingKey, job_dict, log_tail, require, run_compress,  # noqa: E402
                        write_checkpoint, write_select_dir)

ALGOS = {"sparsegpt": {"algorithm": "sparsegpt", "sparsity": 0.5},
         "gptq_w4g128": {"algorithm": "gptq", "quant": {"bits": 4, "group_size": 128}},
         # compressed-tensors schemes by preset name: per-channel FP8 weights with a static per-tensor
         # FP8 input scale (rtn); SmoothQuant α = 0.5 then GPTQ on int8 weights, dynamic per-token int8
         # inputs; FP4 weights in groups of 16 with FP8 scales and a global scale, static input global scale
         "FP8": {"algorithm": "rtn", "scheme": "FP8"},
         "W8A8-INT8": {"algorithm": "gptq", "scheme": "W8A8-INT8", "smoothquant": {"alpha": 0.5}},
         "NVFP4": {"algorithm": "rtn", "scheme": "NVFP4"}}
KEYS = ("actors", "seconds_per_layer", "bytes_moved_per_layer", "analytic_bytes_per_layer", "peak_rss_gb_per_actor",
        "analytic_rss_gb_per_actor", "flops_per_layer", "actor_timings_s", "calibration_tokens")
TIMING_KEYS = ("stats", "solve", "propagate", "io", "reduce")
TARGET_TOKENS, TARGET_LAYERS = 128 * 2048, 80
SMOKE = {"algorithms": "sparsegpt", "actors": "1", "layers": 1, "hidden": 64, "ffn": 128, "heads": 4, "kv_heads": 2,
         "vocab": 256, "samples": 4, "seq_len": 16, "gemm_size": 64, "peer": False}
AIMS = {"rss_ratio": ("<=", 1.2), "bytes_ratio": ("<=", 1.1), "achieved_over_gemm": (">=", 0.5),
        "scaling_2_vs_1": (">=", 1.7)}


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; --algorithms and --actors become lists."""
    d = LlamaShape()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=None, help="work folder (default: a new temporary folder)")
    p.add_argument("--algorithms", default=",".join(ALGOS), help=f"comma list of {sorted(ALGOS)}")
    p.add_argument("--actors", default="1,2", help="comma list of compression actor counts")
    p.add_argument("--cpus", type=int, default=2, help="cores offered to Ray, split evenly over the actors")
    for flag, default in (("layers", d.layers), ("hidden", d.hidden), ("ffn", d.ffn), ("heads", d.heads),
                          ("kv-heads", d.kv_heads), ("vocab", d.vocab)):
        p.add_argument(f"--{flag}", type=int, default=default)
    p.add_argument("--samples", type=int, default=8,
                   help="calibration sequences (K actors need K whole micro-batches, compress.micro_batch = 4)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gemm-size", type=int, default=4096)
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                   help="also run llm-compressor oneshot SparseGPT 50%% (needs .venv-peer)")
    p.add_argument("--peer-python", type=Path, default=ROOT / ".venv-peer/bin/python")
    p.add_argument("--keep-models", action="store_true", help="keep the compressed checkpoints (large)")
    p.add_argument("--smoke", action="store_true", help="one tiny point (the test suite runs it)")
    a = p.parse_args(argv)
    if a.smoke:
        a.__dict__.update(SMOKE)
    a.algorithms = a.algorithms.split(",")
    a.actors = [int(k) for k in a.actors.split(",")]
    unknown = sorted(set(a.algorithms) - set(ALGOS))
    if unknown:
        p.error(f"--algorithms: unknown {unknown}; choose from {sorted(ALGOS)}")
    if any(k < 1 or a.cpus % k for k in a.actors):
        p.error(f"--actors {a.actors}: each count must be >= 1 and divide --cpus {a.cpus}")
    return a


def _shape(a: argparse.Namespace) -> LlamaShape:
    """The checkpoint shape from the shape flags."""
    return LlamaShape(hidden=a.hidden, heads=a.heads, kv_heads=a.kv_heads, ffn=a.ffn, layers=a.layers, vocab=a.vocab)


def gemm_gflops(threads: int, n: int = 4096, repeats: int = 3) -> float:
    """Best-of-`repeats` GFLOP/s of an fp32 (n, n) @ (n, n) matmul (2·n³ FLOPs) on `threads` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
        torch.mm(a, b)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return 2.0 * n**3 / best / 1e9


def _ray(k: int, cpus: int) -> dict:
    """The job's `ray:` section for k actors sharing `cpus` cores: Ray reserves cpus / k each, and
    every actor may use all `cpus` threads, because in a layer's solve phase one actor (the
    down_proj owner) works while the others wait."""
    return {"compress_actors": k, "num_cpus": cpus, "cpus_per_actor": cpus / k, "torch_threads": cpus}


def _ratio_max(num: list[float], den: list[float], what: str) -> float:
    """max_i num_i / den_i; raises ValueError if a denominator is not positive."""
    if len(num) != len(den) or any(x <= 0 for x in den):
        raise ValueError(f"{what}: cannot form measured / analytic from {num} and {den}")
    return max(n / d for n, d in zip(num, den))


def projected_hours(rec: dict) -> float:
    """80-layer, 262144-token projection from a 1-actor run (formula in the module docstring)."""
    t = rec["actor_timings_s"][0]
    layers = len(rec["seconds_per_layer"])
    grows = (t["stats"] + t["propagate"]) / layers * TARGET_TOKENS / rec["calibration_tokens"]
    fixed = (t["solve"] + t["io"] + t["reduce"]) / layers
    return TARGET_LAYERS * (grows + fixed) / 3600.0


def summarise_run(rec: dict, path: Path) -> dict:
    """Per-run numbers from compression.json (see KEYS). A 1-actor run whose actor_timings_s
    lack a key of TIMING_KEYS gets no projection, and an "error" entry naming the key.

    Raises:
        MissingKey: a key of KEYS is missing; the message names it and `path`.
        ValueError: an analytic RSS or byte count is not positive where a ratio needs it.
    """
    require(rec, KEYS, path)
    spl = rec["seconds_per_layer"]
    out = {"actors": rec["actors"], "seconds_per_layer": statistics.fmean(spl), "seconds_each_layer": spl,
           "peak_rss_gb_per_actor": max(rec["peak_rss_gb_per_actor"]),
           "analytic_rss_gb_per_actor": max(rec["analytic_rss_gb_per_actor"]),
           "rss_ratio": _ratio_max(rec["peak_rss_gb_per_actor"], rec["analytic_rss_gb_per_actor"], f"{path} RSS"),
           "bytes_moved_per_layer": statistics.fmean(rec["bytes_moved_per_layer"]),
           "analytic_bytes_per_layer": statistics.fmean(rec["analytic_bytes_per_layer"]),
           "achieved_gflops": sum(rec["flops_per_layer"]) / sum(spl) / 1e9,
           "calibration_tokens": rec["calibration_tokens"]}
    if rec["actors"] > 1:
        out["bytes_ratio"] = _ratio_max(rec["bytes_moved_per_layer"], rec["analytic_bytes_per_layer"], f"{path} bytes")
    else:
        try:
            for i, t in enumerate(rec["actor_timings_s"]):
                require(t, TIMING_KEYS, Path(f"{path}: actor_timings_s[{i}]"))
            out["projected_70b_hours"] = projected_hours(rec)
        except MissingKey as exc:  # the other numbers stand; the projection is reported missing
            out["error"] = f"projected_70b_hours: {exc}"
    return out


def run_ours(a: argparse.Namespace, model_dir: Path, select_dir: Path) -> tuple[dict, list[str]]:
    """{algorithm: {K: run summary}} and error messages, one compress subprocess per (algorithm, K)."""
    cli = str(ROOT / ".venv" / "bin" / "raycompress")
    runs: dict[str, dict[int, dict]] = {}
    errors: list[str] = []
    for name in a.algorithms:
        for k in a.actors:
            out = a.workdir / "runs" / f"{name}-{k}"
            job = job_dict(model_dir, select_dir, a.samples, a.seq_len, ALGOS[name], _ray(k, a.cpus))
            try:
                rec, wall, rss = run_compress(cli, out, select_dir, job)
                summary = summarise_run(rec, out / "compress" / "compression.json")
            except (RuntimeError, MissingKey, ValueError, OSError) as exc:
                errors.append(f"{name}, {k} actor(s): {exc}")
                continue
            finally:
                if not a.keep_models:
                    shutil.rmtree(out / "compress" / "model", ignore_errors=True)
            if summary["actors"] != k:  # the stage caps actors at ceil(rows / compress.micro_batch)
                errors.append(f"{name}: asked for {k} actors, {out}/compress/compression.json reports "
                              f"{summary['actors']} (the stage gives each actor whole micro-batches of "
                              f"calibration rows: raise --samples); not counted")
                continue
            if "error" in summary:
                errors.append(f"{name}, {k} actor(s): {summary.pop('error')}")
            summary.update(process_wall_s=wall, process_tree_peak_rss_gb=rss * 2**20 / 1e9)
            runs.setdefault(name, {})[k] = summary
    return runs, errors


def run_peer(a: argparse.Namespace, model_dir: Path, select_dir: Path) -> dict:
    """llm-compressor oneshot SparseGPT 50% on the same checkpoint and calibration; errors as text."""
    from peer_llmcompressor import run_measured

    if not a.peer or not a.peer_python.exists():
        return {"skipped": "--no-peer" if not a.peer else f"{a.peer_python} missing (make peer-env)"}
    out, log = a.workdir / "peer-sparsegpt", a.workdir / "peer-sparsegpt.log"
    cmd = [str(a.peer_python), str(ROOT / "jobs/benchmarks/_peer_oneshot.py"), "--model", str(model_dir),
           "--calibration", str(select_dir / "calibration.parquet"), "--algorithm", "sparsegpt",
           "--sparsity", "0.5", "--output", str(out)]
    try:
        text, wall, tree_mib = run_measured(cmd, log)
        peer = json.loads(text.strip().splitlines()[-1])
    except (RuntimeError, ValueError, IndexError, OSError) as exc:
        return {"error": f"{exc}\n{log_tail(log, 20)}", "log": str(log)}
    finally:
        if not a.keep_models:
            shutil.rmtree(out, ignore_errors=True)
    return {"peer_seconds_per_layer": peer["wall_s"] / a.layers, "oneshot_wall_s": peer["wall_s"],
            "process_wall_s": wall, "peer_peak_rss_gb": max(tree_mib, peer["peak_rss_mb"]) * 2**20 / 1e9,
            "log": str(log)}


def _per_algo(runs: dict, key: str, k: int | None = None) -> dict:
    """{algo: {"K": value}} (or {algo: value} for one actor count `k`) over runs that have `key`."""
    if k is not None:
        return {n: r[k][key] for n, r in runs.items() if k in r and key in r[k]}
    return {n: {str(kk): s[key] for kk, s in r.items() if key in s} for n, r in runs.items()}


def _aim(name: str, value: float | None) -> dict:
    """{value, target, pass} for one aim; pass is null when the value was not measured."""
    op, target = AIMS[name]
    ok = None if value is None else (value <= target if op == "<=" else value >= target)
    return {"value": value, "target": f"{op} {target}", "pass": ok}


def aggregate(runs: dict, gemm: float, peer: dict) -> dict:
    """The JSON's measurement section: per-algorithm layouts, worst-case ratios, aims, peer ratios."""
    spl1, spl2 = _per_algo(runs, "seconds_per_layer", 1), _per_algo(runs, "seconds_per_layer", 2)
    achieved = _per_algo(runs, "achieved_gflops", 1)
    over_gemm = {n: g / gemm for n, g in achieved.items()}
    scaling = {n: spl1[n] / spl2[n] for n in spl1 if n in spl2}
    rss = [s["rss_ratio"] for r in runs.values() for s in r.values()]
    byts = list(_per_algo(runs, "bytes_ratio", 2).values())
    res = {"seconds_per_layer": _per_algo(runs, "seconds_per_layer"),
           "peak_rss_gb_per_actor": _per_algo(runs, "peak_rss_gb_per_actor"),
           "analytic_rss_gb_per_actor": _per_algo(runs, "analytic_rss_gb_per_actor"),
           "process_tree_peak_rss_gb": _per_algo(runs, "process_tree_peak_rss_gb"),
           "rss_ratio": max(rss, default=None),
           "bytes_moved_per_layer": _per_algo(runs, "bytes_moved_per_layer", 2),
           "analytic_bytes_per_layer": _per_algo(runs, "analytic_bytes_per_layer", 2),
           "bytes_ratio": max(byts, default=None), "gemm_gflops": gemm, "achieved_gflops": achieved,
           "achieved_over_gemm": over_gemm, "scaling_2_vs_1": scaling,
           "projected_70b_hours": _per_algo(runs, "projected_70b_hours", 1)}
    res["aims"] = {"rss_ratio": _aim("rss_ratio", res["rss_ratio"]),
                   "bytes_ratio": _aim("bytes_ratio", res["bytes_ratio"]),
                   "achieved_over_gemm": _aim("achieved_over_gemm", min(over_gemm.values(), default=None)),
                   "scaling_2_vs_1": _aim("scaling_2_vs_1", min(scaling.values(), default=None))}
    res["peer"] = {**peer, **_peer_ratios(runs, peer)}
    return res


def _peer_ratios(runs: dict, peer: dict) -> dict:
    """ours / peer for SparseGPT: ours is the 1-actor run (seconds per layer; actor and process-tree RSS)."""
    ours = runs.get("sparsegpt", {}).get(1)
    if ours is None or "peer_seconds_per_layer" not in peer:
        return {}
    return {"ours_over_peer": {
        "seconds_per_layer": ours["seconds_per_layer"] / peer["peer_seconds_per_layer"],
        "peak_rss_actor": ours["peak_rss_gb_per_actor"] / peer["peer_peak_rss_gb"],
        "peak_rss_process_tree": ours["process_tree_peak_rss_gb"] / peer["peer_peak_rss_gb"]}}


def _rounded(x):
    """`x` with every float cut to 5 significant digits (for a readable JSON line)."""
    if isinstance(x, float):
        return float(f"{x:.5g}")  # significant digits: keeps 1e-5 and 1.7e10 alike
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    """Build, measure, print one JSON line; exit 1 if any of our runs reported an error."""
    a = _args(argv)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    # each compress run starts its own Ray: never attach to another cluster on this machine
    # (ray.init without an address joins the one named in /tmp/ray/ray_current_cluster)
    os.environ["RAY_ADDRESS"] = "local"
    shape = _shape(a)
    a.workdir = work_folder(a.workdir, "scale")
    t0 = time.perf_counter()
    model_dir = write_checkpoint(a.workdir / "model", shape, seed=a.seed)
    select_dir = write_select_dir(a.workdir / "select", a.samples, a.seq_len, shape.vocab, seed=a.seed)
    build_s = time.perf_counter() - t0
    gemm = gemm_gflops(a.cpus, a.gemm_size)
    runs, errors = run_ours(a, model_dir, select_dir)
    peer = run_peer(a, model_dir, select_dir)
    result = {"shape": asdict(shape), "calibration": {"samples": a.samples, "seq_len": a.seq_len,
                                                      "tokens": a.samples * a.seq_len},
              "torch": torch.__version__, "cores": os.cpu_count(), "ray_cpus": a.cpus,
              "gemm_threads": a.cpus, "build_s": build_s, "workdir": str(a.workdir),
              **aggregate(runs, gemm, peer), "errors": errors,
              "runs": {n: {str(k): s for k, s in r.items()} for n, r in runs.items()}}
    emit(_rounded({**result, "smoke": a.smoke}))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
