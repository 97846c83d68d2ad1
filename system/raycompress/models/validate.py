"""Checks of an untrusted model folder, made from what is read anyway.

A model folder is data, never code: `config.json` is read as JSON and refused when it asks for
remote code (`auto_map`) or names a model type / architecture outside `models.arch.ARCHITECTURES`;
every safetensors header (the 8-byte length and the JSON after it, two range reads, no tensor
data) is checked against the file's size before any tensor is opened; and every tensor is checked
for NaN/Inf when it is loaded for compression (in memory already, so no second read).

Every refusal is a `CheckpointError` whose message names the file (and the tensor) and says what
would be right. It is deterministic: the same folder fails the same way on every try, on any node.
"""
from __future__ import annotations

import json
import math
from typing import NamedTuple

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header
# bits per element of every safetensors dtype (sub-byte float types included)
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6,
              "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
              "I64": 64, "U64": 64, "F64": 64, "C64": 64}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class CheckpointError(ValueError):
    """A model folder raycompress refuses (remote code, an unsupported architecture, a missing or
    malformed safetensors file, NaN/Inf weights). The message names the file, and the tensor where
    there is one, and what would be right. Deterministic: retrying on the same folder cannot help."""


class Header(NamedTuple):
    """A safetensors file's header: `tensors` (name -> {dtype, shape, data_offsets}, without
    `__metadata__`), `raw` (the JSON bytes as stored), `data_start` (8 + header length) and
    `file_size` (bytes)."""

    tensors: dict
    raw: bytes
    data_start: int
    file_size: int


