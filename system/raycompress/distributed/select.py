"""Select stage on Ray Data: read corpora, parse and count rejects, tokenize and pack into
candidate windows in parallel, then pick the calibration set per source with a registered method.

Writes `calibration.parquet` (input_ids, source, doc_id, doc_ids, score) and `manifest.json`
(inputs with sha256, config, seed, selected ids, skip counts, fingerprint).
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raycompress.config import JobConfig
from raycompress.data.corpus import parse_jsonl_batch
from raycompress.data.tokenize import TokenizePack
from raycompress.models.checkpoint import sha256_file, write_atomic_text
from raycompress.registry import SELECTORS
from raycompress.selection.mix import quotas

log = logging.getLogger(__name__)


class SelectionError(ValueError):
    """A corpus path matches nothing, has no usable documents, or is too small for its quota."""


def _expand(job: JobConfig, name: str) -> list[str]:
    pattern = str(job.resolve(job.select.sources[name].path))
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise SelectionError(f"select.sources.{name}.path: no file matches {pattern}")
    return paths


def _windows(job: JobConfig, name: str, paths: list[str], model_dir: Path, concurrency: int):
    """(windows rows, skip counts by reason) for one source, computed with Ray Data."""
    import ray.data

    src = job.select.sources[name]
    docs = ray.data.read_text(paths, include_paths=True).map_batches(
        parse_jsonl_batch, batch_size=256, batch_format="numpy",
        fn_kwargs={"source": name, "text_field": src.text_field, "max_chars": src.max_doc_chars},
    ).materialize()
    counts = {r["reason"]: int(r["count()"]) for r in docs.groupby("reason").count().take_all()}
    skipped = {k: v for k, v in counts.items() if k}
    if not counts.get(""):
        raise SelectionError(f"select.sources.{name}: no usable documents in {paths} (skipped: {skipped})")
    windows = docs.map_batches(
        TokenizePack, batch_size=64, batch_format="numpy", concurrency=concurrency,
        fn_constructor_kwargs={"model_dir": str(model_dir), "seq_len": job.select.seq_len},
    ).take_all()
    return windows, skipped


def run_select(job: JobConfig, model_dir: Path, out_dir: Path, concurrency: int = 1) -> dict:
    """Run selection and write the calibration set into `out_dir`; returns the manifest.

    Raises:
        SelectionError: a path matches nothing, a source has no usable documents, or a source has
            fewer candidate windows than its quota (the numbers are in the message).
    """
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True  # deterministic
    sel = job.select
    want = quotas(sel.n_samples, sel.mix)
    select_fn = SELECTORS.get(sel.method)
    rows, inputs, skipped, pool_sizes = [], [], {}, {}
    for i, name in enumerate(sorted(sel.sources)):
        if want.get(name, 0) == 0:
            continue
        paths = _expand(job, name)
        inputs += [{"source": name, "path": p, "bytes": Path(p).stat().st_size, "sha256": sha256_file(Path(p))} for p in paths]
        windows, skipped[name] = _windows(job, name, paths, model_dir, concurrency)
        pool_sizes[name] = len(windows)
        if len(windows) < want[name]:
            raise SelectionError(
                f"select.sources.{name}: {len(windows)} candidate windows of {sel.seq_len} tokens, "
                f"fewer than the {want[name]} asked for"
            )
        chosen, scores = select_fn([w["concepts"] for w in windows], want[name], sel.seed + i, sel.candidate_pool)
        for j, s in zip(chosen, scores):
            w = windows[j]
            rows.append({"input_ids": np.asarray(w["input_ids"], dtype=np.int32).tolist(), "source": name,
                         "doc_id": str(w["doc_ids"][0]), "doc_ids": [str(d) for d in w["doc_ids"]],
                         "window": int(j), "score": float(s), "n_concepts": int(len(w["concepts"]))})
    return _write_outputs(job, out_dir, rows, inputs, skipped, pool_sizes, want)


def _write_outputs(job, out_dir, rows, inputs, skipped, pool_sizes, want) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("input_ids", pa.list_(pa.int32())), ("source", pa.string()), ("doc_id", pa.string()),
        ("doc_ids", pa.list_(pa.string())), ("window", pa.int64()), ("score", pa.float64()),
        ("n_concepts", pa.int64()),
    ]))
    pq.write_table(table, out_dir / "calibration.parquet")
    config = {"model": job.model, "select": job.select.model_dump(mode="json")}
    selected = [{"source": r["source"], "window": r["window"], "doc_id": r["doc_id"]} for r in rows]
    fp_src = json.dumps({"inputs": [x["sha256"] for x in inputs], "config": config}, sort_keys=True)
    manifest = {
        "fingerprint": hashlib.sha256(fp_src.encode()).hexdigest(),
        "inputs": inputs, "config": config, "seed": job.select.seed, "quotas": want,
        "candidate_windows": pool_sizes, "skipped": skipped, "selected": selected,
        "calibration_sha256": sha256_file(out_dir / "calibration.parquet"),
    }
    write_atomic_text(out_dir / "manifest.json", json.dumps(manifest, indent=2))
    log.info("selected %d sequences of %d tokens: %s", len(rows), job.select.seq_len, want)
    return manifest


def load_calibration(path: Path):
    """(input_ids (n, seq) int64 tensor, table) from a calibration Parquet file.

    Raises:
        FileNotFoundError: the file is missing (run the select stage first).
    """
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `raycompress select` first")
    table = pq.read_table(path)
    ids = torch.tensor(table.column("input_ids").to_pylist(), dtype=torch.long)
    return ids, table
