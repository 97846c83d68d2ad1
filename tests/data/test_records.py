"""data.records without Ray: hostile bytes never raise, every line is a document or counted by
exactly one reason, rows are line numbers; property-based (hypothesis) and hand-picked cases."""
import gzip
import io
import json
import tracemalloc
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raycompress.data import records
from raycompress.data.corpus import SKIP_REASONS, parse_records
from raycompress.data.records import FileReader, Unopened, split_lines

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# lines: arbitrary bytes without b"\n", and JSON-ish ones so that some are documents
LINE = st.one_of(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
                 st.text(max_size=30).map(lambda t: json.dumps({"text": t}).encode()),
                 st.sampled_from([b"", b"  \t", b"\r", b"{}", b'{"text": "a\x00b"}', b"\xff\xfe", b"[" * 5000]))


class Pieces(io.RawIOBase):
    """A stream whose reads return at most `n` bytes: lines then cross read boundaries."""

    def __init__(self, data: bytes, n: int) -> None:
        self.data, self.n, self.pos = data, n, 0

    def read(self, size: int = -1) -> bytes:
        out = self.data[self.pos : self.pos + min(self.n, size if size >= 0 else self.n)]
        self.pos += len(out)
        return out


def _records(reader: FileReader, f, label: str = "f.jsonl", max_chars: int = 50) -> tuple[list[dict], dict]:
    tables = list(reader.read(f, label))
    raw = pa.concat_tables(tables).to_pydict() if tables else {}
    return raw, parse_records(raw, "s", "jsonl", "text", max_chars) if tables else {}


