"""Writing a merged Hugging Face checkpoint: one safetensors shard per decoder layer, plus one for
the modules outside the layers, an index, config and tokenizer files, and a SHA-256 manifest.

Shards are written atomically (temporary file, fsync, rename), so a shard that exists is whole.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

# files copied verbatim from the source model folder, when present
SIDECAR_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
)


def shard_name(index: int, total: int) -> str:
    """The conventional shard file name, 1-based: model-00001-of-00031.safetensors."""
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding NaN or Inf (checked in row blocks: no full-size temporaries)."""
    from raycompress.algorithms.obs import all_finite

    return [k for k, t in tensors.items() if t.is_floating_point() and t.numel() and not all_finite(t)]


def write_shard(tensors: dict[str, torch.Tensor], path: str | Path) -> dict:
    """Save `tensors` (name -> CPU tensor) to `path` atomically and durably, checked for NaN/Inf
    and hashed from the serialized bytes already in memory (no re-read).

    Returns:
        {"path", "sha256", "bytes"}.
    Raises:
        ValueError: a tensor holds NaN or Inf (named); nothing is written.
    """
    path = Path(path)
    bad = nonfinite(tensors)
    if bad:
        raise ValueError(f"{path.name}: non-finite values in {bad[:10]}{' ...' if len(bad) > 10 else ''}")
    data = save({k: v.detach().contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    digest = hashlib.sha256(data).hexdigest()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    size = len(data)
    del data
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return {"path": str(path), "sha256": digest, "bytes": size}


def write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def scan_nonfinite(path: Path) -> list[str]:
    """Names of tensors in shard `path` that hold NaN or Inf."""
    with safe_open(str(path), framework="pt") as f:
        return [k for k in f.keys() if nonfinite({k: f.get_tensor(k)})]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def finalize_checkpoint(out_dir: Path, source_dir: Path, shard_files: list[Path], config_updates: dict | None = None,
                        hashes: dict[str, str] | None = None) -> dict:
    """Write the index, copy config and tokenizer files, and the manifest of every file's SHA-256.
    Shards listed in `hashes` (name -> sha256, from `write_shard`) were checked for NaN/Inf and
    hashed when written and are not read again (only their tensor names, from the header);
    other shards are scanned and hashed here.
    `config_updates` (e.g. a compressed-tensors "quantization_config" block, or a shrunk
    "intermediate_size") are written into config.json.

    Returns:
        the manifest {"files": {name: sha256}, "total_size": bytes}; also written to
        `out_dir/manifest.sha256.json`.
    Raises:
        ValueError: a shard holds NaN or Inf (the tensors are named).
    """
    weight_map: dict[str, str] = {}
    total = 0
    bad: list[str] = []
    hashes = dict(hashes or {})
    for shard in shard_files:
        if shard.name not in hashes:
            bad += scan_nonfinite(shard)
        with safe_open(str(shard), framework="pt") as f:
            for k in f.keys():
                weight_map[k] = shard.name
        total += shard.stat().st_size
    if bad:
        raise ValueError(f"{out_dir}: non-finite values in {bad[:10]}{' ...' if len(bad) > 10 else ''}")
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_atomic_text(out_dir / "model.safetensors.index.json", json.dumps(index, indent=2))
    for name in SIDECAR_FILES:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, out_dir / name)
    if config_updates:
        cfg = json.loads((out_dir / "config.json").read_text())
        cfg.update(config_updates)
        write_atomic_text(out_dir / "config.json", json.dumps(cfg, indent=2))
    files = {p.name: hashes.get(p.name) or sha256_file(p) for p in sorted(out_dir.iterdir())
             if p.is_file() and not p.name.startswith("manifest") and not p.name.endswith(".tmp")}
    manifest = {"files": files, "total_size": total}
    write_atomic_text(out_dir / "manifest.sha256.json", json.dumps(manifest, indent=2))
    return manifest
