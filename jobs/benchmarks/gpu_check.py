"""GPU check: CPU-vs-CUDA agreement of the solvers, compress speed on 70B-shaped layers, and vLLM
serving of every quantization scheme; prints ONE JSON line.

    .venv/bin/python jobs/benchmarks/gpu_check.py [--workdir /tmp/raycompress-gpu]
        [--samples 128 --seq-len 2048] [--layers 2 --hidden 8192 --ffn 28672 ...] [--no-speed]
        [--no-serving] [--serve-schemes FP8,NVFP4] [--serving-model auto|synthetic|DIR]
        [--vllm-python PYTHON] [--smoke]

Without a CUDA device it prints {"skipped": "no CUDA device", "serving": {...}, ...} and exits 0
(`--device cpu` runs parts (a) and (b) on the CPU instead, to test this script itself; part (c)
then reports its skip). The work folder is --workdir, else a new temporary folder. --smoke: one
tiny point (a 1-layer Llama of hidden 64, 4 x 16 calibration tokens, SparseGPT only; part (c), only
with CUDA and vLLM: FP8_DYNAMIC on a 2-layer synthetic Llama of hidden 256, 8 prompts x 16 + 16
tokens); the test suite runs it, and without CUDA it reports the skip.

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
(c) serving: one model (`--serving-model auto`, the default: SmolLM2-135M-Instruct, the alias
    `smollm2-135m-instruct` resolved into the node cache, when it resolves, else a synthetic Llama
    of hidden 1024, 8 layers, FFN 4096, vocabulary 32768; `synthetic`; or a checkpoint folder)
    compressed by `raycompress compress` on the GPU (one actor, `gpus_per_actor: 1`, calibration
    --serve-samples x --serve-seq-len random token ids) once per scheme:
        W4A16-GPTQ   gptq, W4A16               W8A8-INT8    gptq, W8A8-INT8, smoothquant alpha 0.5
        FP8          rtn, FP8                  FP8_DYNAMIC  rtn, FP8_DYNAMIC
        NVFP4        rtn, NVFP4                FP8-KV       gptq, W4A16, kv_cache fp8
    The dense model and each checkpoint are then loaded by vLLM, each in its own process
    (`_vllm_serve.py`: `vllm.LLM(dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=
    --gpu-memory-utilization)`, kv_cache_dtype "fp8" for FP8-KV; its process group is killed after
    --serve-timeout s), and generate one fixed batch: --serve-prompts prompts of --serve-prompt-len
    random token ids, --serve-new-tokens greedy tokens each (ignore_eos), timed after a warm-up.
    Per scheme: loads_in_vllm, error (null, or "compress: ..." / "load: ..." / "generate: ..." /
    a timeout), tokens_per_s (generated tokens / timed seconds), speedup_vs_bf16 (tokens_per_s /
    the dense bf16 run's, same batch, same process tree), first_tokens_agree_vs_bf16 (share of the
    first 16 greedy ids of prompt 0 equal to the dense run's), quantization (the method vLLM
    detected), compress (the job section). A scheme that does not compress or load is a result,
    not a failure of the script. SmolLM2's width 576 is not a multiple of W4A16's groups of 128, so
    there W4A16-GPTQ and FP8-KV report a compress error; `--serving-model synthetic` serves all six.
    With --no-serving, --device cpu, no CUDA device, or no `import vllm` in --vllm-python (default:
    this Python), every scheme is {"skipped": reason}.
A run of (b) that fails, times out, or whose compression.json lacks seconds_per_layer, and a dense
vLLM run of (c) that produces no tokens, are reported under "errors" and the script exits 1.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "jobs" / "benchmarks"))
from _common import emit, skipped, work_folder  # noqa: E402
from _synthetic import (LlamaShape, MissingKey, job_dict, require, run_compress, write_checkpoint,  # noqa: E402
                        write_select_dir)

CLI = str(ROOT / ".venv" / "bin" / "raycompress")

ALGOS = {"sparsegpt": {"algorithm": "sparsegpt", "sparsity": 0.5},
         "gptq_w4g128": {"algorithm": "gptq", "quant": {"bits": 4, "group_size": 128}}}
SMOKE = {"algorithms": "sparsegpt", "layers": 1, "hidden": 64, "ffn": 128, "heads": 4, "kv_heads": 2, "vocab": 256,
         "samples": 4, "seq_len": 16, "cpus": min(2, os.cpu_count() or 1)}
AGREE = 0.999  # share of mask entries / integer codes that must match between CPU and device
SERVING = {"W4A16-GPTQ": {"algorithm": "gptq", "scheme": "W4A16"},
           "W8A8-INT8": {"algorithm": "gptq", "scheme": "W8A8-INT8", "smoothquant": {"alpha": 0.5}},
           "FP8": {"algorithm": "rtn", "scheme": "FP8"},
           "FP8_DYNAMIC": {"algorithm": "rtn", "scheme": "FP8_DYNAMIC"},
           "NVFP4": {"algorithm": "rtn", "scheme": "NVFP4"},
           "FP8-KV": {"algorithm": "gptq", "scheme": "W4A16", "kv_cache": {"type": "fp8"}}}
SERVE_SHAPE = {"hidden": 1024, "heads": 16, "kv_heads": 4, "ffn": 4096, "layers": 8, "vocab": 32768}
SMOKE_SERVE = {"serve_schemes": "FP8_DYNAMIC", "serving_model": "synthetic", "serve_samples": 4, "serve_seq_len": 16,
               "serve_prompts": 8, "serve_prompt_len": 16, "serve_new_tokens": 16,
               "serve_shape": {"hidden": 256, "heads": 4, "kv_heads": 2, "ffn": 512, "layers": 2, "vocab": 1024}}
SMOLLM2 = "smollm2-135m-instruct"


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
    _serving_flags(p)
    a = p.parse_args(argv)
    a.serve_shape = SERVE_SHAPE
    if a.smoke:
        a.__dict__.update(SMOKE, **SMOKE_SERVE)
    a.algorithms, a.serve_schemes = a.algorithms.split(","), a.serve_schemes.split(",")
    for flag, names, known in (("algorithms", a.algorithms, ALGOS), ("serve-schemes", a.serve_schemes, SERVING)):
        unknown = sorted(set(names) - set(known))
        if unknown:
            p.error(f"--{flag}: unknown {unknown}; choose from {list(known)}")
    return a


def _serving_flags(p: argparse.ArgumentParser) -> None:
    """The flags of part (c)."""
    p.add_argument("--serving", action=argparse.BooleanOptionalAction, default=True, help="run part (c)")
    p.add_argument("--serve-schemes", default=",".join(SERVING), help=f"comma list of {list(SERVING)}")
    p.add_argument("--serving-model", default="auto", help="auto (SmolLM2, else synthetic), synthetic, or a folder")
    p.add_argument("--serve-samples", type=int, default=32, help="calibration sequences of each compress run")
    p.add_argument("--serve-seq-len", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--serve-prompts", type=int, default=64, help="prompts in the timed vLLM batch")
    p.add_argument("--serve-prompt-len", type=int, default=128, help="token ids per prompt")
    p.add_argument("--serve-new-tokens", type=int, default=128, help="greedy tokens generated per prompt")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3, help="vLLM's share of GPU memory")
    p.add_argument("--serve-timeout", type=float, default=600.0, help="seconds per vLLM process before it is killed")
    p.add_argument("--vllm-python", default=sys.executable, help="the Python that has vLLM (default: this one)")


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

    out = a.workdir / "runs" / f"{name}-gpu"
    job = job_dict(model_dir, select_dir, a.samples, a.seq_len, ALGOS[name], _ray(a))
    try:
        rec, wall, rss = run_compress(CLI, out, select_dir, job, timeout_s=a.run_timeout)
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


def _ray(a: argparse.Namespace) -> dict:
    """The job's `ray:` section: one compress actor with the GPU (none with --device cpu) and a.cpus cores."""
    return {"compress_actors": 1, "gpus_per_actor": 1 if a.device != "cpu" else 0, "num_cpus": a.cpus,
            "cpus_per_actor": a.cpus, "torch_threads": a.cpus}


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


