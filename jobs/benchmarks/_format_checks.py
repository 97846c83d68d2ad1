"""Checks of one quantized checkpoint folder for `formats.py` (runs in the main `.venv`).

- `disk_bytes(folder)`: bytes of its safetensors files (the weights; config and tokenizer files
  are not counted).
- `bits_per_weight(folder, dense)`: Σ bytes of every tensor stored under a decoder-layer linear of
  the dense checkpoint (weight or weight_packed, scales, zero points, global scales, input scales,
  weight_shape) × 8 / Σ those linears' parameter counts in the dense checkpoint. Read from the
  safetensors headers only (no tensor is loaded).
- `stock_and_evaluator(folder, loader, ids)`: loads the folder with stock transformers
  `AutoModelForCausalLM.from_pretrained(output_loading_info=True)` (compressed-tensors applies the
  checkpoint's quantization in its forward: fake-quantized weights and activations), and with the
  evaluator's loader, and compares the logits of both on the fixed prompt `ids`, the evaluator's
  taken the way the scorer takes them (`evaluation.scoring._scored_logits_fn`).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

FLOAT_TOL = 1e-4  # max |logit difference| (float32) under which the two forwards count as equal


def _headers(folder: Path) -> dict[str, dict]:
    """{tensor name: safetensors header entry} over every *.safetensors file of `folder`."""
    out: dict[str, dict] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        out.update({k: v for k, v in header.items() if k != "__metadata__"})
    return out


def disk_bytes(folder: Path) -> int:
    """Bytes of `folder`'s *.safetensors files."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def decoder_linears(dense: Path) -> dict[str, int]:
    """{module name: parameter count} of the 2-D `.weight` tensors under `model.layers.` in the
    dense checkpoint `dense` (the decoder layers' linears; embeddings and lm_head excluded)."""
    out = {}
    for name, entry in _headers(dense).items():
        if name.startswith("model.layers.") and name.endswith(".weight") and len(entry["shape"]) == 2:
            rows, cols = entry["shape"]
            out[name[: -len(".weight")]] = rows * cols
    return out


def bits_per_weight(folder: Path, dense: Path) -> float:
    """Stored bits per decoder-linear weight of `folder` (see the module docstring).

    Raises:
        ValueError: `folder` stores none of the dense checkpoint's decoder linears.
    """
    linears = decoder_linears(dense)
    stored = 0
    seen = set()
    for name, entry in _headers(folder).items():
        module = name.rsplit(".", 1)[0]
        if module in linears:
            start, end = entry["data_offsets"]
            stored += end - start
            seen.add(module)
    if not seen:
        raise ValueError(f"{folder}: no tensor of the dense checkpoint's decoder linears (e.g. {next(iter(linears))})")
    return 8.0 * stored / sum(linears[m] for m in seen)


def prompt_ids(tokenizer, text: str, length: int) -> torch.Tensor:
    """(1, ≤ length) int64 ids of `text` (no special tokens), cut to `length`."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:length]
    return torch.tensor([ids], dtype=torch.long)


def _evaluator_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """(T, vocab) float32 logits of every position of `ids` (1, T), as the scorer computes them."""
    from raycompress.evaluation.scoring import _scored_logits_fn

    n = ids.shape[1]
    return _scored_logits_fn(model, ids, [(0, n)])(0, n)


def stock_load(folder: Path):
    """(model or None, loading report): stock `from_pretrained(output_loading_info=True)` in float32;
    the report has `loads` (True when it loaded with no missing, unexpected or mismatched keys and
    no error messages) and, otherwise, the offending keys (first 5 of each) or the exception."""
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                           output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 - the report carries it
        return None, {"loads": False, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
    bad = {k: [str(x) for x in list(v)[:5]] for k, v in info.items() if v}
    return model.eval(), {"loads": not bad, **({"loading_info": bad} if bad else {})}


@torch.no_grad()
def stock_and_evaluator(folder: Path, loader, ids: torch.Tensor) -> dict:
    """{"loads_in_transformers", "logits_max_abs_diff", "logits_equal"} (see the module docstring);
    the diff is null (with "why") when the stock load or its forward failed."""
    stock, report = stock_load(folder)
    out = {"loads_in_transformers": report["loads"], **{k: v for k, v in report.items() if k != "loads"}}
    if stock is None:
        return {**out, "logits_max_abs_diff": None, "logits_equal": None, "why": "stock load failed"}
    try:
        ref = stock(input_ids=ids).logits[0].float()
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return {**out, "logits_max_abs_diff": None, "logits_equal": None,
                "why": f"stock forward failed: {type(exc).__name__}: {str(exc)[:300]}"}
    del stock
    ours = _evaluator_logits(loader(folder, torch.float32), ids)
    diff = float((ref - ours).abs().max())
    return {**out, "logits_max_abs_diff": diff, "logits_equal": diff <= FLOAT_TOL}
