"""data.corpus.parse_jsonl_batch: skip reasons, blank lines, default ids."""
import hashlib
import json

from raycompress.data.corpus import SKIP_REASONS, parse_jsonl_batch


def test_every_bad_kind_gets_its_reason():
    lines = [
        json.dumps({"id": "a", "text": "good doc"}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"id": "m", "body": "x"}),
        json.dumps({"id": "n", "text": 42}),
        json.dumps({"id": "e", "text": "   \n\t"}),
        json.dumps({"id": "t", "text": "x" * 11}),
        "",
        "   ",
        json.dumps({"id": 7, "text": "x" * 10}),
    ]
    out = parse_jsonl_batch({"text": lines, "path": ["f.jsonl"] * len(lines)}, "biomed", "text", 10)
    assert out["reason"] == ["", "malformed_json", "not_an_object", "missing_field", "not_text", "empty", "too_long", ""]
    assert set(out["reason"]) - {""} == set(SKIP_REASONS)
    assert out["doc_id"] == ["a", "", "", "m", "n", "e", "t", "7"]
    assert out["text"] == ["good doc", "", "", "", "", "", "", "x" * 10]
    assert out["source"] == ["biomed"] * 8
    assert out["path"] == ["f.jsonl"] * 8


def test_blank_lines_ignored_and_id_defaults_to_hash():
    out = parse_jsonl_batch({"text": ["", json.dumps({"text": "hello"}), "  "]}, "s", "text", 100)
    assert len(out["reason"]) == 1
    assert out["doc_id"] == [hashlib.sha256(b"hello").hexdigest()[:16]]
    assert out["path"] == [""]


def test_custom_text_field():
    out = parse_jsonl_batch({"text": [json.dumps({"abstract": "abc", "text": 1})]}, "s", "abstract", 100)
    assert out["text"] == ["abc"] and out["reason"] == [""]