def _check_accounting(lines: list[bytes], raw: dict, docs: dict, shard_docs: int, max_bytes: int) -> None:
    n = max(1, len(lines))  # a file without lines is one "empty_file" record
    assert raw["row"] == list(range(n)) and raw["shard"] == [r // shard_docs for r in range(n)]
    assert all(reason in SKIP_REASONS for reason in docs["reason"] if reason)
    if not lines:
        assert docs["reason"] == ["empty_file"]
    for line, got, pre, reason, text in zip(lines, raw["raw"], raw["pre_reason"], docs["reason"], docs["text"]):
        if len(line) > max_bytes:
            assert pre == "too_long" and got == b""
        elif not line.strip():
            assert pre == "blank_line"
        else:
            assert pre == "" and got == line
        assert (reason == "") == bool(text.strip())


@FAST
@given(lines=st.lists(LINE, max_size=12), newline_at_end=st.booleans(), gz=st.booleans(),
       shard_docs=st.integers(1, 5), max_bytes=st.integers(1, 60))
def test_every_line_is_a_doc_or_counted_once(lines, newline_at_end, gz, shard_docs, max_bytes):
    data = b"\n".join(lines) + (b"\n" if newline_at_end and lines else b"")
    if lines and lines[-1] == b"" and not newline_at_end:
        lines = lines[:-1]  # a final b"" after the last b"\n" is no line
    f = pa.CompressedInputStream(pa.BufferReader(gzip.compress(data)), "gzip") if gz else pa.BufferReader(data)
    raw, docs = _records(FileReader("jsonl", shard_docs=shard_docs, max_bytes=max_bytes), f)
    _check_accounting(lines, raw, docs, shard_docs, max_bytes)


@FAST
@given(data=st.binary(max_size=300), n=st.integers(1, 17), limit=st.none() | st.integers(0, 40))
def test_split_lines_across_read_boundaries(data, n, limit):
    want = data.split(b"\n")
    if want[-1] == b"":
        want.pop()
    cap = float("inf") if limit is None else limit
    assert list(split_lines(Pieces(data, n), limit)) == [w if len(w) <= cap else None for w in want]


@FAST
@given(lines=st.lists(LINE, min_size=1, max_size=30), cut=st.floats(0.0, 0.99), chunk=st.integers(1, 64))
def test_truncated_gzip_is_one_unreadable_record_after_a_prefix(lines, cut, chunk):
    data = gzip.compress(b"\n".join(lines) + b"\n")
    f = pa.CompressedInputStream(pa.BufferReader(data[: int(len(data) * cut)]), "gzip")
    with mock.patch.object(records, "_READ_CHUNK", chunk):  # small reads: the error comes after some
        raw, docs = _records(FileReader("jsonl", shard_docs=4), f)
    assert raw["row"] == list(range(len(raw["row"])))
    if docs["reason"][-1] == "unreadable_file":
        assert "Truncated" in docs["detail"][-1] or "gzip" in docs["detail"][-1].lower()
        assert docs["detail"][:-1] == [""] * (len(docs["row"]) - 1)
        for line, got, pre in zip(lines, raw["raw"][:-1], raw["pre_reason"][:-1]):  # the lines before: kept
            assert (got, pre) == ((line, "") if line.strip() else (b"", "blank_line"))
    else:
        assert docs["reason"] == ["empty_file"]  # cut before the first byte of the stream


@FAST
@given(junk=st.binary(max_size=200), fmt=st.sampled_from(["parquet", "text", "text_blocks", "jsonl"]))
def test_any_bytes_in_any_format_never_raise(junk, fmt):
    raw, docs = _records(FileReader(fmt, shard_docs=3, max_bytes=64), pa.BufferReader(junk), f"f.{fmt}")
    assert raw["row"] == list(range(len(raw["row"]))) and len(raw["row"]) >= 1
    assert all(r in SKIP_REASONS for r in docs["reason"] if r)


@FAST
@given(text=st.text(st.characters(codec=None, exclude_categories=()), max_size=20))
def test_json_text_with_lone_surrogates_is_not_utf8(text):
    out = parse_records({"path": ["f.jsonl"], "shard": [0], "row": [0], "raw": [json.dumps({"id": text, "text": text}).encode()],
                         "pre_reason": [""]}, "s", "jsonl", "text", 100)
    try:
        text.encode("utf-8")
        assert out["reason"] == ["" if text.strip() else "empty"]
    except UnicodeEncodeError:
        assert out["reason"] == ["not_utf8"] and out["doc_id"] == ["f.jsonl:0"]


def test_hostile_lines_by_reason():
    lines = [b'{"text": "ok"}', b"", b"   ", b'{"text": "a\x00b"}', b"\x00\x00", b"\xff", b'{"t": 1}',
             b"[" * 100_000, b'{"text": "' + b"x" * 500 + b'"}', b'{"text": "last"}']
    raw, docs = _records(FileReader("jsonl", max_bytes=300), pa.BufferReader(b"\n".join(lines)))
    assert docs["reason"] == ["", "blank_line", "blank_line", "malformed_json", "malformed_json", "not_utf8",
                              "missing_field", "too_long", "too_long", ""]
    assert docs["row"] == list(range(10)) and docs["doc_id"][-1] == "f.jsonl:9"


def test_a_100_mb_line_is_too_long_in_bounded_memory():
    class Line(io.RawIOBase):  # {"text": "yyy...(100 MB)"}\n{"text": "after"}\n, made as it is read
        def __init__(self):
            self.left, self.done = 100 << 20, False

        def read(self, size=-1):
            if self.left:
                n = min(size, self.left)
                self.left -= n
                return (b'{"text": "' if self.left + n == 100 << 20 else b"") + b"y" * n
            out, self.done = (b'"}\n{"text": "after"}\n', True) if not self.done else (b"", True)
            return out

    tracemalloc.start()
    try:
        raw, docs = _records(FileReader("jsonl", max_bytes=1 << 20), Line(), max_chars=1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert docs["reason"] == ["too_long", ""] and docs["text"][1] == "after"
    assert peak < 40 << 20  # a read chunk (8 MiB) and its split, never the line


def test_files_that_cannot_be_read(tmp_path):
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "int.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "none.parquet")
    cases = {
        "int.parquet": (pa.input_stream(str(tmp_path / "int.parquet")), ["not_text", "not_text"]),
        "none.parquet": (pa.input_stream(str(tmp_path / "none.parquet")), ["empty_file"]),
        "fake.parquet": (pa.BufferReader(b"PAR1 but not really"), ["unreadable_file"]),
        "empty.jsonl": (pa.BufferReader(b""), ["empty_file"]),
        "notes.csv": (pa.BufferReader(b"a,b\n"), ["unreadable_file"]),
        "gone.jsonl": (Unopened(FileNotFoundError("gone.jsonl: no such file")), ["unreadable_file"]),
    }
    for label, (f, want) in cases.items():
        raw, docs = _records(FileReader("auto"), f, label)
        assert docs["reason"] == want, label
    assert "ArrowInvalid" in _records(FileReader("auto"), pa.BufferReader(b"junk"), "x.parquet")[1]["detail"][0]
    assert "cannot infer the format" in _records(FileReader("auto"), pa.BufferReader(b""), "n.csv")[1]["detail"][0]


def test_text_blocks_and_limits():
    data = b"para one\nline two\n\n\npara two\n\n" + b"z" * 50 + b"\nmore\n\nend"
    raw, docs = _records(FileReader("text_blocks", max_bytes=40), pa.BufferReader(data), "a.txt")
    assert raw["raw"] == [b"para one\nline two", b"para two", b"", b"end"]
    assert raw["pre_reason"] == ["", "", "too_long", ""]
    assert _records(FileReader("text", max_bytes=4), pa.BufferReader(b"12345"), "a.txt")[1]["reason"] == ["too_long"]
    raw, docs = _records(FileReader("text", max_bytes=5), Pieces(b"12345", 2), "a.txt")  # short reads add up
    assert raw["raw"] == [b"12345"] and docs["reason"] == [""]


def test_unknown_format_is_refused():
    from raycompress.data.records import CorpusPathError

    with pytest.raises(CorpusPathError, match="unknown format 'csv'"):
        FileReader("csv")
