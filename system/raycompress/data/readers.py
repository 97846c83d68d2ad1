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

A bad file never fails the read task: `data.records.FileReader` turns it into counted records
("unreadable_file", "empty_file", "blank_line", "too_long"); only the transient storage errors
Ray Data retries itself (`DataContext.retried_io_errors`) are raised, and a read task whose
worker dies is retried by Ray Data (its blocks are the same on every attempt).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from raycompress.data.records import (  # noqa: F401  (re-exported: the readers' public names)
    AUTO, FILE_ERRORS, FORMATS, CorpusPathError, FileReader, Unopened, chaos_env, infer_format, record_byte_limit,
)
from raycompress.storage import uri


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


class CorpusDatasource(FileBasedDatasource):
    """Raw records {path, shard, row, raw: bytes, pre_reason, fmt} in shards of `shard_docs` records.

    Args:
        paths: paths inside `filesystem` (see `read_plan`).
        fmt: "jsonl", "parquet", "text", "text_blocks", or "auto" (each file's own format from
            its name); see `data.records.FileReader`.
        labels: path -> the label recorded in the `path` column (default: the path itself).
        max_bytes: a JSONL line, text file or text block longer than this is one "too_long"
            record (None: no limit; see `record_byte_limit`).

    Raises:
        CorpusPathError: `fmt` is not a known format.
    """

    def __init__(self, paths, fmt: str, text_field: str = "text", shard_docs: int = 4096,
                 labels: dict[str, str] | None = None, max_bytes: int | None = None, **kwargs) -> None:
        self.reader = FileReader(fmt, text_field, shard_docs, max_bytes)
        super().__init__(paths, **kwargs)
        self.reader.retried = tuple(self._data_context.retried_io_errors or ())
        self.labels = dict(labels or {})

    def _open_input_source(self, filesystem, path: str, **open_args):
        try:
            return super()._open_input_source(filesystem, path, **open_args)
        except FILE_ERRORS as exc:
            if self.reader.transient(exc):
                raise
            return Unopened(exc)  # read as one "unreadable_file" record

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        yield from self.reader.read(f, self.labels.get(path, self.labels.get(path.lstrip("/"), path)))
