"""One vLLM load and one timed greedy generation of a checkpoint folder; writes ONE JSON file.

    python jobs/benchmarks/_vllm_serve.py --model DIR --out RESULT.json [--kv-cache-dtype fp8]
        [--prompts 64 --prompt-len 128 --new-tokens 128 --gpu-memory-utilization 0.3]

Run by `gpu_check.py` part (c) through `serve_in_subprocess`, as its own process in a new session
(vLLM holds GPU memory until its processes exit), with the Python that has vLLM; it needs nothing
but vLLM and the standard library. The model is
loaded with `vllm.LLM(model=DIR, dtype="bfloat16", enforce_eager=True, skip_tokenizer_init=True,
gpu_memory_utilization=..., max_model_len=prompt_len + new_tokens + 8, seed=0)` (plus
`kv_cache_dtype` when given); the prompts are token ids (a synthetic checkpoint has no tokenizer):
`--prompts` lists of `--prompt-len` ids drawn uniformly from [0, vocab_size) by `random.Random(0)`.
One warm-up call (4 prompts x 4 tokens), then the timed call: greedy (temperature 0),
`max_tokens=new_tokens`, `ignore_eos=True` (every prompt yields exactly new_tokens tokens),
`detokenize=False`. The timed wall covers prefill and decode of the whole batch.

RESULT.json: {"loads_in_vllm": bool, "error": str | null, "tokens_per_s": float | null (generated
tokens / timed wall seconds), "generated_tokens", "generate_s", "load_s", "quantization" (the method
vLLM detected, e.g. "compressed-tensors"), "kv_cache_dtype", "first_tokens" (the first 16 generated
ids of prompt 0), "vllm" (version)}. A failure to build `LLM` gives loads_in_vllm false and the
error; a failure while generating keeps loads_in_vllm true. After writing the file the process ends
with `os._exit(0)`: vLLM's shutdown can hang, and the caller kills what remains of its process group.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="checkpoint folder (config.json + safetensors)")
    p.add_argument("--out", type=Path, required=True, help="where the result JSON is written")
    p.add_argument("--kv-cache-dtype", default=None, help="vLLM kv_cache_dtype, e.g. fp8 (default: vLLM's auto)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt")
    p.add_argument("--new-tokens", type=int, default=128, help="generated tokens per prompt")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    return p.parse_args()


def token_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    """n vLLM token prompts {"prompt_token_ids": [length ints in [0, vocab)]}, from random.Random(seed)."""
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(length)]} for _ in range(n)]


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[-1500:]}"


def serve(a: argparse.Namespace) -> dict:
    """Load `a.model` in vLLM and time one greedy batch; every failure is caught into the record."""
    rec: dict = {"loads_in_vllm": False, "error": None, "tokens_per_s": None, "kv_cache_dtype": a.kv_cache_dtype}
    try:
        import vllm
        from vllm import LLM, SamplingParams
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return {**rec, "error": f"import vllm: {_error(exc)}"}
    rec["vllm"] = getattr(vllm, "__version__", None)
    vocab = json.loads((a.model / "config.json").read_text())["vocab_size"]
    prompts = token_prompts(a.prompts, a.prompt_len, vocab)
    kwargs = dict(model=str(a.model), dtype="bfloat16", enforce_eager=True, skip_tokenizer_init=True,
                  gpu_memory_utilization=a.gpu_memory_utilization, max_model_len=a.prompt_len + a.new_tokens + 8, seed=0)
    if a.kv_cache_dtype:
        kwargs["kv_cache_dtype"] = a.kv_cache_dtype
    t0 = time.perf_counter()
    try:
        llm = LLM(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the checkpoint does not load: that is the result
        return {**rec, "error": f"load: {_error(exc)}"}
    rec.update(loads_in_vllm=True, load_s=time.perf_counter() - t0,
               quantization=getattr(getattr(llm.llm_engine, "model_config", None), "quantization", None))
    greedy = dict(temperature=0.0, ignore_eos=True, detokenize=False)
    try:
        llm.generate(prompts[:4], sampling_params=SamplingParams(max_tokens=4, **greedy), use_tqdm=False)
        t1 = time.perf_counter()
        outs = llm.generate(prompts, sampling_params=SamplingParams(max_tokens=a.new_tokens, **greedy), use_tqdm=False)
        wall = time.perf_counter() - t1
    except Exception as exc:  # noqa: BLE001 - loads but does not generate
        return {**rec, "error": f"generate: {_error(exc)}"}
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    return {**rec, "tokens_per_s": n / wall, "generated_tokens": n, "generate_s": wall,
            "first_tokens": list(outs[0].outputs[0].token_ids[:16])}


def _end_group(proc: subprocess.Popen) -> None:
    """Kill what is left of the process group `proc` leads (vLLM's engine process), and wait (≤ 30 s)
    until it is gone, so that the next vLLM process finds the GPU memory free."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    for _ in range(300):
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def _tail(log: Path, lines: int = 8) -> str:
    text = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.is_file() else []
    return "\n".join(text[-lines:])


def serve_in_subprocess(python: str, folder: Path, stem: Path, flags: dict, timeout_s: float) -> dict:
    """The caller's side: this script run by `python` on `folder` in a new session, with `flags`
    ({"prompts": 64, "kv-cache-dtype": None, ...}: each non-None value becomes --NAME VALUE), stdout
    and stderr to STEM.log, the result to STEM.json; its process group is killed after `timeout_s`
    seconds, and after a normal exit whatever of it remains. Returns the result record, or
    {"loads_in_vllm": False, "error": ..., "tokens_per_s": None} when the process wrote none."""
    result, log = stem.with_suffix(".json"), stem.with_suffix(".log")
    result.unlink(missing_ok=True)
    cmd = [python, str(Path(__file__).resolve()), "--model", str(folder), "--out", str(result)]
    cmd += [str(x) for k, v in flags.items() if v is not None for x in (f"--{k}", v)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # vLLM must not join a Ray cluster
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        _end_group(proc)
    if result.is_file():
        return json.loads(result.read_text())
    why = f"timed out after {timeout_s:g} s" if rc is None else f"exit code {rc}"
    return {"loads_in_vllm": False, "error": f"{why}: {_tail(log)}", "tokens_per_s": None}


def main() -> None:
    """Serve, write the JSON, end the process at once (see the module docstring)."""
    a = _args()
    rec = serve(a)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rec))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
