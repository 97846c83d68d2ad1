"""Router probe: the experts a mixture-of-experts model's first k routers choose for every token of
candidate windows, for routing-aware selection (`selection/routing.py`).

Only the embedding and the decoder layers up to the k-th router run: a forward hook on each
probed router records its choice, and the hook on the k-th stops the forward pass (by raising an
exception the probe catches), so later layers are never computed; `load_probe` also loads only the
first layers' weights. Routers are recognised by what they are, never by a model's name: a module
with an integer `top_k` attribute and a 2-D `weight` (experts x hidden), taken in registration
(= execution) order; in transformers 5 that is the router class of every MoE model (Qwen3-MoE,
Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V3, gpt-oss: `*TopKRouter`). The recorded choice is the
integer tensor of the router's output (the experts the model actually uses, including
DeepSeek-V3's group-limited, bias-corrected choice), or top-k of its output for a router that
returns logits only. Hooks rather than `output_router_logits=True`: the logits alone would need
each model's choice rule re-derived, and the whole model would run.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch

from raycompress.selection.routing import route_counts

log = logging.getLogger(__name__)


class _Done(Exception):
    """Raised by the last probed router's hook to stop the forward pass."""


def is_router(module: torch.nn.Module) -> bool:
    """A module with an integer `top_k` and a 2-D `weight` tensor (experts x hidden)."""
    weight = getattr(module, "weight", None)
    top_k = getattr(module, "top_k", None)
    return isinstance(top_k, int) and not isinstance(top_k, bool) and isinstance(weight, torch.Tensor) \
        and weight.dim() == 2


def find_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's routers in registration order (the order decoder layers run)."""
    return [m for m in model.modules() if is_router(m)]


def _chosen(output, top_k: int) -> torch.Tensor:
    """The expert ids in a router's output: its last integer tensor, else top-k of its logits."""
    parts = output if isinstance(output, (tuple, list)) else (output,)
    ints = [p for p in parts if isinstance(p, torch.Tensor) and not p.is_floating_point() and p.dtype != torch.bool]
    if ints:
        return ints[-1]
    return torch.topk(parts[0].float(), top_k, dim=-1).indices


class RouterProbe:
    """Holds a model; `expert_ids(windows)` and `counts(windows)` (also `__call__`) run the
    embedding + layers up to the `probe_layers`-th router on windows of token ids.

    Raises:
        ValueError: the model has fewer than `probe_layers` routers (or `probe_layers` < 1).
    """

    def __init__(self, model: torch.nn.Module, probe_layers: int, batch: int = 8) -> None:
        routers = find_routers(model)
        if probe_layers < 1 or len(routers) < probe_layers:
            raise ValueError(f"probe_layers={probe_layers}: the model has {len(routers)} routers "
                             "(modules with an integer top_k and a 2-D weight)")
        self.model, self.batch = model.eval(), batch
        self.routers = routers[:probe_layers]
        self.num_experts = max(int(r.weight.shape[0]) for r in self.routers)
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def _run(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Per probed router, its (b, T, top_k) expert ids for a (b, T) batch."""
        got: list[torch.Tensor] = []
        b, t = ids.shape

        def hook(module, _inputs, output):
            got.append(_chosen(output, module.top_k).reshape(b, t, -1).to("cpu", torch.int64))
            if len(got) == len(self.routers):
                raise _Done

        handles = [r.register_forward_hook(hook) for r in self.routers]
        try:
            self.model(input_ids=ids.to(self.device), use_cache=False)
        except _Done:
            pass
        finally:
            for h in handles:
                h.remove()
        if len(got) != len(self.routers):
            raise RuntimeError(f"the forward pass reached {len(got)} of {len(self.routers)} probed routers")
        return got

    def expert_ids(self, windows: list[np.ndarray]) -> np.ndarray:
        """(n, probe_layers, T, top_k) int64 expert ids per window, probed layer, token and slot.

        Args:
            windows: n token-id arrays of one length T.
        Raises:
            ValueError: windows of different lengths.
        """
        lengths = {len(w) for w in windows}
        if len(lengths) > 1:
            raise ValueError(f"windows must have one length, got {sorted(lengths)}")
        out = []
        for i in range(0, len(windows), self.batch):
            ids = torch.as_tensor(np.stack(windows[i : i + self.batch]), dtype=torch.long)
            out.append(torch.stack(self._run(ids), dim=1))  # (b, layers, T, top_k)
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.routers), 0, 0), np.int64)

    def counts(self, windows: list[np.ndarray]) -> np.ndarray:
        """(n, probe_layers, num_experts) int64 routed tokens per window (`routing.route_counts`)."""
        ids = self.expert_ids(windows)
        if not len(windows):
            return np.zeros((0, len(self.routers), self.num_experts), np.int64)
        return route_counts(ids, self.num_experts)

    __call__ = counts


def _truncated(config, layers: int):
    """A copy of `config` with `layers` decoder layers (per-layer lists cut to match)."""
    cfg = copy.deepcopy(config)
    total = cfg.num_hidden_layers
    for name, value in list(vars(cfg).items()):
        if isinstance(value, (list, tuple)) and len(value) == total and name != "mlp_only_layers":
            setattr(cfg, name, type(value)(value[:layers]))
    cfg.num_hidden_layers = layers
    return cfg


def load_probe(folder: str | Path, probe_layers: int, dtype: torch.dtype = torch.float32,
               device: str | None = None, batch: int = 8) -> RouterProbe:
    """A `RouterProbe` on the base model in `folder` (transformers, trust_remote_code=False),
    loading only as many decoder layers as it takes to hold `probe_layers` routers (models whose
    first layers are dense load a few more); the later layers' weights are skipped, so transformers'
    report of them as unexpected keys is silenced.

    Raises:
        ValueError: the model has fewer than `probe_layers` routers in all its layers, or the
            checkpoint lacks weights of the loaded layers (they would be random).
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    total = int(config.num_hidden_layers)
    layers = min(total, probe_layers)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    while True:
        model = _load_base(folder, _truncated(config, layers), dtype)
        found = len(find_routers(model))
        if found >= probe_layers or layers >= total:
            break
        layers = min(total, layers + probe_layers - found)
    log.info("router probe: %d of %d layers loaded for %d routers", layers, total, probe_layers)
    return RouterProbe(model.to(device), probe_layers, batch)


def _load_base(folder: str | Path, config, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModel

    quiet = logging.getLogger("transformers.modeling_utils")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        model, info = AutoModel.from_pretrained(folder, config=config, dtype=dtype, trust_remote_code=False,
                                                output_loading_info=True)
    finally:
        quiet.setLevel(level)
    if info.get("missing_keys"):
        raise ValueError(f"{folder}: the checkpoint lacks {sorted(info['missing_keys'])[:5]} "
                         f"({len(info['missing_keys'])} missing) for the router probe")
    return model