def _span(entry, name: str, tensor: str) -> tuple[int, int]:
    """(begin, end) of one header entry, checked against its dtype and shape."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise CheckpointError(f"{name}: tensor '{tensor}': header entry {str(entry)[:100]} lacks dtype, shape "
                              "or data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BITS:
        raise CheckpointError(f"{name}: tensor '{tensor}': unknown dtype {dtype!r}; safetensors dtypes: "
                              f"{sorted(DTYPE_BITS)}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise CheckpointError(f"{name}: tensor '{tensor}': shape {shape!r} is not a list of sizes >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{name}: tensor '{tensor}': data_offsets {offsets!r} are not [begin, end] "
                              "with 0 <= begin <= end")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or offsets[1] - offsets[0] != bits // 8:
        raise CheckpointError(f"{name}: tensor '{tensor}' is {dtype} {shape}, {bits / 8:g} bytes, but its "
                              f"data_offsets {offsets} span {offsets[1] - offsets[0]} bytes; the header lies "
                              "about the tensor; re-save the file")
    return offsets[0], offsets[1]


def check_safetensors_header(header: dict, file_size: int, name: str, header_len: int) -> None:
    """Check a parsed safetensors header against the file it came from, as safetensors would
    before reading, but naming the tensor: each entry's dtype x shape equals its data_offsets
    span, no span reaches past the file (truncated), the spans neither overlap nor leave gaps,
    and they cover the data section (`file_size - 8 - header_len` bytes) exactly.

    Raises:
        CheckpointError: naming `name`, the tensor and what the header and the file say.
    """
    data_size = file_size - 8 - header_len
    if data_size < 0:
        raise CheckpointError(f"{name}: header length {header_len} is larger than the file ({file_size} bytes); "
                              "the file is truncated or not safetensors")
    spans = sorted((*_span(entry, name, t), t) for t, entry in header.items() if t != "__metadata__")
    end, prev = 0, None
    for begin, stop, tensor in spans:
        if stop > data_size:
            raise CheckpointError(f"{name}: tensor '{tensor}' has data_offsets [{begin}, {stop}] but the file holds "
                                  f"only {data_size} bytes of tensor data ({file_size} bytes in all): the file is "
                                  "truncated or its header lies; copy the file again from its source")
        if begin < end:
            raise CheckpointError(f"{name}: tensor '{tensor}' data_offsets [{begin}, {stop}] overlap tensor "
                                  f"'{prev}' (which ends at {end}); each tensor needs bytes of its own")
        if begin > end:
            raise CheckpointError(f"{name}: bytes [{end}, {begin}) before tensor '{tensor}' belong to no tensor; "
                                  "safetensors data must be contiguous; re-save the file")
        end, prev = stop, tensor
    if end != data_size:
        raise CheckpointError(f"{name}: the header describes {end} bytes of tensor data but the file holds "
                              f"{data_size} ({file_size - 8 - header_len - end} bytes belong to no tensor); "
                              "re-save the file")


def parse_header(f, file_size: int, name: str) -> Header:
    """The checked header of an open safetensors file `f` (anything with `read_at(n, offset)`, e.g.
    a pyarrow input file) of `file_size` bytes: two reads, none of the tensor data.

    Raises:
        CheckpointError: the file is too short, its header length is larger than the file or
            safetensors' limit, the header is not a JSON object, or `check_safetensors_header` fails.
    """
    if file_size < 8:
        raise CheckpointError(f"{name}: {file_size} bytes; a safetensors file starts with an 8-byte header length")
    n = int.from_bytes(f.read_at(8, 0), "little")
    if n > file_size - 8:
        raise CheckpointError(f"{name}: header length {n} is larger than the file ({file_size} bytes); the file "
                              "is truncated or not safetensors")
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{name}: header length {n} exceeds safetensors' limit of {MAX_HEADER_BYTES} bytes; "
                              "the file is not safetensors")
    raw = f.read_at(n, 8)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{name}: the safetensors header is not JSON ({exc}); the file is corrupt") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: the safetensors header is not a JSON object; the file is corrupt")
    check_safetensors_header(header, file_size, name, n)
    return Header({k: v for k, v in header.items() if k != "__metadata__"}, bytes(raw), 8 + n, file_size)


def read_header(location: str, name: str | None = None) -> Header:
    """The checked header of the safetensors file at `location` (local path or URI), by range reads.

    Raises:
        FileNotFoundError: no file at `location`.
        CheckpointError: see `parse_header`.
    """
    from raycompress.storage import uri

    fs, path = uri.resolve(location)
    with fs.open_input_file(path) as f:
        return parse_header(f, f.size(), name or uri.name(location))


def check_config(cfg: dict, folder: str, file: str = "config.json") -> None:
    """Refuse a config (as parsed JSON) that asks for code from the folder or names a model this
    tool does not handle. `folder` is the model's location for messages.

    Raises:
        CheckpointError: `auto_map` present (remote code), or the file is not a JSON object.
        UnsupportedArchitectureError (a CheckpointError): `model_type` unknown or unsupported, no
            supported class in `architectures`, or the two disagree (only for config.json).
    """
    from raycompress.models.arch import ARCHITECTURES, MODEL_TYPES, UnsupportedArchitectureError

    supported = f"supported architectures: {sorted(ARCHITECTURES)}"
    if not isinstance(cfg, dict):
        raise CheckpointError(f"model folder {folder}: {file} is not a JSON object")
    if "auto_map" in cfg:
        amap = cfg["auto_map"]
        asks = ", ".join(f"{k}: {v}" for k, v in amap.items()) if isinstance(amap, dict) else repr(amap)
        raise CheckpointError(f"model folder {folder} asks for remote code via auto_map in {file} ({asks[:200]}); "
                              f"raycompress never runs code from a model folder; {supported}")
    if file != "config.json":
        return
    types = MODEL_TYPES  # model_type -> the class transformers builds
    mtype, archs = cfg.get("model_type"), list(cfg.get("architectures") or [])
    known = [a for a in archs if a in ARCHITECTURES]
    if mtype not in types:
        raise UnsupportedArchitectureError(
            f"model folder {folder}: config.json model_type {mtype!r} is not supported "
            f"(supported model types: {sorted(types)}); {supported}")
    if not known:
        raise UnsupportedArchitectureError(f"model folder {folder}: config.json architectures "
                                           f"{archs or '<missing>'} names no supported architecture; {supported}")
    if types[mtype] not in known:
        raise UnsupportedArchitectureError(f"model folder {folder}: config.json model_type {mtype!r} builds "
                                           f"{types[mtype]} but architectures says {archs}; make them agree")


def check_finite(tensor: str, t, file: str, cast_from=None) -> None:
    """Refuse a loaded tensor holding NaN/Inf. `cast_from`: the tensor as stored, when `t` is a
    cast of it (then a finite stored tensor names the cast as the cause).

    Raises:
        CheckpointError: naming the tensor, the file and how many values are not finite.
    """
    from raycompress.finite import count_nonfinite

    if not count_nonfinite(t):
        return
    stored = count_nonfinite(cast_from if cast_from is not None else t)
    if stored:
        raise CheckpointError(f"{file}: tensor '{tensor}' holds {stored} non-finite values (NaN/Inf) of "
                              f"{t.numel()}; the checkpoint is corrupt; restore the file from its source")
    raise CheckpointError(f"{file}: tensor '{tensor}' has {count_nonfinite(t)} values beyond the range of {t.dtype} "
                          f"(stored as {cast_from.dtype}); load it in its stored dtype")
