"""Parse raw corpus records into documents, with a skip reason for every bad one.

`parse_records` is a Ray Data batch function over `distributed.readers.CorpusDatasource` rows
{path, shard, row, raw, pre_reason[, fmt]}. It returns document rows {source, path, shard, row,
doc_id, text, reason, hash, detail}: `reason` is "" for a usable document, else one of
SKIP_REASONS; `hash` is the SHA-256 (first 16 hex digits) of the text, used for exact
de-duplication; `detail` is the error text of an "unreadable_file" record ("" otherwise). Nothing
is dropped here, so callers can both count rejects (by reason and by file) and filter them.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import PurePosixPath
from typing import Any

# Reasons a record is skipped. The reader's own (`data.records`): blank_line, empty_file,
# unreadable_file, and too_long / missing_field / not_text where it can tell; select: duplicate.
SKIP_REASONS = ("not_utf8", "malformed_json", "not_an_object", "missing_field", "not_text",
                "empty", "too_long", "duplicate", "blank_line", "empty_file", "unreadable_file")
READER_REASONS = ("blank_line", "empty_file", "unreadable_file")
OUTPUT_COLUMNS = ("source", "path", "shard", "row", "doc_id", "text", "reason", "hash", "detail")


def _utf8(s: str) -> bool:
    """Whether `s` encodes to UTF-8 (JSON may hold lone surrogates, which do not)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_doc(raw: bytes, text_field: str) -> tuple[str, str, str]:
    """(doc_id, text, reason) for one JSONL line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "", "", "not_utf8"
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        return "", "", "malformed_json"
    if not isinstance(obj, dict):
        return "", "", "not_an_object"
    doc_id = str(obj.get("id", ""))
    doc_id = doc_id if _utf8(doc_id) else ""
    if text_field not in obj:
        return doc_id, "", "missing_field"
    if not isinstance(obj[text_field], str):
        return doc_id, "", "not_text"
    if not _utf8(obj[text_field]):
        return doc_id, "", "not_utf8"
    return doc_id, obj[text_field], ""


def _plain_doc(raw: bytes) -> tuple[str, str, str]:
    try:
        return "", raw.decode("utf-8"), ""
    except UnicodeDecodeError:
        return "", "", "not_utf8"


def parse_records(batch: dict[str, Any], source: str, fmt: str, text_field: str, max_chars: int) -> dict[str, list]:
    """Ray Data batch fn: raw records -> document rows with a skip `reason` ("" = usable).

    A row is parsed as JSON when its `fmt` column (else the `fmt` argument) is "jsonl", as
    plain UTF-8 text otherwise. A document with no "id" (or one that is not valid Unicode) gets
    `<file name>:<row>`. Reasons are checked in order: the reader's own (`pre_reason`), bytes
    not UTF-8 (or JSON text with lone surrogates), JSON malformed (NUL bytes included) / not an
    object / field missing / not a string, empty or whitespace-only text, more than `max_chars`
    characters. Raises nothing for any bytes.
    """
    out: dict[str, list] = {k: [] for k in OUTPUT_COLUMNS}
    n = len(batch["row"])
    fmts = batch["fmt"] if "fmt" in batch else [fmt] * n
    for path, shard, row, raw, pre, f in zip(batch["path"], batch["shard"], batch["row"], batch["raw"],
                                            batch["pre_reason"], fmts):
        if pre:
            doc_id, text, reason = "", "", str(pre)
        elif (f or fmt) == "jsonl":
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
        out["detail"].append(bytes(raw).decode("utf-8", "replace") if pre == "unreadable_file" else "")
    return out
