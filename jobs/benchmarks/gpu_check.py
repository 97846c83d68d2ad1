"""GPU check: CPU-vs-CUDA agreement of the solvers, and compress speed on 70B-shaped layers; prints ONE JSON line.

    .venv/bin/python jobs/benchmarks/gpu_check.py [--workdir /tmp/raycompress-gpu]
        [--samples 128 --seq-len 2048] [--layers 2 --hidden 8192 --ffn 28672 ...] [--no-speed] [--smoke]

Without a CUDA device it prints {"skipped": "no CUDA device", ...} and exits 0 (`--device cpu`
runs every step on the CPU instead, to test this script itself). The work folder is --workdir,
else a new temporary folder. --smoke: one tiny point (a 1-layer Llama of hidden 64, 4 x 16
calibration tokens, SparseGPT only); the test suite runs it, and without CUDA it reports the skip.

(a) correctness: one random layer, W (d_out 256, d_in 512) and X (2048 tokens, 512), H = XᵀX
    formed once in float64 on the CPU; `sparsegpt_prune(W, H, 0.5)` and
    `gptq_quantize(W, H, 4-bit symmetric, group 128)` (result object or tuple) on the CPU and on the device with the same
    inputs (TF32 off). Reports the largest absolute weight difference, and the share of entries
    that agree: the pruning mask (SparseGPT) or the integer code round(Q / scale + zero) (GPTQ);
    pass = share ≥ 99.9%.
(b) speed: a synthetic 70B-shaped checkpoint (`_synthetic.py`) compressed by
    `raycompress compress` with one actor holding one GPU (`ray: {compress_actors: 1,
    gpus_per_actor: 1}`), SparseGPT 50% and GPTQ W4 g128, 128 × 2048 calibration tokens by
    default. From OUT/compress/compression.json: seconds_per_layer (mean over layers) and
    peak_gpu_gb_per_actor (max over actors; null when the file has no such key: the CUDA peak
    is per process, so only the actor can measure it). Projection to Llama-3-70B on 8 GPU actors
    (layers stay sequential; statistics and propagation split over the 8 data-parallel actors;
    each input group is solved by one actor, so a layer waits for its slowest group):
        per_layer_8 = (stats_s + propagate_s) / L / 8 + max over groups of group_seconds
                      + (io_s + reduce_s) / L
        projected_70b_minutes_8gpu = 80 × per_layer_8 / 60
    with the *_s from actor_timings_s summed over the run's L layers, and group_seconds (factor +
    sweeps of one input group) from the module records. Transfers between GPUs are not in it.
A run that fails, times out, or whose compression.json lacks seconds_per_layer is reported under
"errors" and the script exits 1.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "jobs" / "benchmarks"))
from _common import emit, work_folder  # noqa: E402
from _synthetic import (LlamaShape, MissingKey, job_dict, require, run_compress, write_checkpoint,  # noqa: E402
                        write_select_dir)

ALGOS = {"sparsegpt": {"algorithm": "sparsegpt", "sparsity": 0.5},
         "gptq_w4g128": {"algorithm": "gptq", "quant": {"bits": 4, "group_size": 128}}}
SMOKE = {"algorithms": "sparsegpt", "layers": 1, "hidden": 64, "ffn": 128, "heads": 4, "kv_heads": 2, "vocab": 256,
         "samples": 4, "seq_len": 16, "cpus": min(2, os.cpu_count() or 1)}
AGREE = 0.999  # share of mask entries / integer codes that must match between CPU and device


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; --algorithms becomes a list."""
    d = LlamaShape()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=None, help="work folder (default: a new temporary folder)")
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu to test this script without a GPU")
    p.add_argument("--algorithms", default=",".join(ALGOS), help=f"comma list of {sorted(ALGOS)}")
    for flag, default in (("layers", d.layers), ("hidden", d.hidden), ("ffn", d.ffn), ("heads", d.heads),
                          ("kv-heads", d.kv_heads), ("vocab", d.vocab)):
        p.add_argument(f"--{flag}", type=int, default=default)
    p.add_argument("--samples", type=int, default=128, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per calibration sequence")
    p.add_argument("--cpus", type=int, default=min(8, os.cpu_count() or 1), help="cores (and torch threads) of the actor")
    p.add_argument("--run-timeout", type=float, default=420.0, help="seconds per compress run before it is killed")
    p.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True, help="run part (b)")
    p.add_argument("--keep-models", action="store_true", help="keep the compressed checkpoints (large)")
    p.add_argument("--smoke", action="store_true", help="one tiny point (the test suite runs it)")
    a = p.parse_args(argv)
    if a.smoke:
        a.__dict__.update(SMOKE)
    a.algorithms = a.algorithms.split(",")
    unknown = sorted(set(a.algorithms) - set(ALGOS))
    if unknown:
        p.error(f"--algorithms: unknown {unknown}; choose from {sorted(ALGOS)}")
    return a


