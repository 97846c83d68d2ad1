"""Parse raw corpus records into documents, with a skip reason for every bad one.

`parse_records` is a Ray Data batch function over `data.readers.CorpusDatasource` rows
{path, shard, row, raw, pre_reason}. It returns document rows {source, path, shard, row, doc_id,
text, reason, hash}: `reason` is "" for a usable document, else one of SKIP_REASONS; `hash` is
the SHA-256 (first 16 hex digits) of the text, used for exact de-duplication. Nothing is dropped
here, so callers can both count rejects (by reason and by file) and filter them.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import PurePosixPath
from typing import Any

SKIP_REASONS = ("not_utf8", "malformed_json", "not_an_object", "missing_field", "not_text",
                "empty", "too_long", "duplicate")


def _json_doc(raw: bytes, text_field: str) -> tuple[str, str, str]:
    """(doc_id, text, reason) for one JSONL line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "", "", "not_utf8"
    try:
        obj = json.loads(line)
    except ValueError:
        return "", "", "malformed_json"
    if not isinstance(obj, dict):
        return "", "", "not_an_object"
    doc_id = str(obj.get("id", ""))
    if text_field not in obj:
        return doc_id, "", "missing_field"
    if not isinstance(obj[text_field], str):
        return doc_id, "", "not_text"
    return doc_id, obj[text_field], ""


def _plain_doc(raw: bytes) -> tuple[str, str, str]:
    try:
        return "", raw.decode("utf-8"), ""
    except UnicodeDecodeError:
        return "", "", "not_utf8"


def parse_records(batch: dict[str, Any], source: str, fmt: str, text_field: str, max_chars: int) -> dict[str, list]:
    """Ray Data batch fn: raw records -> document rows with a skip `reason` ("" = usable).

    A document with no "id" gets `<file name>:<row>`. Reasons are checked in order: the reader's
    own (parquet column missing), bytes not UTF-8, JSON malformed / not an object / field missing /
    not a string, empty or whitespace-only text, more than `max_chars` characters.
    """
    out: dict[str, list] = {k: [] for k in ("source", "path", "shard", "row", "doc_id", "text", "reason", "hash")}
    for path, shard, row, raw, pre in zip(batch["path"], batch["shard"], batch["row"], batch["raw"], batch["pre_reason"]):
        if pre:
            doc_id, text, reason = "", "", str(pre)
        elif fmt == "jsonl":
            doc_id, text, reason = _json_doc(bytes(raw), text_field)
        else:
            doc_id, text, reason = _plain_doc(bytes(raw))
        if not reason and not text.strip():
            reason, text = "empty", ""
        if not reason and len(text) > max_chars:
            reason, text = "too_long", ""
        out["source"].append(source)
        out["path"].append(str(path))
        out["shard"].append(int(shard))
        out["row"].append(int(row))
        out["doc_id"].append(doc_id or f"{PurePosixPath(str(path)).name}:{int(row)}")
        out["text"].append(text)
        out["reason"].append(reason)
        out["hash"].append(hashlib.sha256(text.encode("utf-8")).hexdigest()[:16] if not reason else "")
    return out
