"""The Ray Data datasource of the select stage: streaming corpus reads of JSONL (.gz/.zst),
Parquet and plain text.

`CorpusDatasource` reads each file as a stream and yields blocks of at most `shard_docs` raw
records, tagged (path, shard, row). A shard is therefore defined by the data (the file and the
record's position in it), not by how many workers run, which keeps selection deterministic on 1 or
N workers. Records are not parsed here: `data.corpus.parse_records` does that and counts what is
bad. Compression (.gz, .zst, .bz2) is inferred from the extension by Ray's file reader; files are
read on whichever node runs the read task (`data.readers.read_plan` says how to open them).

A bad file never fails the read task: `data.records.FileReader` turns it into counted records
("unreadable_file", "empty_file", "blank_line", "too_long"); only the transient storage errors
Ray Data retries itself (`DataContext.retried_io_errors`) are raised, and a read task whose
worker dies is retried by Ray Data (its blocks are the same on every attempt).
"""
from __future__ import annotations

from typing import Iterator

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from raycompress.data.records import FILE_ERRORS, FileReader, Unopened


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
