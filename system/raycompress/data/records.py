"""Raw corpus records of one file, without Ray: `FileReader` turns a byte stream into tables of
records {path, shard, row, raw, pre_reason, fmt}, `distributed.readers.CorpusDatasource` runs it in
Ray Data read tasks, and tests run it on any stream.

Hostile input never fails a read: what the reader can tell is bad becomes a record with a
`pre_reason` (see `data.corpus.SKIP_REASONS`), so every line is either a document or counted:

- JSONL: one record per line, `row` = its 0-based line number; a blank (whitespace-only) line is
  "blank_line"; a line longer than `max_bytes` is "too_long" and is never held in memory whole.
- A file with no record at all (a 0-byte JSONL, a Parquet file without rows) is one
  "empty_file" record.
- A file that cannot be opened, decompressed or decoded (a gzip cut short, random bytes named
  .parquet, a name whose format cannot be inferred) is one "unreadable_file" record, its `raw`
  the error text, after the records read before the error: those are kept (those of the chunks
  read whole before it, so a truncated file always yields the same ones); an incomplete last line
  is not. Only errors the caller calls transient (storage hiccups Ray Data retries) are raised.
"""
from __future__ import annotations

import logging
import os
from typing import Iterator

import pyarrow as pa

from raycompress import chaos

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "parquet", "text", "text_blocks")
AUTO = "auto"  # each file's format from its name
_READ_CHUNK = 8 << 20  # bytes per read() while streaming lines
# Failure injection (tests, jobs/benchmarks/chaos.py): the read of the file with this label dies
# once after yielding its first block (`raycompress.chaos.die_once`, with its marker file).
CHAOS_KILL_READ_FILE = "RAYCOMPRESS_CHAOS_KILL_READ_FILE"
# what a file's own error looks like (Arrow's IO errors are OSError)
FILE_ERRORS = (OSError, EOFError, pa.ArrowException)


class CorpusPathError(FileNotFoundError):
    """A source path matches no file, or names an unknown format."""


def infer_format(path: str) -> str:
    """Format from the file name, ignoring a compression suffix: jsonl, parquet or text.

    Raises:
        CorpusPathError: the extension is none of those (the path is named).
    """
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


def record_byte_limit(max_chars: int) -> int:
    """Bytes a JSONL line or text record may have and still hold at most `max_chars` characters
    of text: 12 per character (a JSON-escaped surrogate pair) plus 64 KiB for the other fields."""
    return 12 * max_chars + (64 << 10)


def split_lines(f, limit: int | None = None) -> Iterator[bytes | None]:
    """Every line of a stream, without its b"\\n" (a last line without one included; nothing
    after a final b"\\n"), or None for a line longer than `limit` bytes: such a line is passed
    over as it streams, so memory stays within one read chunk plus `limit`.

    Raises:
        whatever `f.read` raises (OSError for a compressed stream cut short).
    """
    limit = float("inf") if limit is None else limit
    carry: list[bytes] = []
    size, over = 0, False
    while chunk := f.read(_READ_CHUNK):
        parts = chunk.split(b"\n")
        for part in parts[:-1]:
            if over or size + len(part) > limit:
                yield None
            else:
                yield b"".join(carry) + part if carry else part
            carry, size, over = [], 0, False
        rest = parts[-1]
        if not over and size + len(rest) > limit:
            carry, over = [], True
        elif not over and rest:
            carry.append(rest)
            size += len(rest)
    if over:
        yield None
    elif size:
        yield b"".join(carry)


def _read_at_most(f, n: int) -> bytes:
    """The first `n` bytes of a stream (all of it if shorter), in reads of at most a chunk."""
    parts: list[bytes] = []
    got = 0
    while got < n and (chunk := f.read(min(_READ_CHUNK, n - got))):
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


class Unopened:
    """Stands in for a file whose opening failed, so that the reader reports it as a record."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __enter__(self) -> "Unopened":
        return self

    def __exit__(self, *exc) -> bool:
        return False


class _Shards:
    """Collects (raw, reason) records of one file, numbered from 0, into tables of `shard_docs`."""

    def __init__(self, path: str, fmt: str, shard_docs: int) -> None:
        self.path, self.fmt, self.shard_docs = path, fmt, shard_docs
        self.rows: list[int] = []
        self.raws: list[bytes] = []
        self.reasons: list[str] = []
        self.next_row = 0

    def add(self, raw: bytes, reason: str = "") -> bool:
        """Adds the next record; True when its shard is full (time to `flush`)."""
        self.rows.append(self.next_row)
        self.raws.append(raw)
        self.reasons.append(reason)
        self.next_row += 1
        return len(self.rows) == self.shard_docs

    def flush(self) -> pa.Table | None:
        if not self.rows:
            return None
        n = len(self.rows)
        table = pa.table({
            "path": pa.array([self.path] * n, pa.string()),
            "shard": pa.array([self.rows[0] // self.shard_docs] * n, pa.int64()),
            "row": pa.array(self.rows, pa.int64()),
            "raw": pa.array(self.raws, pa.binary()),
            "pre_reason": pa.array(self.reasons, pa.string()),
            "fmt": pa.array([self.fmt] * n, pa.string()),
        })
        self.rows, self.raws, self.reasons = [], [], []
        return table


def chaos_env() -> dict[str, str]:
    """What read tasks' runtime env must carry for a read failure injected in this process: its
    variable and the marker's; nothing (no runtime env, so no extra workers) when none is."""
    if CHAOS_KILL_READ_FILE not in os.environ:
        return {}
    return {k: os.environ[k] for k in (CHAOS_KILL_READ_FILE, chaos.MARKER) if k in os.environ}


