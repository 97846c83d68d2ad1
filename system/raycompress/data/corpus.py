"""Parse JSONL lines into documents, counting what is skipped and why.

`parse_jsonl_batch` turns a batch of raw lines (Ray Data `read_text(..., include_paths=True)`
rows: {"text": line, "path": file}) into document rows {source, path, doc_id, text, reason}.
`reason` is "" for a usable document, otherwise one of SKIP_REASONS; nothing is dropped here, so
the caller can both count the rejects and filter them.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

SKIP_REASONS = ("malformed_json", "not_an_object", "missing_field", "not_text", "empty", "too_long")


def _parse_line(line: str, text_field: str, max_chars: int) -> tuple[str, str, str]:
    """(doc_id, text, reason) for one JSONL line."""
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, ValueError):
        return "", "", "malformed_json"
    if not isinstance(obj, dict):
        return "", "", "not_an_object"
    if text_field not in obj:
        return str(obj.get("id", "")), "", "missing_field"
    text = obj[text_field]
    doc_id = str(obj.get("id", ""))
    if not isinstance(text, str):
        return doc_id, "", "not_text"
    if not text.strip():
        return doc_id, "", "empty"
    if len(text) > max_chars:
        return doc_id, "", "too_long"
    return doc_id, text, ""


def parse_jsonl_batch(batch: dict[str, Any], source: str, text_field: str, max_chars: int) -> dict[str, list]:
    """Ray Data batch fn: raw lines -> document rows with a skip `reason` ("" = usable).

    Blank lines are ignored (not counted). A document without an "id" gets the hash of its text.
    """
    out: dict[str, list] = {"source": [], "path": [], "doc_id": [], "text": [], "reason": []}
    paths = batch.get("path", [""] * len(batch["text"]))
    for line, path in zip(batch["text"], paths):
        if not str(line).strip():
            continue
        doc_id, text, reason = _parse_line(str(line), text_field, max_chars)
        if not doc_id and text:
            doc_id = hashlib.sha256(text.encode()).hexdigest()[:16]
        out["source"].append(source)
        out["path"].append(str(path))
        out["doc_id"].append(doc_id)
        out["text"].append(text)
        out["reason"].append(reason)
    return out
