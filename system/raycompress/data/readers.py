"""Streaming corpus readers for Ray Data: JSONL (.gz/.zst), Parquet, and plain text.

`CorpusDatasource` reads each file as a stream and yields blocks of at most `shard_docs` raw
records, tagged (path, shard, row). A shard is therefore defined by the data (the file and the
record's position in it), not by how many workers run, which keeps selection deterministic on 1 or
N workers. Records are not parsed here: `data.corpus.parse_records` does that and counts what is
bad. Compression (.gz, .zst, .bz2) is inferred from the extension by Ray's file reader; sources
may be local paths, globs, or URIs pyarrow's filesystems open (s3://, gs://, hdfs://, file://,
globs included), read on whichever node runs the read task.

The `path` of a record is the file's *label*: its path relative to the non-wildcard root of the
source's pattern (a single file: its name), never where it happens to be stored, so that record
ids, duplicate keys and fingerprints are the same on any node, clone or bucket.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from raycompress.storage import uri

FORMATS = ("jsonl", "parquet", "text", "text_blocks")
_READ_CHUNK = 8 << 20  # bytes per read() while streaming lines


class CorpusPathError(FileNotFoundError):
    """A source path matches no file, or names an unknown format."""


def infer_format(path: str) -> str:
    """Format from the file name, ignoring a compression suffix: jsonl, parquet or text."""
    name = path.lower()
    for suffix in (".gz", ".zst", ".zstd", ".bz2"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".txt", ".text", ".md")):
        return "text"
    raise CorpusPathError(f"{path}: cannot infer the format; set `format` to one of {FORMATS}")


def expand_paths(spec: str, base: str | Path) -> dict[str, str]:
    """The files a source names (a path, glob or URI; relative ones against `base`), sorted:
    location (in the spec's own form) -> label (its path below the pattern's non-wildcard
    folder; a plain file: its name). See `storage.uri.glob_relative`.

    Raises:
        CorpusPathError: nothing matches (the pattern is named, a URI without its query).
    """
    found = dict(uri.glob_relative(spec, base))
    if not found:
        shown = spec if uri.is_uri(spec) or Path(spec).expanduser().is_absolute() else uri.join(base, spec)
        raise CorpusPathError(f"no file matches {uri.display(shown)}")
    return found


def read_plan(paths: list[str]) -> tuple[object | None, list[str]]:
    """(filesystem for Ray Data, paths inside it): local files as they are (filesystem None),
    URIs resolved by `storage.uri` so that a URI's query options (endpoint, scheme) are kept."""
    if all(uri.is_local(p) for p in paths):
        return None, [str(uri.local_path(p)) for p in paths]
    fs = uri.resolve(paths[0])[0]
    return fs, [uri.resolve(p)[1] for p in paths]


def _table(path: str, shard: int, rows: list[int], raws: list, reasons: list[str]) -> pa.Table:
    return pa.table({
        "path": pa.array([path] * len(rows), pa.string()),
        "shard": pa.array([shard] * len(rows), pa.int64()),
        "row": pa.array(rows, pa.int64()),
        "raw": pa.array(raws, pa.binary()),
        "pre_reason": pa.array(reasons, pa.string()),
    })


class CorpusDatasource(FileBasedDatasource):
    """Raw records {path, shard, row, raw: bytes, pre_reason} in shards of `shard_docs` records.

    Args:
        paths: paths inside `filesystem` (see `read_plan`).
        fmt: "jsonl" (one record per line), "parquet" (one per row of `text_field`),
            "text" (one per file), "text_blocks" (one per blank-line-separated block).
        labels: path -> the label recorded in the `path` column (default: the path itself).
    """

    def __init__(self, paths, fmt: str, text_field: str = "text", shard_docs: int = 4096,
                 labels: dict[str, str] | None = None, **kwargs) -> None:
        if fmt not in FORMATS:
            raise CorpusPathError(f"unknown format '{fmt}'; known: {FORMATS}")
        super().__init__(paths, **kwargs)
        self.fmt, self.text_field, self.shard_docs = fmt, text_field, shard_docs
        self.labels = dict(labels or {})

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        path = self.labels.get(path, self.labels.get(path.lstrip("/"), path))
        if self.fmt == "parquet":
            yield from self._parquet(f, path)
            return
        records = self._lines(f) if self.fmt == "jsonl" else self._text(f)
        rows, raws, row = [], [], 0
        for raw in records:
            rows.append(row)
            raws.append(raw)
            row += 1
            if len(rows) == self.shard_docs:
                yield _table(path, rows[0] // self.shard_docs, rows, raws, [""] * len(rows))
                rows, raws = [], []
        if rows:
            yield _table(path, rows[0] // self.shard_docs, rows, raws, [""] * len(rows))

    @staticmethod
    def _lines(f: pa.NativeFile) -> Iterator[bytes]:
        tail = b""
        while chunk := f.read(_READ_CHUNK):
            parts = (tail + chunk).split(b"\n")
            tail = parts.pop()
            yield from (p for p in parts if p.strip())
        if tail.strip():
            yield tail

    def _text(self, f: pa.NativeFile) -> Iterator[bytes]:
        data = f.read()
        if self.fmt == "text":
            yield data
            return
        block: list[bytes] = []
        for line in data.split(b"\n"):
            if line.strip():
                block.append(line)
            elif block:
                yield b"\n".join(block)
                block = []
        if block:
            yield b"\n".join(block)

    def _parquet(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(pa.BufferReader(f.read()))  # the stream is not seekable; one file at a time
        start = 0
        if self.text_field not in pf.schema_arrow.names:
            n = pf.metadata.num_rows
            for s in range(0, n, self.shard_docs):
                rows = list(range(s, min(n, s + self.shard_docs)))
                yield _table(path, s // self.shard_docs, rows, [b""] * len(rows), ["missing_field"] * len(rows))
            return
        for batch in pf.iter_batches(batch_size=self.shard_docs, columns=[self.text_field]):
            col = batch.column(0).to_pylist()
            rows = list(range(start, start + len(col)))
            raws = [v.encode("utf-8") if isinstance(v, str) else b"" for v in col]
            reasons = ["" if isinstance(v, str) else ("missing_field" if v is None else "not_text") for v in col]
            yield _table(path, start // self.shard_docs, rows, raws, reasons)
            start += len(col)
