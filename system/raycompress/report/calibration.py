"""The calibration set's composition for reports: per-source counts, sequence lengths, top concepts.

Reads `select/manifest.json` and `select/calibration.parquet` of a run folder, a local path or a
URI (`storage.uri`). Top concepts are the most frequent tokens of the calibration set decoded with
the model's tokenizer (`tokenizer.json` of the compressed checkpoint, else of the job's model: a
folder, URI or alias resolved by `models.fetch.resolve_model`, its metadata fetched into the
node cache of `storage.cache_dir`), leaving out special tokens, pure punctuation or digits, tokens
shorter than 3 characters and common English function words; without a tokenizer the panel lists
nothing and says why.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
from collections import Counter
from pathlib import Path

from raycompress.storage import uri

log = logging.getLogger(__name__)

TOP_CONCEPTS = 20
_STOPWORDS = frozenset(
    "the and for that with this from are was were has have had not but its their they them our can "
    "which who whom what when where how all any each also more most other some such than then there "
    "these those into over under been being will would should could may might must about after "
    "before between both during only own same very you your his her him she one two per".split())


def _tokenizer_file(out_dir: str, config: dict) -> tuple[Path, str] | None:
    """A local tokenizer.json: the compressed model's (`compress/model` of the run), else the job
    model's (`config["model"]` resolved against `config["base_dir"]`; an alias is converted into
    the node cache if it is not there yet), as (local path, location shown in the report). None,
    with the reason logged, when neither has one or the model cannot be found or fetched: a report
    never fails for want of a tokenizer."""
    from raycompress.models.fetch import ModelRef, resolve_model

    cache_dir = (config.get("storage") or {}).get("cache_dir")
    compressed = uri.join(out_dir, "compress", "model")
    try:
        if uri.is_file(uri.join(compressed, "tokenizer.json")):
            ref = ModelRef(compressed, cache_dir)
        elif config.get("model"):
            ref = resolve_model(str(config["model"]), config.get("base_dir") or ".", cache_dir)
        else:
            return None
        path = ref.local(weights=False) / "tokenizer.json"
    except Exception as exc:  # a missing folder, an unreachable bucket, a failed alias conversion
        log.warning("report: no tokenizer to decode calibration concepts: %s", exc)
        return None
    return (path, uri.display(uri.join(ref.location, "tokenizer.json"))) if path.is_file() else None


_WORD_START = ("Ġ", "▁")  # byte-level BPE / SentencePiece marks of a token that starts a word


def _is_concept(text: str, raw: str, marked: bool) -> bool:
    """A word (not a piece of one when the vocabulary marks word starts) of 3+ characters, not a function word."""
    word = text.strip().lstrip("".join(_WORD_START))
    if marked and not raw.startswith(_WORD_START):
        return False
    return len(word) >= 3 and any(ch.isalpha() for ch in word) and word.lower() not in _STOPWORDS


def top_concepts(counts: Counter, tokenizer_path: Path | None, k: int = TOP_CONCEPTS,
                 source: str | None = None) -> dict:
    """{"tokenizer": `source` (default the path) or None, "note", "items": [{"id", "text", "count"}]} of the
    `k` most frequent concepts; `tokenizer_path` is a local tokenizer.json."""
    if tokenizer_path is None:
        return {"tokenizer": None, "items": [],
                "note": "no tokenizer.json found (compressed model or job model folder): concepts not decoded"}
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    ranked = [(i, c) for i, c in counts.most_common() if i not in special]
    marked = any((tok.id_to_token(i) or "").startswith(_WORD_START) for i, _ in ranked[:200])
    items = []
    for token_id, count in ranked:
        text = tok.decode([token_id])
        if _is_concept(text, tok.id_to_token(token_id) or "", marked):
            items.append({"id": int(token_id), "text": text.strip().lstrip("".join(_WORD_START)), "count": int(count)})
        if len(items) == k:
            break
    return {"tokenizer": source or str(tokenizer_path), "items": items,
            "note": "most frequent word tokens of the calibration set; special tokens, word pieces, punctuation, "
                    "digits, tokens under 3 characters and common function words left out"}


def _sequences(parquet: str) -> list[dict]:
    """The rows of calibration.parquet at a location (read in one request), the columns a report uses."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = pq.ParquetFile(pa.BufferReader(uri.read_bytes(parquet)))
    cols = [c for c in ("input_ids", "source", "doc_ids", "n_concepts") if c in f.schema_arrow.names]
    return f.read(columns=cols).to_pylist()


