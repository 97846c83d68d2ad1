"""data.readers and distributed.readers: every format through Ray Data, shards by position, compression inferred."""
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycompress.data.readers import CorpusPathError, expand_paths, infer_format
from raycompress.distributed.readers import CorpusDatasource


def _read(ray, paths, fmt, **kw):
    ds = ray.data.read_datasource(CorpusDatasource([str(p) for p in paths], fmt=fmt, **kw))
    return sorted(ds.take_all(), key=lambda r: (r["path"], r["row"]))


def test_infer_format_and_expand(tmp_path):
    assert infer_format("a/b.jsonl.zst") == "jsonl" and infer_format("x.parquet") == "parquet"
    assert infer_format("t.txt.gz") == "text"
    with pytest.raises(CorpusPathError, match="cannot infer"):
        infer_format("x.csv")
    (tmp_path / "a.jsonl").write_text("{}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text("{}\n")
    assert expand_paths("*.jsonl", tmp_path) == {str(tmp_path / "a.jsonl"): "a.jsonl"}
    assert expand_paths("**/*.jsonl", tmp_path) == {str(tmp_path / "a.jsonl"): "a.jsonl",
                                                    str(tmp_path / "sub" / "b.jsonl"): "sub/b.jsonl"}
    assert expand_paths(str(tmp_path / "sub" / "b.jsonl"), "/elsewhere") == {str(tmp_path / "sub" / "b.jsonl"): "b.jsonl"}
    with pytest.raises(CorpusPathError, match="no file matches"):
        expand_paths("missing/*.jsonl", tmp_path)


def test_expand_s3_glob_labels_without_location(s3_server):
    from raycompress.storage import uri

    for rel in ("c/x.jsonl", "c/deep/y.jsonl", "c/z.txt"):
        uri.write_text(s3_server(f"readers/{rel}"), "{}\n")
    found = expand_paths(s3_server("readers/c/**/*.jsonl"), "/unused")
    assert list(found.values()) == ["deep/y.jsonl", "x.jsonl"]
    assert all(loc.startswith("s3://raycompress-test/readers/c/") and "endpoint_override" in loc for loc in found)
    with pytest.raises(CorpusPathError, match=r"no file matches s3://raycompress-test/readers/none/\*.jsonl$"):
        expand_paths(s3_server("readers/none/*.jsonl"), "/unused")


def test_jsonl_plain_gz_zst_and_shards(tmp_path, ray_local):
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(5)]
    body = ("\n".join(lines) + "\n\n").encode()
    (tmp_path / "a.jsonl").write_bytes(body)
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as f:
        f.write(body)
    with pa.CompressedOutputStream(str(tmp_path / "c.jsonl.zst"), "zstd") as f:
        f.write(body)
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst"):
        rows = _read(ray_local, [tmp_path / name], "jsonl", shard_docs=2)
        assert [r["raw"] for r in rows] == [line.encode() for line in lines] + [b""]
        assert [r["pre_reason"] for r in rows] == [""] * 5 + ["blank_line"]  # the blank line is counted
        assert [r["row"] for r in rows] == [0, 1, 2, 3, 4, 5] and [r["shard"] for r in rows] == [0, 0, 1, 1, 2, 2]


def test_parquet_text_field_nulls_and_missing_column(tmp_path, ray_local):
    pq.write_table(pa.table({"body": ["x", None, "z"]}), tmp_path / "a.parquet")
    rows = _read(ray_local, [tmp_path / "a.parquet"], "parquet", text_field="body")
    assert [r["raw"] for r in rows] == [b"x", b"", b"z"] and [r["pre_reason"] for r in rows] == ["", "missing_field", ""]
    rows = _read(ray_local, [tmp_path / "a.parquet"], "parquet", text_field="text")
    assert [r["pre_reason"] for r in rows] == ["missing_field"] * 3


def test_text_per_file_and_blocks(tmp_path, ray_local):
    (tmp_path / "a.txt").write_text("para one\nline two\n\n\npara two\n")
    assert [r["raw"] for r in _read(ray_local, [tmp_path / "a.txt"], "text")] == [b"para one\nline two\n\n\npara two\n"]
    assert [r["raw"] for r in _read(ray_local, [tmp_path / "a.txt"], "text_blocks")] == [b"para one\nline two", b"para two"]


def test_bad_files_are_records_not_failed_reads(tmp_path, ray_local):
    """Through Ray Data, format auto: each file read in its own format; a gzip cut short, random
    bytes named .parquet, a name of no known format and a file gone before its read are each one
    "unreadable_file" record (with the error), and the read completes."""
    good = "\n".join(json.dumps({"text": f"doc {i}"}) for i in range(3)) + "\n"
    (tmp_path / "a.jsonl").write_text(good)
    (tmp_path / "b.txt").write_text("plain text")
    pq.write_table(pa.table({"text": ["p0", "p1"]}), tmp_path / "c.parquet")
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(good.encode())[:20])
    (tmp_path / "e.parquet").write_bytes(b"\x00" * 64)
    (tmp_path / "f.csv").write_text("a,b\n")
    (tmp_path / "g.jsonl").write_text(good)
    names = ["a.jsonl", "b.txt", "c.parquet", "d.jsonl.gz", "e.parquet", "f.csv", "g.jsonl"]
    source = CorpusDatasource([str(tmp_path / n) for n in names], fmt="auto",
                              labels={str(tmp_path / n): n for n in names})
    (tmp_path / "g.jsonl").unlink()  # listed, then gone before the read
    rows = sorted(ray_local.data.read_datasource(source).take_all(), key=lambda r: (r["path"], r["row"]))
    by_file = {}
    for r in rows:
        by_file.setdefault(r["path"], []).append((r["fmt"], r["pre_reason"]))
    assert by_file == {"a.jsonl": [("jsonl", "")] * 3, "b.txt": [("text", "")], "c.parquet": [("parquet", "")] * 2,
                       "d.jsonl.gz": [("jsonl", "unreadable_file")], "e.parquet": [("parquet", "unreadable_file")],
                       "f.csv": [("", "unreadable_file")], "g.jsonl": [("jsonl", "unreadable_file")]}
    errors = {r["path"]: r["raw"].decode() for r in rows if r["pre_reason"]}
    assert "Truncated" in errors["d.jsonl.gz"] and "ArrowInvalid" in errors["e.parquet"]
    assert "cannot infer the format" in errors["f.csv"] and "FileNotFoundError" in errors["g.jsonl"]
