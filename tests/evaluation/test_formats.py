"""evaluation.formats: lm-eval prompt strings and file-naming errors."""
import json

import pytest

from raycompress.evaluation.formats import MCItem, read_jsonl_text, read_piqa, read_pubmedqa, read_text
from raycompress.registry import TASK_KINDS


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_piqa_prompts(tmp_path):
    p = _write(tmp_path / "piqa.jsonl", [
        {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "hit it", "label": 0},
        "",
        {"goal": "Dry hair", "sol1": "use water", "sol2": "use a towel", "label": "1"},
    ])
    items = read_piqa(p)
    assert items == [
        MCItem("Question: Open a jar\nAnswer:", (" twist the lid", " hit it"), 0),
        MCItem("Question: Dry hair\nAnswer:", (" use water", " use a towel"), 1),
    ]


def test_pubmedqa_prompts(tmp_path):
    p = _write(tmp_path / "pqa.jsonl", [
        {"context": "Aspirin helps.", "question": "Does it help?", "label": "Yes"},
        {"context": "C", "question": "Q", "label": "maybe"},
    ])
    items = read_pubmedqa(p)
    assert items[0].context == "Abstract: Aspirin helps.\nQuestion: Does it help?\nAnswer:"
    assert items[0].choices == (" yes", " no", " maybe")
    assert [it.label for it in items] == [0, 2]


def test_pubmedqa_bad_label_names_file(tmp_path):
    p = _write(tmp_path / "bad.jsonl", [{"context": "C", "question": "Q", "label": "perhaps"}])
    with pytest.raises(ValueError, match="bad.jsonl.*perhaps"):
        read_pubmedqa(p)


def test_malformed_line_names_file_and_line(tmp_path):
    p = _write(tmp_path / "m.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}, "", "{oops"])
    with pytest.raises(ValueError, match=r"m\.jsonl:3: malformed JSON"):
        read_piqa(p)


def test_missing_field_names_file(tmp_path):
    p = _write(tmp_path / "nogoal.jsonl", [{"sol1": "a", "sol2": "b", "label": 0}])
    with pytest.raises(ValueError, match="nogoal.jsonl.*'goal'"):
        read_piqa(p)


def test_piqa_missing_solution_names_file(tmp_path):
    # sol1/sol2 are read with r[...] rather than _field: a missing one gives a bare KeyError
    p = _write(tmp_path / "nosol.jsonl", [{"goal": "g", "sol1": "a", "label": 0}])
    with pytest.raises(ValueError, match="nosol.jsonl.*'sol2'"):
        read_piqa(p)


def test_text_readers(tmp_path):
    t = tmp_path / "w.txt"
    t.write_text(" = Title = \n\nbody\n")
    assert read_text(t) == [" = Title = \n\nbody\n"]
    j = _write(tmp_path / "a.jsonl", [{"text": "one"}, {"text": 2}])
    assert read_jsonl_text(j) == ["one", "2"]
    assert TASK_KINDS.get("piqa") is read_piqa
    assert {"text", "jsonl_text", "piqa", "pubmedqa"} <= set(TASK_KINDS.names())
