"""Benchmark peer for `formats.py`: llm-compressor's ``oneshot`` with a compressed-tensors preset
scheme, on exactly our calibration token sequences.

Runs inside ``.venv-peer`` (``make peer-env``; llm-compressor 0.14), never inside the main ``.venv``,
and imports nothing from raycompress (its calibration loader and stdout guard come from the sibling
peer script ``_peer_oneshot.py``, which stands on its own too).

    .venv-peer/bin/python jobs/benchmarks/_peer_formats.py --model DIR --calibration calib.parquet \
        --format W4A16-GPTQ --output OUT [--alpha 0.5] [--n-grid 20]

Formats (the recipe each builds; ``lm_head`` is never quantized, every other ``Linear`` is):

- ``W4A16-GPTQ``: GPTQModifier(scheme="W4A16") (its default activation order, "static"). With
  ``--w4-group G`` other than 128 (the preset's), the preset's weight arguments with groups of G:
  SmolLM2-135M's width 576 is not a multiple of 128, which llm-compressor refuses (and its
  observers cannot flatten). The same holds for the other W4A16 formats below.
- ``W4A16-AWQ``: AWQModifier(n_grid, duo_scaling=False) then QuantizationModifier(scheme="W4A16").
  ``duo_scaling=False`` is the search of the AWQ paper (s = mean|X|^r), the one raycompress's
  ``awq`` implements; llm-compressor's default (True) also divides by a weight term.
- ``W8A8-INT8``: SmoothQuantModifier(smoothing_strength=alpha) then GPTQModifier(scheme="W8A8").
- ``FP8``, ``FP8_DYNAMIC``, ``NVFP4``: QuantizationModifier(scheme=...) (round to nearest;
  static activation scales and NVFP4's global scales calibrated on the same rows).
- ``FP8-KV``: GPTQModifier(scheme="W4A16", kv_cache_scheme=FP8 E4M3 per tensor, static).

Prints ONE JSON line on stdout: ``{"format", "wall_s", "peak_rss_mb", "output", "recipe"}``;
``wall_s`` times ``oneshot`` only (model load and save excluded); ``peak_rss_mb`` is this process's
``ru_maxrss``. The checkpoint is saved compressed (``save_compressed=True``).
"""

from __future__ import annotations

import os

# Nothing may download from a hub; set before transformers / datasets / llmcompressor import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peer_oneshot import _claim_stdout, _load_calibration, _NoProcessor, _peak_rss_mb  # noqa: E402

FORMATS = ("W4A16-GPTQ", "W4A16-AWQ", "W8A8-INT8", "FP8", "FP8_DYNAMIC", "NVFP4", "FP8-KV")
IGNORE = ["lm_head"]


def _kv_fp8():
    """FP8 (E4M3) KV cache, one static scale per tensor: what `compress.kv_cache: {type: fp8}` writes."""
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True)


def _w4a16(group_size: int) -> dict:
    """The W4A16 arguments: the preset (`scheme="W4A16"`, groups of 128) when `group_size` is 128,
    else the preset's weights (int4, symmetric, per group) with `group_size` columns per group."""
    if group_size == 128:
        return {"scheme": "W4A16"}
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
    return {"config_groups": {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}}


def recipe(name: str, alpha: float = 0.5, n_grid: int = 20, w4_group: int = 128) -> list:
    """The llm-compressor modifiers for format `name` (see the module docstring); the W4A16
    formats quantize `w4_group` columns per scale.

    Raises:
        ValueError: `name` is not one of FORMATS.
    """
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    lin = {"ignore": IGNORE}
    w4 = {**lin, **_w4a16(w4_group)}
    if name == "W4A16-GPTQ":
        return [GPTQModifier(**w4)]
    if name == "W4A16-AWQ":
        from llmcompressor.modifiers.transform import AWQModifier

        return [AWQModifier(n_grid=n_grid, duo_scaling=False), QuantizationModifier(**w4)]
    if name == "W8A8-INT8":
        from llmcompressor.modifiers.transform import SmoothQuantModifier

        return [SmoothQuantModifier(smoothing_strength=alpha), GPTQModifier(scheme="W8A8", targets=["Linear"], **lin)]
    if name in ("FP8", "FP8_DYNAMIC", "NVFP4"):
        return [QuantizationModifier(scheme=name, targets=["Linear"], **lin)]
    if name == "FP8-KV":
        return [GPTQModifier(kv_cache_scheme=_kv_fp8(), **w4)]
    raise ValueError(f"unknown format {name!r}; known: {', '.join(FORMATS)}")


def _no_pinning_without_cuda() -> None:
    """llm-compressor 0.14's AWQ pins its cached activations (`IntermediatesCache.pin_memory`) for
    faster host-to-device copies, unconditionally; a CPU-only torch raises "Cannot access
    accelerator device". Pinning changes no value, so without CUDA it is made a no-op."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.cuda.is_available():
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, what in (("--model", "local Hugging Face model folder"), ("--calibration", "Parquet with input_ids rows"),
                       ("--output", "folder for the compressed model")):
        p.add_argument(flag, required=True, type=Path, help=what)
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength (W8A8-INT8)")
    p.add_argument("--n-grid", type=int, default=20, help="AWQ grid points (W4A16-AWQ)")
    p.add_argument("--w4-group", type=int, default=128, help="columns per scale of the W4A16 formats (preset: 128)")
    return p.parse_args(argv)


def _tokenizer_or_stand_in(folder: Path):
    """The folder's tokenizer; a stand-in when it has none (the calibration set is pre-tokenized)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure: run without one
        print(f"[peer] no tokenizer in {folder} ({exc!r}); continuing without", file=sys.stderr)
        return _NoProcessor()


def main(argv: list[str] | None = None) -> int:
    """Load, run oneshot (timed), save compressed, print the JSON line."""
    args = _parse_args(argv)
    out = _claim_stdout()

    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    torch.set_grad_enabled(False)
    dataset, n_rows, seq_len = _load_calibration(args.calibration)
    # the checkpoint's own dtype, as our engine computes in (scales are written in it)
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype="auto", local_files_only=True).eval()
    processor = _tokenizer_or_stand_in(args.model)
    _no_pinning_without_cuda()
    modifiers = recipe(args.format, args.alpha, args.n_grid, args.w4_group)
    args.output.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = oneshot(model=model, processor=processor, dataset=dataset, recipe=modifiers,
                    num_calibration_samples=n_rows, max_seq_length=seq_len,
                    shuffle_calibration_samples=False, batch_size=1)
    wall_s = time.perf_counter() - t0
    model.save_pretrained(str(args.output), save_compressed=True)
    if not isinstance(processor, _NoProcessor):
        processor.save_pretrained(str(args.output))
    print(json.dumps({"format": args.format, "wall_s": round(wall_s, 3), "peak_rss_mb": round(_peak_rss_mb(), 1),
                      "output": str(args.output.resolve()), "recipe": [type(m).__name__ for m in modifiers]}),
          file=out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