def _layer(d_out: int = 256, d_in: int = 512, tokens: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded W (d_out, d_in) ~ N(0, 0.02²) and H = XᵀX (d_in, d_in) float32 from X (tokens, d_in)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(d_out, d_in, generator=gen) * 0.02
    x = torch.randn(tokens, d_in, generator=gen, dtype=torch.float64)
    return w, (x.T @ x).float()


def _sparsegpt(w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, mask) on the CPU from `sparsegpt_prune` on w's device (result object: .weight, .mask)."""
    from raycompress.algorithms.sparsegpt import sparsegpt_prune

    r = sparsegpt_prune(w, h, 0.5)
    return r.weight.float().cpu(), r.mask.cpu()


def _gptq(w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantized weight, integer codes round(Q / scale + zero)) on the CPU, 4-bit symmetric g128.
    Takes either result form of `gptq_quantize`: an object with .weight / .scale / .zero, or the
    tuple (q, scale, zero, damping)."""
    from raycompress.algorithms.gptq import gptq_quantize
    from raycompress.algorithms.quant import QuantSpec

    g = 128
    r = gptq_quantize(w, h, QuantSpec(bits=4, symmetric=True, group_size=g), block_size=128)
    q, scale, zero = (r.weight, r.scale, r.zero) if hasattr(r, "weight") else r[:3]
    q, scale, zero = q.float().cpu(), scale.float().cpu(), zero.float().cpu()
    codes = torch.round(q / scale.repeat_interleave(g, dim=1) + zero.repeat_interleave(g, dim=1))
    return q, codes


def correctness(device: str) -> dict:
    """Part (a): CPU vs `device` for SparseGPT and GPTQ; an exception is reported as text."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    w, h = _layer()
    out = {"shape": {"d_out": w.shape[0], "d_in": w.shape[1], "tokens": 2048}, "agree_threshold": AGREE}
    for name, fn, what in (("sparsegpt", _sparsegpt, "mask"), ("gptq_w4g128", _gptq, "codes")):
        try:
            w_cpu, k_cpu = fn(w.clone(), h.clone())
            w_dev, k_dev = fn(w.to(device), h.to(device))
            if device != "cpu":
                torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - any failure is the check's result
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        share = (k_cpu == k_dev).float().mean().item()
        out[name] = {"max_abs_diff": (w_cpu - w_dev).abs().max().item(), f"{what}_agree": share,
                     "pass": share >= AGREE}
    return out


def _speed_run(a: argparse.Namespace, name: str, model_dir: Path, select_dir: Path) -> dict:
    """One compress run of part (b).

    Raises:
        RuntimeError: the run failed or timed out.
        MissingKey: compression.json has no seconds_per_layer.
    """
    import shutil

    gpus = 1 if a.device != "cpu" else 0
    ray = {"compress_actors": 1, "gpus_per_actor": gpus, "num_cpus": a.cpus, "cpus_per_actor": a.cpus,
           "torch_threads": a.cpus}
    out = a.workdir / "runs" / f"{name}-gpu"
    job = job_dict(model_dir, select_dir, a.samples, a.seq_len, ALGOS[name], ray)
    cli = str(ROOT / ".venv" / "bin" / "raycompress")
    try:
        rec, wall, rss = run_compress(cli, out, select_dir, job, timeout_s=a.run_timeout)
    finally:
        if not a.keep_models:
            shutil.rmtree(out / "compress" / "model", ignore_errors=True)
    require(rec, ("seconds_per_layer",), out / "compress" / "compression.json")
    spl = statistics.fmean(rec["seconds_per_layer"])
    gpu = [g for g in rec.get("peak_gpu_gb_per_actor") or [] if g is not None]
    return {"seconds_per_layer": spl, "seconds_each_layer": rec["seconds_per_layer"],
            "peak_gpu_gb_per_actor": max(gpu) if gpu else None,
            "calibration_tokens": rec.get("calibration_tokens"), "process_wall_s": wall,
            "process_tree_peak_rss_gb": rss * 2**20 / 1e9,
            "projected_70b_minutes_8gpu": 80 * _per_layer_8(rec) / 60}


def _per_layer_8(rec: dict) -> float:
    """Seconds per layer with 8 data-parallel GPU actors (formula in the module docstring)."""
    t, layers = rec["actor_timings_s"][0], len(rec["seconds_per_layer"])
    slowest = max((m.get("group_seconds", m.get("seconds", 0.0)) for m in rec["modules"]), default=0.0)
    return (t["stats"] + t["propagate"]) / layers / 8 + slowest + (t["io"] + t["reduce"]) / layers


def speed(a: argparse.Namespace) -> tuple[dict, list[str]]:
    """Part (b): {algorithm: run numbers} and error messages."""
    shape = LlamaShape(hidden=a.hidden, heads=a.heads, kv_heads=a.kv_heads, ffn=a.ffn, layers=a.layers, vocab=a.vocab)
    a.workdir = work_folder(a.workdir, "gpu")
    model_dir = write_checkpoint(a.workdir / "model", shape)
    select_dir = write_select_dir(a.workdir / "select", a.samples, a.seq_len, shape.vocab)
    res: dict = {"shape": asdict(shape), "calibration": {"samples": a.samples, "seq_len": a.seq_len,
                                                        "tokens": a.samples * a.seq_len}}
    errors = []
    for name in a.algorithms:
        try:
            res[name] = _speed_run(a, name, model_dir, select_dir)
        except (RuntimeError, MissingKey, OSError, ValueError) as exc:
            errors.append(f"{name}: {exc}")
    return res, errors


def _device_info(device: str) -> dict:
    """Name, memory (GB) and CUDA version of GPU 0, or a note for --device cpu."""
    if device == "cpu":
        return {"device": "cpu (--device cpu: a test of this script, not a GPU check)"}
    p = torch.cuda.get_device_properties(0)
    return {"device": p.name, "device_memory_gb": p.total_memory / 1e9, "cuda": torch.version.cuda}


def main(argv: list[str] | None = None) -> int:
    """Skip without CUDA; else parts (a) and (b), one JSON line; exit 1 if a speed run failed."""
    a = _args(argv)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    # each compress run starts its own Ray: never attach to another cluster on this machine
    # (ray.init without an address joins the one named in /tmp/ray/ray_current_cluster)
    os.environ["RAY_ADDRESS"] = "local"
    base = {"torch": torch.__version__, "cores": os.cpu_count()}
    if a.device != "cpu" and not torch.cuda.is_available():
        emit({"skipped": "no CUDA device", "smoke": a.smoke, **base})
        return 0
    result = {**base, **_device_info(a.device), "correctness": correctness(a.device)}
    errors: list[str] = []
    if a.speed:
        result["speed"], errors = speed(a)
    result.update(errors=errors, smoke=a.smoke)
    emit(result)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
