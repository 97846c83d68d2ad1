"""Mixture-of-experts decoder layers: expert layout conversion, per-expert weight views, routing,
and `ExpertTap`, which shows a caller the tokens each expert receives.

In transformers >= 5 a sparse MoE block holds its routed experts as two fused 3-D parameters
(`models.arch.MoESpec`: gate_up (E, 2*I, H), down (E, H, I)) and runs them with `F.linear` on
slices, so no per-expert `nn.Linear` exists to hook. Checkpoints name the experts one by one;
`to_live` / `to_checkpoint` convert between the two layouts (the same conversion transformers'
conversion_mapping.py does at load and save time: stack along a new expert dimension, gate rows
before up rows). `ExpertTap` replaces the experts module's forward for the duration of a `with`
block by one that calls back per expert with its routed inputs and leaves the output bit-identical.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from raycompress.models.arch import ArchSpec, MoESpec
from raycompress.models.validate import CheckpointError


def moe_spec(spec: ArchSpec) -> MoESpec:
    """`spec.moe`. Raises ValueError if the architecture has no MoE block."""
    if spec.moe is None:
        raise ValueError("this architecture has no mixture-of-experts block (ArchSpec.moe is None)")
    return spec.moe


def is_moe_layer(layer: nn.Module, spec: ArchSpec) -> bool:
    """Whether decoder layer `layer` has a sparse MoE block (False for dense layers, e.g. Qwen-MoE's
    `mlp_only_layers`, and for architectures without `ArchSpec.moe`)."""
    if spec.moe is None:
        return False
    try:
        layer.get_submodule(spec.moe.path(spec.moe.experts))
    except AttributeError:
        return False
    return True


def layer_input_groups(layer: nn.Module, spec: ArchSpec) -> tuple[tuple[str, ...], ...]:
    """The `nn.Linear` modules of this decoder layer, grouped by shared input: the dense groups,
    then the shared expert's groups (MoE layer) or the dense MLP's (`MoESpec.dense_groups`, a layer
    without experts). The routed experts are not modules: see `expert_groups` and `ExpertTap`."""
    if spec.moe is None:
        return spec.input_groups
    extra = spec.moe.shared_groups if is_moe_layer(layer, spec) else spec.moe.dense_groups
    return spec.input_groups + extra


def expert_groups(spec: ArchSpec, e: int) -> tuple[tuple[str, ...], ...]:
    """Layer-relative names for expert `e`'s linears, grouped by shared input, e.g.
    (("mlp.experts.3.gate", "mlp.experts.3.up"), ("mlp.experts.3.down",)): keys for per-expert
    statistics and results (they name no module; the weights are `expert_weights` views)."""
    moe = moe_spec(spec)
    return tuple(tuple(f"{moe.path(moe.experts)}.{e}.{role}" for role in group) for group in moe.expert_groups)


def num_experts(config, spec: ArchSpec) -> int:
    """The number of routed experts E from a transformers config."""
    return int(getattr(config, moe_spec(spec).num_experts_key))


def _fused_names(moe: MoESpec) -> tuple[str, str]:
    return f"{moe.path(moe.experts)}.{moe.gate_up}", f"{moe.path(moe.experts)}.{moe.down}"


def to_live(state: dict[str, torch.Tensor], spec: ArchSpec, n_experts: int) -> dict[str, torch.Tensor]:
    """One decoder layer's tensors (names relative to the layer) from checkpoint to live layout:
    per-expert tensors are stacked into the fused parameters (gate rows before up rows), then
    `checkpoint_renames` apply. Tensors already fused, and layers without experts, pass through.

    Args:
        state: name -> tensor; per-expert gate/up (I, H) and down (H, I), any dtype.
        n_experts: E, from the config.
    Returns:
        a new dict; fused gate_up (E, 2*I, H) and down (E, H, I) in the experts' dtype. Memory: the
        fused copies exist beside the per-expert tensors until the caller drops `state` (2x the
        layer's experts at peak).
    Raises:
        CheckpointError: some but not all of the E experts' tensors are present, or their shapes
            disagree (naming the tensor); the checkpoint does not match its `MoESpec` row.
    """
    moe = moe_spec(spec)
    roles = dict(moe.checkpoint_experts)
    names = {role: [tmpl.format(e=e) for e in range(n_experts)] for role, tmpl in roles.items()}
    present = [n for ns in names.values() for n in ns if n in state]
    out = dict(state)
    if present:
        missing = [n for ns in names.values() for n in ns if n not in state]
        if missing:
            raise CheckpointError(f"MoE layer has {len(present)} per-expert tensors but lacks '{missing[0]}' "
                                  f"({len(missing)} missing) for {n_experts} experts ({moe.num_experts_key}); "
                                  "the checkpoint does not match its architecture row")
        gate, up, down = ([out.pop(n) for n in names[r]] for r in ("gate", "up", "down"))
        _check_shapes(gate, up, down, names)
        gate_up_name, down_name = _fused_names(moe)
        inter, hidden = gate[0].shape
        fused = gate[0].new_empty((n_experts, 2 * inter, hidden))  # filled in place: no stacked temporaries
        for e in range(n_experts):
            fused[e, :inter], fused[e, inter:] = gate[e], up[e]
        out[gate_up_name], out[down_name] = fused, torch.stack(down)
    return {_rename(k, moe): v for k, v in out.items()}


def _check_shapes(gate: list, up: list, down: list, names: dict) -> None:
    inter, hidden = gate[0].shape
    for role, ts, shape in (("gate", gate, (inter, hidden)), ("up", up, (inter, hidden)), ("down", down, (hidden, inter))):
        for e, t in enumerate(ts):
            if tuple(t.shape) != shape:
                raise CheckpointError(f"MoE tensor '{names[role][e]}' has shape {tuple(t.shape)}, expected {shape} "
                                      "(every expert of a layer has the same shape)")


def to_checkpoint(state: dict[str, torch.Tensor], spec: ArchSpec) -> dict[str, torch.Tensor]:
    """The inverse of `to_live`: fused expert parameters split into the checkpoint's per-expert
    tensors (contiguous copies), and the block renamed back. A layer without fused experts passes
    through unchanged. Names are relative to the decoder layer."""
    moe = moe_spec(spec)
    gate_up_name, down_name = _fused_names(moe)
    if gate_up_name not in state:
        return dict(state)
    out = {}
    for k, v in state.items():
        if k not in (gate_up_name, down_name):
            renamed = [old + k[len(new):] for old, new in moe.checkpoint_renames if k.startswith(new)]
            out[renamed[0] if renamed else k] = v
    gate_up, down = state[gate_up_name], state[down_name]
    inter, roles = gate_up.shape[1] // 2, dict(moe.checkpoint_experts)
    for e in range(gate_up.shape[0]):
        out[roles["gate"].format(e=e)] = gate_up[e, :inter].contiguous()
        out[roles["up"].format(e=e)] = gate_up[e, inter:].contiguous()
        out[roles["down"].format(e=e)] = down[e].contiguous()
    return out


def _experts(layer: nn.Module, spec: ArchSpec) -> tuple[nn.Module, MoESpec]:
    moe = moe_spec(spec)
    return layer.get_submodule(moe.path(moe.experts)), moe


def expert_weights(layer: nn.Module, spec: ArchSpec, e: int) -> dict[str, torch.Tensor]:
    """Views (no copy; writing them writes the layer) of expert `e`'s weights in a loaded layer:
    {"gate": (I, H), "up": (I, H), "down": (H, I)}, in the layer's dtype.

    Raises:
        IndexError: `e` is not in [0, E).
        AttributeError: the layer has no experts (a dense layer).
    """
    experts, moe = _experts(layer, spec)
    gate_up, down = getattr(experts, moe.gate_up).data, getattr(experts, moe.down).data
    if not 0 <= e < gate_up.shape[0]:
        raise IndexError(f"expert {e} out of range [0, {gate_up.shape[0]})")
    inter = gate_up.shape[1] // 2
    return {"gate": gate_up[e, :inter], "up": gate_up[e, inter:], "down": down[e]}


@torch.no_grad()
def set_expert_weights(layer: nn.Module, spec: ArchSpec, e: int, tensors: dict[str, torch.Tensor]) -> None:
    """Write expert `e`'s weights in place: `tensors` maps some of "gate", "up", "down" to tensors
    of the shapes `expert_weights` gives (cast to the layer's dtype and device).

    Raises:
        KeyError: a key other than gate/up/down. ValueError: a shape differs (fused experts share I,
            so an expert's intermediate size cannot change alone).
    """
    views = expert_weights(layer, spec, e)
    for role, t in tensors.items():
        if role not in views:
            raise KeyError(f"expert weight '{role}': expected one of {sorted(views)}")
        if tuple(t.shape) != tuple(views[role].shape):
            raise ValueError(f"expert {e} {role}: shape {tuple(t.shape)}, expected {tuple(views[role].shape)}")
        views[role].copy_(t)


@torch.no_grad()
def route(block: nn.Module, hidden: torch.Tensor, spec: ArchSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The router's decision for `hidden` (..., H), the MoE block's input, computed by the model's
    own router module (softmax, top-k and renormalisation as the architecture does them).

    Returns:
        (top_k_index (N, k) int64, top_k_weights (N, k) as the router returns them, router_logits
        (N, E)), N = hidden.numel() // H, tokens in row-major order of `hidden`.
    """
    moe = moe_spec(spec)
    router = block.get_submodule(moe.router)
    logits, weights, index = router(hidden.reshape(-1, hidden.shape[-1]))
    return index, weights, logits


ExpertCallback = Callable[..., None]


class ExpertTap:
    """Within `with ExpertTap(layer, spec, on_expert, on_shared):`, every forward of the layer's MoE
    block calls `on_expert(e, x_in, h_mid, weights)` for each expert e that receives >= 1 token, in
    increasing e, and `on_shared(group, x)` for each input group of the shared expert (if any).

    - x_in (n_e, H): the block inputs routed to e (the input of e's gate and up projections);
    - h_mid (n_e, I): act(gate_e x) * up_e x, the input of e's down projection;
    - weights (n_e,): the router weights of those tokens for e (the factor the block multiplies
      e's output by); with `with_tokens=True` a fifth argument, token_idx (n_e,) int64, gives the
      rows of the flattened block input (batch-major). Tokens come in transformers' order.
    - on_shared(group, x): `group` the first linear of a `MoESpec.shared_groups` entry, x (N, H) or
      (N, I_shared) its input, seen by a forward pre-hook.

    Tensors are in the model's dtype; callbacks must not modify them. The block's output is
    bit-identical to its output without the tap: with the eager experts implementation the tap
    runs transformers' own per-expert loop (the same ops, in the same order, as
    `*Experts.forward` in transformers 5.25: one F.linear on gate_up_proj[e], chunk, act * up,
    F.linear on down_proj[e], times the weight, index_add_), computing each intermediate once;
    with any other implementation (grouped_mm, ...) it calls the original forward for the output
    and recomputes the routed inputs for the callbacks (one extra gate/up product per expert).
    The original forward is restored on exit, also when the body raises.

    `all_tokens=True` (statistics for every expert, e.g. for experts the router starves): every
    expert is called back with all N tokens of the block input (token_idx = arange(N)), `weights`
    holding the router weight where the router chose e and 0 elsewhere; the output still follows
    the router (the original forward computes it). Costs E gate/up products over all N tokens.

    Raises:
        ValueError: the layer has no MoE block (a dense layer, or `spec.moe` is None).
    """

    def __init__(self, layer: nn.Module, spec: ArchSpec, on_expert: ExpertCallback,
                 on_shared: Callable[[str, torch.Tensor], None] | None = None, with_tokens: bool = False,
                 all_tokens: bool = False) -> None:
        if not is_moe_layer(layer, spec):
            raise ValueError("ExpertTap: the layer has no mixture-of-experts block")
        self.experts, self.moe = _experts(layer, spec)
        self.layer, self.on_expert, self.on_shared, self.with_tokens = layer, on_expert, on_shared, with_tokens
        self.all_tokens = all_tokens
        self._handles: list = []
        self._orig: Callable | None = None

    def __enter__(self) -> ExpertTap:
        self._orig = self.experts.forward
        self.experts.forward = self._forward  # an instance attribute shadows the class's forward
        if self.on_shared is not None:
            for group in self.moe.shared_groups:
                self._handles.append(self.layer.get_submodule(group[0]).register_forward_pre_hook(self._shared_hook(group[0])))
        return self

    def __exit__(self, *exc) -> None:
        if self.experts.__dict__.get("forward") == self._forward:
            del self.experts.forward
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _shared_hook(self, name: str):
        def hook(module, args):
            self.on_shared(name, args[0])
        return hook

    def _routed(self, top_k_index: torch.Tensor):
        """(e, top_k_pos, token_idx) per expert hit, increasing e, transformers' masks and order."""
        n = getattr(self.experts, self.moe.gate_up).shape[0]
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=n + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            if e != n:  # index n is padding (expert parallelism), as in transformers
                top_k_pos, token_idx = torch.where(mask[e])
                yield e, top_k_pos, token_idx

    def _expert_mid(self, hidden, top_k_weights, e, top_k_pos, token_idx):
        experts = self.experts
        x = hidden[token_idx]
        gate, up = F.linear(x, getattr(experts, self.moe.gate_up)[e]).chunk(2, dim=-1)
        h = experts.act_fn(gate) * up
        w = top_k_weights[token_idx, top_k_pos, None]
        extra = (token_idx,) if self.with_tokens else ()
        self.on_expert(e, x, h, w[:, 0], *extra)
        return h, w

    def _all_tokens(self, hidden, top_k_index, top_k_weights) -> None:
        n_tok, n_exp = hidden.shape[0], getattr(self.experts, self.moe.gate_up).shape[0]
        dense = top_k_weights.new_zeros((n_tok, n_exp + 1))  # column n_exp: padding index, as transformers
        dense.scatter_(1, top_k_index, top_k_weights)
        everyone = torch.arange(n_tok, device=hidden.device)
        for e in range(n_exp):
            self._expert_mid(hidden, dense[:, e:e + 1], e, torch.zeros_like(everyone), everyone)

    def _forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if self.all_tokens:
            self._all_tokens(hidden_states, top_k_index, top_k_weights)
            return self._orig(hidden_states, top_k_index, top_k_weights)
        if getattr(self.experts.config, "_experts_implementation", None) not in (None, "eager"):
            for e, pos, tok in self._routed(top_k_index):
                self._expert_mid(hidden_states, top_k_weights, e, pos, tok)
            return self._orig(hidden_states, top_k_index, top_k_weights)
        final = torch.zeros_like(hidden_states)
        down = getattr(self.experts, self.moe.down)
        for e, pos, tok in self._routed(top_k_index):
            h, w = self._expert_mid(hidden_states, top_k_weights, e, pos, tok)
            out = F.linear(h, down[e]) * w
            final.index_add_(0, tok, out.to(final.dtype))
        return final


def check_layer_layout(names, spec: ArchSpec, n_experts: int, where: str) -> None:
    """Check the tensor names of one MoE decoder layer (relative to the layer, checkpoint layout or
    live layout) against its `MoESpec` row, without reading data: the router's weight is present,
    and the experts are either all E experts' per-expert tensors or the two fused parameters, with
    no tensor of an expert outside [0, E).

    Raises:
        CheckpointError: naming `where` (the layer), the tensor and the config field.
    """
    moe, names = moe_spec(spec), set(names)
    live = {_rename(n, moe) for n in names}
    per = [tmpl.format(e=e) for _, tmpl in moe.checkpoint_experts for e in range(n_experts)]
    fused = set(_fused_names(moe))
    have = [n for n in per if n in names]
    field = f"config.json {moe.num_experts_key}={n_experts}"
    if have and len(have) != len(per):
        missing = [n for n in per if n not in names]
        raise CheckpointError(f"{where}: MoE expert tensor '{missing[0]}' is missing ({len(missing)} of {len(per)}; "
                              f"{field})")
    if not have and not fused <= live:
        raise CheckpointError(f"{where}: no MoE expert tensors: expected per-expert '{per[0]}' ... or fused "
                              f"'{sorted(fused)[0]}' ({field})")
    prefixes = {tmpl.split("{e}")[0] for _, tmpl in moe.checkpoint_experts}
    stray = sorted(n for n in names if any(n.startswith(p) for p in prefixes) and n not in per and n not in fused)
    if stray:
        raise CheckpointError(f"{where}: tensor '{stray[0]}' belongs to no expert of this layer ({field})")
    router = f"{moe.path(moe.router)}.weight"
    if router not in live:
        raise CheckpointError(f"{where}: the MoE router '{router}' is missing (module '{moe.path(moe.router)}')")


def _rename(name: str, moe: MoESpec) -> str:
    for old, new in moe.checkpoint_renames:
        if name.startswith(old):
            return new + name[len(old):]
    return name