def serving_skip(a: argparse.Namespace) -> str | None:
    """Why part (c) cannot run here (flag, device, no vLLM), or None."""
    if not a.serving:
        return "--no-serving"
    if a.device == "cpu":
        return "--device cpu: vLLM serves on a CUDA device"
    if not torch.cuda.is_available():
        return "no CUDA device"
    import importlib.util

    if a.vllm_python == sys.executable and importlib.util.find_spec("vllm") is None:
        return f"vllm is not importable: {sys.executable} has no vllm package (see --vllm-python)"
    try:
        proc = subprocess.run([a.vllm_python, "-c", "import vllm"], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"vllm is not importable by {a.vllm_python}: {exc}"
    last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    return f"vllm is not importable by {a.vllm_python}: {last}" if proc.returncode else None


def serving_skipped(a: argparse.Namespace, why: str) -> dict:
    """Part (c)'s record when it does not run: {"skipped": why} for the part and for every scheme."""
    return {"skipped": why, "schemes": {name: skipped(why) for name in a.serve_schemes}}


def _serving_model(a: argparse.Namespace, root: Path) -> tuple[Path, str]:
    """(checkpoint folder, what it is) of part (c), chosen by --serving-model (see the docstring)."""
    if a.serving_model not in ("auto", "synthetic"):
        return Path(a.serving_model).resolve(), "--serving-model folder"
    note = ""
    if a.serving_model == "auto":
        try:
            from raycompress.models.fetch import resolve_model

            return Path(resolve_model(SMOLLM2).local()), f"{SMOLLM2} (served as bf16)"
        except Exception as exc:  # noqa: BLE001 - any failure to build it falls back to the synthetic model
            note = f"{SMOLLM2} unavailable ({type(exc).__name__}: {str(exc)[:300]}); "
    shape = LlamaShape(**a.serve_shape)
    return write_checkpoint(root / "model", shape), f"{note}synthetic Llama {asdict(shape)}"


def _vllm(a: argparse.Namespace, folder: Path, stem: Path, kv_cache_dtype: str | None = None) -> dict:
    """`_vllm_serve.serve_in_subprocess` of `folder` with part (c)'s batch flags."""
    from _vllm_serve import serve_in_subprocess

    batch = {"prompts": a.serve_prompts, "prompt-len": a.serve_prompt_len, "new-tokens": a.serve_new_tokens,
             "gpu-memory-utilization": a.gpu_memory_utilization, "kv-cache-dtype": kv_cache_dtype}
    return serve_in_subprocess(a.vllm_python, folder, stem, batch, a.serve_timeout)


def _agree(ids: list[int] | None, ref: list[int] | None) -> float | None:
    """Share of positions where two greedy id lists agree (over the shorter), None if either is missing."""
    n = min(len(ids or []), len(ref or []))
    return sum(x == y for x, y in zip(ids[:n], ref[:n])) / n if n else None


def _serve_scheme(a: argparse.Namespace, name: str, model_dir: Path, select_dir: Path, dense: dict) -> dict:
    """Compress `model_dir` with scheme `name` on the GPU, then serve the checkpoint in vLLM."""
    sec, root = SERVING[name], select_dir.parent
    out = root / f"compress-{name}"
    job = job_dict(model_dir, select_dir, a.serve_samples, a.serve_seq_len, sec, _ray(a))
    try:
        _, wall, _ = run_compress(CLI, out, select_dir, job, timeout_s=a.run_timeout)
    except (RuntimeError, OSError, ValueError) as exc:
        return {"compress": sec, "loads_in_vllm": False, "error": f"compress: {str(exc)[-1500:]}",
                "tokens_per_s": None, "speedup_vs_bf16": None}
    rec = _vllm(a, out / "compress" / "model", root / f"vllm-{name}", "fp8" if "kv_cache" in sec else None)
    tps, base = rec.get("tokens_per_s"), dense.get("tokens_per_s")
    return {"compress": sec, "compress_process_wall_s": round(wall, 1), **rec,
            "speedup_vs_bf16": round(tps / base, 4) if tps and base else None,
            "first_tokens_agree_vs_bf16": _agree(rec.get("first_tokens"), dense.get("first_tokens"))}


def serving(a: argparse.Namespace) -> tuple[dict, list[str]]:
    """Part (c): the dense bf16 run and {scheme: record} (module docstring), and error messages."""
    why = serving_skip(a)
    if why:
        return serving_skipped(a, why), []
    torch.cuda.empty_cache()  # part (a)'s tensors: vLLM's processes measure the free memory
    a.workdir = work_folder(a.workdir, "gpu")
    root = a.workdir / "serving"
    root.mkdir(parents=True, exist_ok=True)
    model_dir, what = _serving_model(a, root)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    select_dir = write_select_dir(root / "select", a.serve_samples, a.serve_seq_len, vocab)
    dense = _vllm(a, model_dir, root / "vllm-bf16")
    res = {"model": str(model_dir), "model_is": what, "bf16": dense, "schemes": {},
           "batch": {"prompts": a.serve_prompts, "prompt_len": a.serve_prompt_len, "new_tokens": a.serve_new_tokens},
           "calibration": {"samples": a.serve_samples, "seq_len": a.serve_seq_len}}
    for name in a.serve_schemes:
        res["schemes"][name] = _serve_scheme(a, name, model_dir, select_dir, dense)
    return res, [] if dense.get("tokens_per_s") else [f"serving bf16: {dense.get('error')}"]


def _device_info(device: str) -> dict:
    """Name, memory (GB) and CUDA version of GPU 0, or a note for --device cpu."""
    if device == "cpu":
        return {"device": "cpu (--device cpu: a test of this script, not a GPU check)"}
    p = torch.cuda.get_device_properties(0)
    return {"device": p.name, "device_memory_gb": p.total_memory / 1e9, "cuda": torch.version.cuda}


def main(argv: list[str] | None = None) -> int:
    """Skip without CUDA; else parts (a), (b) and (c), one JSON line; exit 1 on an error (docstring)."""
    a = _args(argv)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    # each compress run starts its own Ray: never attach to another cluster on this machine
    # (ray.init without an address joins the one named in /tmp/ray/ray_current_cluster)
    os.environ["RAY_ADDRESS"] = "local"
    base = {"torch": torch.__version__, "cores": os.cpu_count()}
    if a.device != "cpu" and not torch.cuda.is_available():
        emit({"skipped": "no CUDA device", "smoke": a.smoke, **base, "serving": serving_skipped(a, "no CUDA device")})
        return 0
    result = {**base, **_device_info(a.device), "correctness": correctness(a.device)}
    errors: list[str] = []
    if a.speed:
        result["speed"], errors = speed(a)
    result["serving"], serve_errors = serving(a)
    result.update(errors=errors + serve_errors, smoke=a.smoke)
    emit(result)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
