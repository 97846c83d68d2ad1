"""KV-cache calibration: max |k| and max |v| of the key / value states one attention module caches.

An FP8 KV cache (compressed-tensors `kv_cache_scheme`, per-tensor symmetric float8_e4m3) stores
k_scale = max|k| / 448 and v_scale = max|v| / 448 per attention module, over the calibration tokens,
of the states as they are written to the cache: after k_norm (Qwen3) and RoPE, before repeat_kv.
That is where compressed-tensors' `QuantizedKVCache` (and vLLM) quantize them, and where
`KVObserver` observes them: compressed-tensors' `QuantizedKVCache` is put in the module's cache slot
(`models.load.hook_kv_cache`) and its `register_key_hook` / `register_value_hook` hooks see every
key / value state the module caches. Nothing outside the observed module is touched, and all of it
is undone on exit.

Works for every attention module whose forward writes its cache through `cache.update(key, value,
...)` and takes the cache as `cache` / `past_key_values` / `past_key_value`: Llama, Mistral, Qwen2,
Qwen3 and OPT in transformers 5 (OPT's keys have no RoPE; its scaling is applied to the query, so
the cached key and value are the plain projections).
"""
from __future__ import annotations

import torch
from torch import nn


class KVObserver:
    """`with KVObserver(attn) as obs:` every forward of attention module `attn` during the block
    raises the running maxima `obs.k_absmax` / `obs.v_absmax` (float32 0-d tensors on the states'
    device; None before any call) of |key| / |value| over the states it caches (batch, kv heads,
    tokens, head dim), i.e. after k_norm and RoPE. The module's outputs are unchanged.

    Max-reducing across data-parallel workers is exact (`torch.maximum`), so any split of the
    calibration tokens gives bit-identical maxima. The scales of a per-tensor FP8 KV cache are
    max / 448 (`torch.finfo(torch.float8_e4m3fn).max`), as compressed-tensors' `calculate_qparams`
    gives for symmetric float8 args.

    Args:
        attn: the attention module (e.g. a decoder layer's `self_attn`, `ArchSpec.attention`).
    Raises (on enter):
        ValueError: `attn`'s forward takes no KV cache argument.
    """

    def __init__(self, attn: nn.Module) -> None:
        self.attn = attn
        self.k_absmax: torch.Tensor | None = None
        self.v_absmax: torch.Tensor | None = None
        self._handles: list = []
        self._attached = False

    def _key(self, module: nn.Module, key: torch.Tensor) -> None:
        self.k_absmax = _running_absmax(self.k_absmax, key)

    def _value(self, module: nn.Module, value: torch.Tensor) -> None:
        self.v_absmax = _running_absmax(self.v_absmax, value)

    def __enter__(self) -> KVObserver:
        from compressed_tensors.modeling import KV_CACHE_ATTR, register_key_hook, register_value_hook

        from raycompress.models.load import hook_kv_cache

        if getattr(self.attn, KV_CACHE_ATTR, None) is None:  # a quantized model's attention has one already
            self._handles.append(hook_kv_cache(self.attn, getattr(self.attn, "config", None)))
            self._attached = True
        self._handles += [register_key_hook(self.attn, self._key), register_value_hook(self.attn, self._value)]
        return self

    def __exit__(self, *exc) -> None:
        from compressed_tensors.modeling import KV_CACHE_ATTR

        for handle in reversed(self._handles):
            handle.remove()
        self._handles = []
        if self._attached:
            delattr(self.attn, KV_CACHE_ATTR)
            self._attached = False


def _running_absmax(current: torch.Tensor | None, states: torch.Tensor) -> torch.Tensor:
    """max(current, max |states|) as a float32 0-d tensor (|x| and max are exact in any dtype)."""
    new = states.detach().abs().amax().float()
    return new if current is None else torch.maximum(current, new)
