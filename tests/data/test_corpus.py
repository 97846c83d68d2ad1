"""data.corpus.parse_records: skip reasons in order, default ids, content hashes."""
import hashlib
import json

from raycompress.data.corpus import READER_REASONS, SKIP_REASONS, parse_records


def _batch(raws, pre=None, path="f.jsonl"):
    n = len(raws)
    return {"path": [path] * n, "shard": [0] * n, "row": list(range(n)), "raw": raws, "pre_reason": pre or [""] * n}


def test_every_bad_kind_gets_its_reason():
    raws = [
        json.dumps({"id": "a", "text": "good doc"}).encode(),
        b"{not json",
        json.dumps(["a", "list"]).encode(),
        json.dumps({"id": "m", "body": "x"}).encode(),
        json.dumps({"id": "n", "text": 42}).encode(),
        json.dumps({"id": "e", "text": "   \n\t"}).encode(),
        json.dumps({"id": "t", "text": "x" * 11}).encode(),
        b'{"id": "u", "text": "caf\xe9"}',  # latin-1 byte: not UTF-8
        json.dumps({"id": 7, "text": "x" * 10}).encode(),
    ]
    out = parse_records(_batch(raws), "biomed", "jsonl", "text", 10)
    assert out["reason"] == ["", "malformed_json", "not_an_object", "missing_field", "not_text", "empty",
                             "too_long", "not_utf8", ""]
    assert set(out["reason"]) - {""} == set(SKIP_REASONS) - {"duplicate"} - set(READER_REASONS)
    assert out["doc_id"][:2] == ["a", "f.jsonl:1"] and out["doc_id"][-1] == "7"
    assert out["text"][0] == "good doc" and out["text"][-1] == "x" * 10
    assert out["hash"][0] == hashlib.sha256(b"good doc").hexdigest()[:16]
    assert all(h == "" for h, r in zip(out["hash"], out["reason"]) if r)


def test_plain_text_and_reader_reasons():
    out = parse_records(_batch([b"hello world", b"", "caf\u00e9".encode("latin-1")], pre=["", "missing_field", ""], path="a.txt"),
                        "s", "text", "text", 100)
    assert out["reason"] == ["", "missing_field", "not_utf8"]
    assert out["text"][0] == "hello world" and out["doc_id"][0] == "a.txt:0"


def test_custom_text_field():
    out = parse_records(_batch([json.dumps({"abstract": "abc", "text": 1}).encode()]), "s", "jsonl", "abstract", 100)
    assert out["text"] == ["abc"] and out["reason"] == [""]


def test_reader_reasons_per_row_format_and_error_detail():
    batch = _batch([b'{"text": "json doc"}', b"plain doc", b"OSError: Truncated compressed stream", b""],
                   pre=["", "", "unreadable_file", "blank_line"])
    batch["fmt"] = ["jsonl", "text", "jsonl", "jsonl"]  # a glob of mixed formats: each row its file's
    out = parse_records(batch, "s", "auto", "text", 100)
    assert out["reason"] == ["", "", "unreadable_file", "blank_line"]
    assert out["text"][:2] == ["json doc", "plain doc"]
    assert out["detail"] == ["", "", "OSError: Truncated compressed stream", ""]