def _per_source(rows: list[dict], manifest: dict) -> dict:
    by_src: dict[str, list[dict]] = {}
    for r in rows:
        by_src.setdefault(r.get("source", "?"), []).append(r)
    out = {}
    for src in sorted(set(by_src) | set(manifest.get("quotas") or {})):
        seqs = by_src.get(src, [])
        lengths = [len(r["input_ids"]) for r in seqs]
        docs = [len(r.get("doc_ids") or [None]) for r in seqs]
        concepts = [r["n_concepts"] for r in seqs if r.get("n_concepts") is not None]
        out[src] = {
            "sequences": len(seqs), "quota": (manifest.get("quotas") or {}).get(src),
            "usable_documents": (manifest.get("usable_documents") or {}).get(src),
            "tokens": sum(lengths), "lengths": lengths, "docs_per_sequence": docs,
            "distinct_tokens": concepts,
            "median_length": statistics.median(lengths) if lengths else None,
        }
    return out


def _skipped_by_reason(skipped: dict) -> dict:
    """{source: {reason: n}} summed over files; accepts {source: {reason: n}} or {source: {file: {reason: n}}}."""
    out: dict[str, dict[str, int]] = {}
    for src, entries in (skipped or {}).items():
        reasons = out.setdefault(src, {})
        for key, value in entries.items():
            for reason, n in (value.items() if isinstance(value, dict) else [(key, value)]):
                reasons[reason] = reasons.get(reason, 0) + int(n)
    return out


def calibration_summary(out_dir: str | os.PathLike, config: dict) -> dict:
    """The calibration section of report.json ({} fields when the select stage has not run).

    Raises:
        ValueError: manifest.json is not valid JSON.
        OSError: calibration.parquet cannot be read or is not Parquet (pyarrow's ArrowInvalid).
    """
    out_dir = str(out_dir)
    manifest_path = uri.join(out_dir, "select", "manifest.json")
    manifest_bytes = uri.read_bytes(manifest_path) if uri.is_file(manifest_path) else None
    manifest = json.loads(manifest_bytes) if manifest_bytes is not None else {}
    parquet = uri.join(out_dir, "select", "calibration.parquet")
    rows = _sequences(parquet) if uri.is_file(parquet) else []
    counts: dict[str, Counter] = {}
    for r in rows:
        counts.setdefault(r.get("source", "?"), Counter()).update(r["input_ids"])
    tokenizer, source = (_tokenizer_file(out_dir, config) if rows else None) or (None, None)
    concepts = (top_concepts(sum(counts.values(), Counter()), tokenizer, source=source) if rows
                else {"items": [], "note": "no calibration.parquet"})
    concepts["by_source"] = {src: top_concepts(c, tokenizer, TOP_CONCEPTS // 2)["items"] for src, c in sorted(counts.items())}
    return {
        "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest() if manifest_bytes is not None else None,
        "method": manifest.get("method") or (manifest.get("config") or {}).get("select", {}).get("method"),
        "quotas": manifest.get("quotas"),
        "usable_documents": manifest.get("usable_documents"),
        "skipped": _skipped_by_reason(manifest.get("skipped") or {}),
        "sequences": len(rows),
        "sources": _per_source(rows, manifest),
        "top_concepts": concepts,
    }
