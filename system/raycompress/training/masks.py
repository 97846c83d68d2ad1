"""Hold pruned weights at exactly zero while training: one bool mask per target linear, taken from
the checkpoint's exact zeros, applied to gradients (a tensor hook) and to weights (after each
optimizer step).

Why hooks and not `torch.nn.utils.parametrize`: a parametrization renames the weight to
`parametrizations.weight.original`, so `save_pretrained` would write a checkpoint that neither
`compress`'s format nor transformers reads back, and DDP / DeepSpeed ZeRO-3 partition the real
parameter, not the parametrized view. A gradient hook leaves the parameter a plain leaf; zeroing
its gradient keeps DDP's all-reduce of masked entries at zero on every rank, and re-zeroing the
weights after the step removes what AdamW's momentum (from before a GMP mask grew) or numerical
noise would put there. Decoupled weight decay keeps 0 at 0.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from raycompress.models.arch import arch_spec

log = logging.getLogger(__name__)


def refuse_quantized(folder: str | os.PathLike) -> None:
    """Raise if the checkpoint in `folder` is quantized: training needs real float weights.

    Looks at config.json (`quantization_config`) and the tensor names of every *.safetensors file
    (`*.weight_packed`, compressed-tensors packing); reads no tensor data.

    Raises:
        ValueError: the folder holds a quantized checkpoint; the message names the folder and why.
    """
    from safetensors import safe_open

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if cfg_path.is_file() and "quantization_config" in json.loads(cfg_path.read_text()):
        raise ValueError(f"{folder}: config.json has a quantization_config; sparse training needs an "
                         "unquantized (float) checkpoint: train before quantizing, or compress without quant")
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            packed = [k for k in f.keys() if k.endswith(".weight_packed")]
        if packed:
            raise ValueError(f"{folder}: {shard.name} holds packed quantized weights ({packed[0]}, ...); "
                             "sparse training needs an unquantized (float) checkpoint")


def target_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The prunable linears of a *ForCausalLM, by full module name, from the architecture table
    (`models.arch`): every decoder layer's attention and MLP projections; never embeddings or lm_head.

    Raises:
        UnsupportedArchitectureError: the model's config names no supported family.
    """
    spec = arch_spec(model.config)
    layers = model.get_submodule(spec.layers)
    return {f"{spec.layers}.{i}.{name}": layer.get_submodule(name)
            for i, layer in enumerate(layers) for name in spec.linears}


class WeightMask:
    """Bool masks (d_out, d_in), True = pruned, over named linears of one model.

    Use: `mask = WeightMask.from_zeros(model)` (before wrapping in DDP), `mask.attach()` once,
    `mask.apply()` after every optimizer step, `mask.update(new)` when GMP grows the masks.
    """

    def __init__(self, linears: dict[str, torch.nn.Linear], masks: dict[str, torch.Tensor]):
        if set(linears) != set(masks):
            raise ValueError(f"masks and linears differ: {sorted(set(linears) ^ set(masks))[:5]}")
        self.linears = linears
        self.masks: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self.update(masks)

    @classmethod
    def from_zeros(cls, model: torch.nn.Module) -> "WeightMask":
        """Masks from the exact zeros of every target linear (a `compress` checkpoint stores them)."""
        linears = target_linears(model)
        return cls(linears, {n: lin.weight.detach() == 0 for n, lin in linears.items()})

    def weights(self) -> dict[str, torch.Tensor]:
        """name -> the live weight Parameter (d_out, d_in)."""
        return {n: lin.weight for n, lin in self.linears.items()}

    def update(self, masks: dict[str, torch.Tensor]) -> None:
        """Replace the masks (same names and shapes) and zero the newly pruned weights.

        Raises:
            ValueError: a name or shape that does not match the linears.
        """
        for name, m in masks.items():
            if name not in self.linears:
                raise ValueError(f"mask for unknown linear {name!r}")
            w = self.linears[name].weight
            if m.shape != w.shape:
                raise ValueError(f"{name}: mask shape {tuple(m.shape)} != weight shape {tuple(w.shape)}")
            self.masks[name] = m.to(device=w.device, dtype=torch.bool)
        self.apply()

    def attach(self) -> None:
        """Register a gradient hook per weight that zeroes the gradient of masked entries (idempotent)."""
        if self._handles:
            return
        for name, lin in self.linears.items():
            self._handles.append(lin.weight.register_hook(lambda g, name=name: g.masked_fill(self.masks[name], 0)))

    def detach(self) -> None:
        """Remove the gradient hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def apply(self) -> None:
        """Set every masked weight to exactly 0 (in place)."""
        for name, lin in self.linears.items():
            lin.weight.masked_fill_(self.masks[name], 0)

    def counts(self) -> tuple[int, int]:
        """(masked entries, total entries) over all target weights."""
        return sum(int(m.sum()) for m in self.masks.values()), sum(m.numel() for m in self.masks.values())

    def zeros(self) -> tuple[int, int]:
        """(exact zeros, total entries) in the live target weights."""
        return (sum(int((lin.weight == 0).sum()) for lin in self.linears.values()),
                sum(lin.weight.numel() for lin in self.linears.values()))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """name -> uint8 mask on CPU (safetensors has no bool before some versions; uint8 is exact)."""
        return {n: m.to(torch.uint8).cpu() for n, m in self.masks.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of `state_dict`; applies the loaded masks."""
        self.update({n: t.bool() for n, t in state.items()})
