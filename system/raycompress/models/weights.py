"""Offloaded model access: a meta-device skeleton plus per-module weights read from safetensors.

`OffloadedModel` never materialises the whole model. It reads `config.json` and the safetensors
index, builds the `*ForCausalLM` skeleton on the meta device (no memory), and hands out single
decoder layers (or the embedding / final modules) with real weights read from disk on demand.
The reader is memory-mapped (`safetensors.safe_open`), so only the tensors asked for are paged in,
straight to the model's device, in the checkpoint's own dtype unless another is asked for.
A model in object storage is read through the node-local cache (`models.fetch.ModelRef`): each
node fetches the metadata files, then only the safetensors files holding the layers it loads.

The folder is untrusted data (`models.validate`): config.json is refused when it asks for remote
code or names an unsupported model; every safetensors header is checked against its file before
the file is opened (`check_files` checks them all, for preflight); every tensor loaded by
`read_tensors` / `read_outside_layers` is checked for NaN/Inf. All raise `CheckpointError`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from raycompress.models.arch import ArchSpec, arch_spec
from raycompress.models.fetch import ModelRef
from raycompress.models.validate import (PICKLE_SUFFIXES, CheckpointError, Header, check_config, check_finite,
                                        read_header)
from raycompress.storage import uri


def _get_submodule(root: nn.Module, dotted: str) -> nn.Module:
    return root.get_submodule(dotted)


class OffloadedModel:
    """A causal LM on disk: config, skeleton on meta, and per-prefix weight loading.

    Args:
        model: a `ModelRef`, or the location (local folder or URI) of a Hugging Face folder with
            config.json and *.safetensors (sharded or not).
        dtype: dtype the weights are cast to when loaded; default the checkpoint's own (bf16 for
            most large models; the first floating-point tensor of the index decides).
        device: where loaded tensors are placed (default CPU).

    Raises:
        FileNotFoundError: the folder has no config.json or no safetensors file.
        CheckpointError: config.json (or tokenizer_config.json) asks for remote code, the index
            names files outside the folder or pickles, the folder holds only pickle weights, or a
            safetensors header read here (the single file's, layer 0's) is malformed.
        UnsupportedArchitectureError (a CheckpointError): the model type or architecture is not
            in `models.arch.ARCHITECTURES`.
    """

    def __init__(self, model: ModelRef | str | Path, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu") -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        self.ref = model if isinstance(model, ModelRef) else ModelRef(str(model))
        self.model_dir = self.ref.local(weights=False)  # config, tokenizer and index on this node
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{uri.display(self.ref.location)}: no config.json")
        self._check_configs()
        self._headers: dict[str, Header] = {}
        self._checked: set[str] = set()  # weight files whose local copy's header was checked here
        self.config = AutoConfig.from_pretrained(self.model_dir, trust_remote_code=False)
        self.config._attn_implementation = "sdpa"  # attention_mask=None then means causal
        self.spec: ArchSpec = arch_spec(self.config)
        self.device = torch.device(device)
        self.weight_map = self._read_weight_map()
        self.dtype = dtype or self._stored_dtype()
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(self.config, trust_remote_code=False)
        self.num_layers = len(_get_submodule(self.skeleton, self.spec.layers))
        self._inputs_ready = False

    def _check_configs(self) -> None:
        """config.json and tokenizer_config.json as JSON, before transformers reads them."""
        for name in ("config.json", "tokenizer_config.json"):
            path = self.model_dir / name
            if path.is_file():
                try:
                    cfg = json.loads(path.read_bytes())
                except (UnicodeDecodeError, ValueError) as exc:
                    raise CheckpointError(f"model folder {uri.display(self.ref.location)}: {name} is not JSON "
                                          f"({exc})") from exc
                check_config(cfg, uri.display(self.ref.location), name)

    def _read_weight_map(self) -> dict[str, str]:
        index = self.model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = dict(json.loads(index.read_text())["weight_map"])
            bad = sorted({f for f in weight_map.values() if "/" in f or "\\" in f or f.startswith(".")
                          or not f.endswith(".safetensors")})
            if bad:  # a shard outside the folder, or not safetensors (pickle), is never opened
                raise CheckpointError(f"{uri.display(self.ref.location)}: model.safetensors.index.json names files "
                                      f"outside the model folder or not .safetensors: {bad[:3]}")
            return weight_map
        if not uri.is_file(self._location("model.safetensors")):
            self._refuse_pickles()
            raise FileNotFoundError(f"{uri.display(self.ref.location)}: no model.safetensors or index")
        return {k: "model.safetensors" for k in self._header("model.safetensors").tensors}

    def _refuse_pickles(self) -> None:
        """A folder whose weights are only pickles (pytorch_model.bin, *.pt ...) is refused by name."""
        root = self.model_dir if self._root_is_local() else self.ref.location
        names = sorted(n for n in uri.listdir(str(root)) if n.endswith(PICKLE_SUFFIXES))
        if names:
            raise CheckpointError(f"{uri.display(self.ref.location)}: weights only as pickle files {names[:3]}; "
                                  "raycompress reads only safetensors (unpickling can run code); convert the "
                                  "checkpoint to safetensors with a tool you trust")

    def _root_is_local(self) -> bool:
        return self.ref.is_alias or uri.is_local(self.ref.location)

    def _location(self, name: str) -> str:
        """Where weight file `name` is stored (a local path, or a URI read by range reads)."""
        return str(self.model_dir / name) if self._root_is_local() else uri.join(self.ref.location, name)

    def _header(self, name: str) -> Header:
        """The checked safetensors header of weight file `name` where it is stored (cached).

        Raises:
            CheckpointError: the file is missing (naming the index) or its header is malformed.
        """
        if name not in self._headers:
            loc = self._location(name)
            try:
                self._headers[name] = read_header(loc, uri.display(loc))
            except OSError as exc:
                if uri.exists(loc):
                    raise
                users = sorted(k for k, f in getattr(self, "weight_map", {}).items() if f == name)
                raise CheckpointError(f"{uri.display(self.ref.location)}: model.safetensors.index.json names {name} "
                                      f"(for {len(users)} tensors, e.g. {users[:2]}) but there is no such file; "
                                      "restore the file or fix the index") from exc
        return self._headers[name]

    def check_files(self) -> None:
        """Check every weight file the index names, by its header alone (two range reads each, no
        tensor data): it exists, its header agrees with its size, it holds the tensors the index
        sends to it. Meant for preflight.

        Raises:
            CheckpointError: naming the file (and the tensor) and what would be right; for a
                mixture-of-experts model, also a decoder layer whose router or experts do not
                match the table row (`models.moe.check_layer_layout`).
        """
        by_file: dict[str, list[str]] = {}
        for k, fname in self.weight_map.items():
            by_file.setdefault(fname, []).append(k)
        for fname, names in sorted(by_file.items()):
            absent = sorted(set(names) - set(self._header(fname).tensors))
            if absent:
                raise CheckpointError(f"{uri.display(self._location(fname))}: model.safetensors.index.json puts tensor "
                                      f"'{absent[0]}' ({len(absent)} in all) in this file, but its header has no such "
                                      "tensor; fix the index or restore the file")
        self._check_moe_layout()

    def _check_moe_layout(self) -> None:
        """Every MoE decoder layer's tensor names match the table's `MoESpec` row (`models.moe`)."""
        if self.spec.moe is None:
            return
        from raycompress.models.moe import check_layer_layout, is_moe_layer, num_experts

        n = num_experts(self.config, self.spec)
        layers = _get_submodule(self.skeleton, self.spec.layers)
        by_layer: dict[str, list[str]] = {}
        for k in self.weight_map:  # one pass: "model.layers.7.mlp.gate.weight" -> "7": ["mlp.gate.weight"]
            if k.startswith(self.spec.layers + "."):
                idx, _, rest = k[len(self.spec.layers) + 1:].partition(".")
                by_layer.setdefault(idx, []).append(rest)
        for i in range(self.num_layers):
            if is_moe_layer(layers[i], self.spec):
                check_layer_layout(by_layer.get(str(i), []), self.spec, n, f"{uri.display(self.ref.location)} layer {i}")

    def _file(self, name: str) -> Path:
        """A weight file of the checkpoint on this node (fetched into the node cache if remote), its
        header checked once per process before safetensors opens it.

        Raises:
            CheckpointError: the file is missing or its header is malformed.
        """
        if self._root_is_local():
            self._header(name)  # the stored file is the local one
            return self.model_dir / name
        path = self.ref.weight_file(name)
        if name not in self._checked:
            read_header(str(path), f"{uri.display(self._location(name))} (cached at {path})")
            self._checked.add(name)
        return path

    def _stored_dtype(self) -> torch.dtype:
        """The dtype of the first floating-point tensor of a decoder layer (else of any tensor),
        from the safetensors headers (no tensor data read)."""
        layer0 = [k for k in self.weight_map if k.startswith(self.spec.layers + ".0.")] or list(self.weight_map)
        for k in sorted(layer0):
            dt = _DTYPES.get(self._header(self.weight_map[k]).tensors.get(k, {}).get("dtype"))
            if dt is not None:
                return dt
        return torch.float32

    def read_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """All tensors whose name starts with `prefix + '.'`, keyed without the prefix, each checked
        for NaN/Inf as loaded (in memory, no second read).

        Raises:
            KeyError: no tensor has that prefix.
            CheckpointError: a tensor holds NaN/Inf (naming it, its file and the count), or its
                file is missing or malformed.
        """
        keys = [k for k in self.weight_map if k.startswith(prefix + ".")]
        if not keys:
            raise KeyError(f"{uri.display(self.ref.location)}: no weights under '{prefix}'")
        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.weight_map[k], []).append(k)
        out: dict[str, torch.Tensor] = {}
        for fname, names in sorted(by_file.items()):
            with safe_open(str(self._file(fname)), framework="pt", device=_st_device(self.device)) as f:
                for k in names:
                    t = f.get_tensor(k)
                    cast = t.to(self.dtype) if t.is_floating_point() else t
                    check_finite(k, cast, uri.display(self._location(fname)), cast_from=t if cast is not t else None)
                    out[k[len(prefix) + 1 :]] = cast
        return out

    def layer_prefix(self, idx: int) -> str:
        return f"{self.spec.layers}.{idx}"

    def load_module(self, dotted: str) -> nn.Module:
        """A copy of skeleton module `dotted` with real weights from disk (tied weights resolved).

        Raises:
            KeyError: the module's weights are not in the checkpoint.
        """
        meta = _get_submodule(self.skeleton, dotted)
        module = _clone_meta(meta)
        try:
            state = self.read_tensors(dotted)
        except KeyError:
            state = self._tied_fallback(dotted)
        if self._is_layer(dotted):
            state = self._to_live(state)
        module.load_state_dict(state, assign=True, strict=True)
        return module.eval()

    def _is_layer(self, dotted: str) -> bool:
        head, _, idx = dotted.rpartition(".")
        return head == self.spec.layers and idx.isdigit()

    def _to_live(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A decoder layer's tensors in the live module's layout: an MoE checkpoint's per-expert
        tensors fused (`models.moe.to_live`); others unchanged."""
        if self.spec.moe is None:
            return state
        from raycompress.models.moe import num_experts, to_live

        return to_live(state, self.spec, num_experts(self.config, self.spec))

    def _tied_fallback(self, dotted: str) -> dict[str, torch.Tensor]:
        if dotted == "lm_head" and getattr(self.config, "tie_word_embeddings", False):
            return self.read_tensors(self.spec.embed[0])
        raise KeyError(f"{uri.display(self.ref.location)}: no weights under '{dotted}'")

    def load_layer(self, idx: int) -> nn.Module:
        """Decoder layer `idx` with its weights read from disk, in eval mode."""
        return self.load_module(self.layer_prefix(idx))

    def load_layer_from_shard(self, idx: int, shard: str | Path, scheme=None) -> nn.Module:
        """Decoder layer `idx` with weights from a shard we wrote (full checkpoint names), read from
        its location (local or URI); quantized linears are dequantized with `scheme`
        (`models.quantized.Scheme`), their activation and KV-cache scales dropped. MoE experts may
        be stored fused (the live module's state_dict names) or per expert (the checkpoint's)."""
        from safetensors.torch import load

        prefix = self.layer_prefix(idx) + "."
        if uri.is_local(shard):  # memory-mapped: only this layer's tensors are paged in
            with safe_open(str(uri.local_path(shard)), framework="pt") as f:
                state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        else:
            state = {k[len(prefix):]: v for k, v in load(uri.read_bytes(shard)).items() if k.startswith(prefix)}
        if scheme is not None:
            from raycompress.models.quantized import unpack

            state = unpack(state, scheme)
        state = self._to_live({k: v.to(self.device, self.dtype) for k, v in state.items()})
        module = _clone_meta(self.skeleton.get_submodule(self.layer_prefix(idx)))
        _reshape_meta(module, state)  # structured pruning may have shrunk some linears
        module.load_state_dict(state, assign=True, strict=True)
        return module.eval()

    def read_outside_layers(self) -> dict[str, torch.Tensor]:
        """Every checkpoint tensor not under the decoder layers, with its full name, in its stored dtype.

        Raises:
            CheckpointError: a tensor holds NaN/Inf (naming it, its file and the count).
        """
        prefix = self.spec.layers + "."
        out: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for k, fname in self.weight_map.items():
            if not k.startswith(prefix):
                by_file.setdefault(fname, []).append(k)
        for fname, names in sorted(by_file.items()):
            with safe_open(str(self._file(fname)), framework="pt") as f:
                for k in names:
                    out[k] = f.get_tensor(k)
                    check_finite(k, out[k], uri.display(self._location(fname)))
        return out

    @torch.no_grad()
    def layer_inputs(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """What the model feeds decoder layer 0 for `input_ids` (b, seq): (hidden (b, seq, d), kwargs).

        The skeleton runs with only the modules before the layers materialised (the table's
        `embed` modules and the rotary embedding); a hook on layer 0 records its inputs and stops
        the forward. Any architecture's own input preparation (positions, masks, scaling) is
        thereby reproduced without being restated here.
        """
        if not self._inputs_ready:
            for path in self.spec.embed:
                self.skeleton.set_submodule(path, self.load_module(path))
            if self.spec.rotary is not None:
                self.skeleton.set_submodule(self.spec.rotary, self.rotary().to(self.device))
            self._inputs_ready = True
        captured: dict = {}

        def hook(module, args, kwargs):
            captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
            captured["kwargs"] = {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS}
            raise _Captured

        handle = _get_submodule(self.skeleton, self.layer_prefix(0)).register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.skeleton(input_ids=input_ids.long().to(self.device), use_cache=False)
        except _Captured:
            pass
        finally:
            handle.remove()
        return captured["hidden"], captured["kwargs"]

    def release_inputs(self) -> None:
        """Free the embedding modules that `layer_inputs` materialised (the small rotary module stays)."""
        if not self._inputs_ready:
            return
        for path in self.spec.embed:
            _get_submodule(self.skeleton, path).to("meta")
        self._inputs_ready = False

    def rotary(self) -> nn.Module | None:
        """The rotary-embedding module, rebuilt on CPU (its buffers are computed, not stored)."""
        if self.spec.rotary is None:
            return None
        meta = _get_submodule(self.skeleton, self.spec.rotary)
        return type(meta)(config=self.config)


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def _st_device(device: torch.device) -> str:
    """safetensors' device string: "cpu", or "cuda:N"."""
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return device.type


class _Captured(Exception):
    """Raised by the layer-0 hook once the layer inputs are recorded."""


_DROP_KWARGS = {"past_key_value", "past_key_values", "use_cache", "output_attentions", "cache_position"}


def _reshape_meta(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give meta parameters of `module` the shapes found in `state` (same names), so that a layer
    whose FFN was shrunk loads into the original skeleton."""
    for name, param in list(module.named_parameters()):
        t = state.get(name)
        if t is not None and t.shape != param.shape:
            owner, _, leaf = name.rpartition(".")
            sub = module.get_submodule(owner) if owner else module
            setattr(sub, leaf, nn.Parameter(torch.empty(t.shape, device="meta"), requires_grad=False))


def _clone_meta(meta: nn.Module) -> nn.Module:
    """A fresh module of the same class and config as `meta`, still on the meta device."""
    import copy

    return copy.deepcopy(meta)
