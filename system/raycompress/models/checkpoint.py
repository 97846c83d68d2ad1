"""Writing a merged Hugging Face checkpoint: one safetensors shard per decoder layer, plus one for
the modules outside the layers, an index, config and tokenizer files, and a SHA-256 manifest.

The folder may be local or a URI (`storage.uri`). Every file is written atomically (a local
temporary file renamed, or one object upload), so a shard that exists is whole; the manifest is
written last and publishes the checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors.torch import save

from raycompress.storage import uri

# files copied verbatim from the source model folder, when present
SIDECAR_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
)


def shard_name(index: int, total: int) -> str:
    """The conventional shard file name, 1-based: model-00001-of-00031.safetensors."""
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding NaN or Inf (checked in row blocks: no full-size temporaries)."""
    from raycompress.finite import count_nonfinite

    return [k for k, t in tensors.items() if count_nonfinite(t)]


def write_shard(tensors: dict[str, torch.Tensor], location: str | os.PathLike) -> dict:
    """Save `tensors` (name -> CPU tensor) at `location` (a local path or URI) atomically and
    durably, checked for NaN/Inf and hashed from the serialized bytes already in memory (no re-read).

    Returns:
        {"path", "sha256", "bytes", "keys"}: `path` without a URI's query, `keys` the tensor names.
    Raises:
        ValueError: a tensor holds NaN or Inf (named); nothing is written.
    """
    bad = nonfinite(tensors)
    if bad:
        raise ValueError(f"{uri.name(location)}: non-finite values in {bad[:10]}{' ...' if len(bad) > 10 else ''}")
    data = save({k: v.detach().contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    digest = hashlib.sha256(data).hexdigest()
    size = uri.write_bytes(location, data)
    return {"path": uri.display(location), "sha256": digest, "bytes": size, "keys": sorted(tensors)}


def _read_shard(location: str) -> tuple[list[str], list[str], str, int]:
    """(tensor names, names holding NaN/Inf, sha256, bytes) of a shard we did not just write."""
    from safetensors.torch import load

    data = uri.read_bytes(location)
    tensors = load(data)
    return sorted(tensors), nonfinite(tensors), hashlib.sha256(data).hexdigest(), len(data)


def finalize_checkpoint(out: str | os.PathLike, source, shard_names: list[str], config_updates: dict | None = None,
                        written: dict[str, dict] | None = None) -> dict:
    """Write the index, copy config and tokenizer files from the source model, and last the
    manifest of every file's SHA-256, which publishes the checkpoint (a reader that finds
    `manifest.sha256.json` finds every file it lists whole).

    Args:
        out: the checkpoint folder (local path or URI).
        source: the source model (`models.fetch.ModelRef`, or a local folder).
        shard_names: the safetensors files in `out`, in order.
        config_updates: e.g. a compressed-tensors "quantization_config" block, or a shrunk
            "intermediate_size", written into config.json.
        written: shard name -> `write_shard`'s record ({"sha256", "bytes", "keys"}): those shards
            were checked and hashed when written and are not read again; others are read here.
    Returns:
        the manifest {"files": {name: sha256}, "total_size": bytes}.
    Raises:
        ValueError: a shard holds NaN or Inf (the tensors are named).
    """
    from raycompress.models.fetch import ModelRef

    out = str(out)
    written = dict(written or {})
    weight_map: dict[str, str] = {}
    hashes: dict[str, str] = {}
    total, bad = 0, []
    for name in shard_names:
        rec = written.get(name)
        if rec is None or "keys" not in rec:
            keys, nan, digest, size = _read_shard(uri.join(out, name))
            rec, bad = {"keys": keys, "sha256": digest, "bytes": size}, bad + nan
        weight_map.update({k: name for k in rec["keys"]})
        hashes[name], total = rec["sha256"], total + rec["bytes"]
    if bad:
        raise ValueError(f"{uri.display(out)}: non-finite values in {bad[:10]}{' ...' if len(bad) > 10 else ''}")
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    files = {"model.safetensors.index.json": json.dumps(index, indent=2).encode()}
    src = (source if isinstance(source, ModelRef) else ModelRef(str(source))).local(weights=False)
    for name in SIDECAR_FILES:
        if (src / name).is_file():
            files[name] = (src / name).read_bytes()
    if config_updates:
        cfg = json.loads(files["config.json"])
        cfg.update(config_updates)
        files["config.json"] = json.dumps(cfg, indent=2).encode()
    for name, data in files.items():
        uri.write_bytes(uri.join(out, name), data)
        hashes[name] = hashlib.sha256(data).hexdigest()
    manifest = {"files": dict(sorted(hashes.items())), "total_size": total}
    uri.write_text(uri.join(out, "manifest.sha256.json"), json.dumps(manifest, indent=2))
    return manifest