def _chaos_point(label: str) -> None:
    """Failure injection: die once, as a killed worker would, in the read of `label`."""
    if os.environ.get(CHAOS_KILL_READ_FILE) == label:
        chaos.die_once()


class FileReader:
    """Records of one file at a time, in tables of at most `shard_docs` rows (one shard each).

    Args:
        fmt: "jsonl" (one record per line), "parquet" (one per row of `text_field`),
            "text" (one per file), "text_blocks" (one per blank-line-separated block), or "auto":
            each file's own, inferred from its label (`infer_format`); a file whose format cannot
            be inferred is one "unreadable_file" record. The `fmt` column holds each file's.
        max_bytes: a JSONL line, text file or text block longer than this is one "too_long"
            record, never held whole (None: no limit; see `record_byte_limit`).
        retried: substrings of the messages of errors that are the storage's, not the file's
            (Ray Data's `retried_io_errors`): those are raised, for the caller to retry.

    Raises:
        CorpusPathError: `fmt` is not a known format.
    """

    def __init__(self, fmt: str, text_field: str = "text", shard_docs: int = 4096, max_bytes: int | None = None,
                 retried: tuple[str, ...] = ()) -> None:
        if fmt not in FORMATS + (AUTO,):
            raise CorpusPathError(f"unknown format '{fmt}'; known: {FORMATS + (AUTO,)}")
        self.fmt, self.text_field, self.shard_docs, self.max_bytes = fmt, text_field, shard_docs, max_bytes
        self.retried = tuple(retried)

    def transient(self, exc: BaseException) -> bool:
        """Whether `exc` is a storage hiccup (to retry), not an error of the file's own."""
        return any(p in str(exc) for p in self.retried)

    def read(self, f, label: str) -> Iterator[pa.Table]:
        """Tables of the records of stream `f` (or an `Unopened`), the file named `label`.

        Raises:
            only a `transient` error; every other error of the file is a record.
        """
        fmt = self.fmt
        if fmt == AUTO:
            try:
                fmt = infer_format(label)
            except CorpusPathError as exc:
                f, fmt = Unopened(exc), ""
        out = _Shards(label, fmt, self.shard_docs)
        first = True
        try:
            if isinstance(f, Unopened):
                raise f.error
            for raw, reason in self._records(f, fmt):
                if out.add(raw, reason):
                    yield out.flush()
                    if first:
                        first = False
                        _chaos_point(label)
            if out.next_row == 0:
                out.add(b"", "empty_file")
        except FILE_ERRORS as exc:
            if self.transient(exc):
                raise
            text = f"{type(exc).__name__}: {exc}"
            log.debug("%s: unreadable after %d records (%s)", label, out.next_row, text)  # select logs it once
            out.add(text.encode("utf-8", "replace"), "unreadable_file")
        if (table := out.flush()) is not None:
            yield table
        if first:
            _chaos_point(label)

    def _records(self, f, fmt: str) -> Iterator[tuple[bytes, str]]:
        """(raw, pre_reason) per record of one file, in order."""
        if fmt == "parquet":
            yield from self._parquet(f)
        elif fmt == "jsonl":
            for line in split_lines(f, self.max_bytes):
                if line is None:
                    yield b"", "too_long"
                else:
                    yield (line, "") if line.strip() else (b"", "blank_line")
        elif fmt == "text":
            data = f.read() if self.max_bytes is None else _read_at_most(f, self.max_bytes + 1)
            yield (data, "") if self.max_bytes is None or len(data) <= self.max_bytes else (b"", "too_long")
        else:
            yield from self._blocks(f)

    def _blocks(self, f) -> Iterator[tuple[bytes, str]]:
        """text_blocks: runs of non-blank lines, joined by b"\\n"; one over `max_bytes`: too_long."""
        limit = float("inf") if self.max_bytes is None else self.max_bytes
        block: list[bytes] = []
        size, over = 0, False
        for line in split_lines(f, self.max_bytes):
            if line is not None and not line.strip():
                if block or over:
                    yield (b"", "too_long") if over else (b"\n".join(block), "")
                block, size, over = [], 0, False
            elif line is None or over or size + len(line) > limit:
                block, over = [], True
            else:
                block.append(line)
                size += len(line) + 1
        if block or over:
            yield (b"", "too_long") if over else (b"\n".join(block), "")

    def _parquet(self, f) -> Iterator[tuple[bytes, str]]:
        """One record per row of `text_field`: a null is "missing_field", a value that is not a
        string "not_text"; every row is "missing_field" when the file has no such column."""
        import pyarrow.parquet as pq

        # the stream is not seekable: the file is read whole, one file at a time
        with pq.ParquetFile(pa.BufferReader(f.read())) as pf:
            if self.text_field not in pf.schema_arrow.names:
                for _ in range(pf.metadata.num_rows):
                    yield b"", "missing_field"
                return
            for batch in pf.iter_batches(batch_size=self.shard_docs, columns=[self.text_field]):
                for v in batch.column(0).to_pylist():
                    if isinstance(v, str):
                        yield v.encode("utf-8"), ""
                    else:
                        yield b"", "missing_field" if v is None else "not_text"
