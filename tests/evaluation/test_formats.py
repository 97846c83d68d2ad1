"""evaluation.formats: JSONL reader errors, readers on a bucket, WikiText article split, WikiText detokenizer."""
import json

import pytest

from raycompress.evaluation.formats import READERS, TEXT_FILTERS, read_jsonl, wikitext_pages


def test_jsonl_skips_blank_lines_and_names_bad_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"a": 1}) + "\n\n" + json.dumps({"a": 2}) + "\n")
    assert read_jsonl(p) == [{"a": 1}, {"a": 2}]
    p.write_text(json.dumps({"a": 1}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"x.jsonl:2: malformed JSON"):
        read_jsonl(p)


def test_registries_list_known_names():
    assert {"jsonl", "text", "wikitext"} <= set(READERS.names())
    with pytest.raises(KeyError, match="known"):
        READERS.get("csv")


def test_wikitext_pages_split_at_top_level_headings():
    # a dump written as "\n\n".join(rows): rows "" (blank) or ending in "\n", headings " = T = "
    rows = ["", " = First = \n", "", " Para one . \n", "", " = = Sub = = \n", "", " Para two . \n", "",
            " = Second = \n", "", " Last . \n", ""]
    pages = wikitext_pages("\n\n".join(rows).replace("\n", "\r\n"))
    assert pages == [" = First = \n \n Para one . \n \n = = Sub = = \n \n Para two . \n ",
                     " = Second = \n \n Last . \n "]


def test_wikitext_detokenizer():
    detok = TEXT_FILTERS.get("wikitext")
    assert detok(" = = Early life = = \n The 1 @,@ 000 @-@ mile trip ( long ) , he said .") == \
        " == Early life ==\nThe 1,000-mile trip (long), he said ."
    assert detok("the players ' club") == "the players' club"


def test_readers_read_a_bucket_and_name_the_location_without_its_query(tmp_path, s3_server):
    from raycompress.storage import uri

    loc = s3_server(f"formats/{tmp_path.name}/x.jsonl")
    uri.write_text(loc, json.dumps({"a": 1}) + "\r\n\r\n" + json.dumps({"a": 2}) + "\r\n")
    assert read_jsonl(loc) == [{"a": 1}, {"a": 2}]
    uri.write_text(loc, json.dumps({"a": 1}) + "\n[1]\n")
    with pytest.raises(ValueError, match=r"^s3://raycompress-test/formats/.*/x.jsonl:2: expected a JSON object") as exc:
        read_jsonl(loc)
    assert "endpoint_override" not in str(exc.value)
    uri.write_text(loc, "line one\r\nline two\r")
    assert READERS.get("text")(loc) == [{"text": "line one\nline two\n"}]
    with pytest.raises(FileNotFoundError, match="formats/.*/absent.jsonl"):
        read_jsonl(s3_server(f"formats/{tmp_path.name}/absent.jsonl"))
