"""evaluation.sandbox: task templates are bounded (time, size, nesting) and every failure is one
line naming task, item of file and field; preflight renders every item, so a bomb or an escape in
item 1000 is refused before Ray starts."""
import json
from pathlib import Path

import pytest
import yaml

from raycompress.config import JobConfig
from raycompress.evaluation import sandbox
from raycompress.evaluation.taskfiles import TaskError, load_task_file
from raycompress.evaluation.tasks import check_templates, prepare_task

REPO = Path(__file__).resolve().parents[2]
ROW = {"q": "x" * 1000, "a": "1", "n": 5, "m": {"k": "v"}}
WHERE = "task 't': item 7 of d.jsonl: field 'prompt'"
LINE = r"^task 't': item 7 of d\.jsonl: field 'prompt': {what} \({why}\)$"


@pytest.fixture
def quick(monkeypatch):
    """Time bombs are stopped at 0.3 s instead of RENDER_SECONDS."""
    monkeypatch.setattr(sandbox, "RENDER_SECONDS", 0.3)


@pytest.mark.parametrize("template", [
    "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "{% for i in q %}{% for j in q %}{% for k in q %}{% endfor %}{% endfor %}{% endfor %}",
    "{% for i in range(99999) %}{{ i|int }}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{% for i in range(n) %}{{ f(n - 1) if n else '' }}{% endfor %}{% endmacro %}{{ f(60) }}",
])
def test_time_bombs_are_stopped_naming_task_item_and_field(quick, template):
    with pytest.raises(TaskError, match=LINE.format(what="template over its budget", why=r"ran past 0\.3 s")) as exc:
        sandbox.render(template, ROW, WHERE)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("template,why", [
    ("{{ 'a' * 10**9 }}", r"a repeated value \('\*'\) would hold 1,000,000,000 characters or items, over the "
                          r"1,049,578 allowed"),
    ("{{ [1] * 10**9 }}", r"a repeated value \('\*'\) would hold 1,000,000,000 .*"),
    ("{{ 7 ** 99999999 }}", r"'\*\*' would make an integer of about 299,999,997 bits, over 65,536"),
    ("{% set ns = namespace(s=q) %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     r"the text would pass 1,049,578 characters"),
    ("{% set x %}{% for i in range(2000) %}{{ q }}{% endfor %}{% endset %}{{ x|length }}",
     r"the text would pass 1,049,578 characters"),
    ("{% for i in range(2000) %}{{ q }}{% endfor %}", r"the text would pass 1,049,578 characters"),
    ("{{ (q * 1000).replace('x', q) }}", r"str\.replace would hold 1,001,000,000 .*"),
    ("{{ (q * 1000)|replace('x', q) }}", r"the filter 'replace' would hold 1,001,000,000 .*"),
    ("{{ a.ljust(10**9) }}", r"str\.ljust would hold 1,000,000,000 .*"),
    ("{{ a|center(10**9) }}", r"the filter 'center' would hold 1,000,000,000 .*"),
    ("{{ '{:>999999999}'.format(a) }}", r"the format spec '>999999999' would hold 999,999,999 .*"),
    ("{{ '{:>{w}}'.format(a, w=10**9) }}", r"a nested format width would hold 1,000,000,000 .*"),
    ("{{ '%999999999s' % a }}", r"the format width '%999999999' would hold 999,999,999 .*"),
    ("{{ '%*s' % (10**9, a) }}", r"a '%\*' width would hold 1,000,000,000 .*"),
    ("{{ range(100000)|join(q * 1000) }}", r"the filter 'join' would hold 99,999,000,000 .*"),
    ("{{ (q * 1000).join(range(100000)|map('string')) }}", r"str\.join would hold 99,999,\d{3},\d{3} .*"),
    ("{{ [1]|batch(10**9, 'x')|list }}", r"the filter 'batch' would hold 1,000,000,000 .*"),
    ("{{ [1]|slice(10**9)|list }}", r"the filter 'slice' would hold 1,000,000,000 .*"),
    ("{{ ([[1] * 1000] * 2000)|sum(start=[]) }}", r"the filter 'sum' would hold 2,000,000 .*"),
    ("{{ (q * 1000)|wordwrap(1, wrapstring=q) }}", r"the filter 'wordwrap' would hold 1,001,000,000 .*"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", r"calls nested deeper than 64"),
    ("{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}", r"RecursionError: maximum recursion depth exceeded.*"),
])
def test_size_and_depth_bombs_are_refused_before_they_run(template, why):
    with pytest.raises(TaskError, match=LINE.format(what="template over its budget", why=why)) as exc:
        sandbox.render(template, ROW, WHERE)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("template,what,why", [
    ("{{ a ", "template syntax error", r"line 1: unexpected end of template, expected 'end of print statement'\."),
    ("{{ zz }}", "template names something the item lacks",
     r"'zz' is undefined; the item has fields \['a', 'm', 'n', 'q'\]"),
    ("{{ q.get('x') }}", "template names something the item lacks", r"'str object' has no attribute 'get'.*"),
    ("{{ cycler.__init__.__globals__.os.system('id') }}", "template refused by the sandbox",
     r"access to attribute '__init__' of 'type' object is unsafe\."),
    ("{{ q['__class__'] }}", "template refused by the sandbox", r"access to attribute '__class__' of 'str' .*"),
    ("{{ lipsum(10**6) }}", "template names something the item lacks", r"'lipsum' is undefined.*"),
    ("{% include 'x.html' %}", "template refused", r"a task template cannot include, import or extend 'x\.html'"),
    ("{% import 'x.html' as y %}", "template refused", r"a task template cannot include, import or extend 'x\.html'"),
    ("{% extends 'x.html' %}", "template refused", r"a task template cannot include, import or extend 'x\.html'"),
    ("{{ range(10**9) }}", "template failed", r"OverflowError: Range too big\. .*"),
    ("{{ q|dictsort }}", "template failed", r"AttributeError: 'str' object has no attribute 'items'"),
    ("{{ q + 1 }}", "template failed", r"TypeError: can only concatenate str .*"),
    ("{{ 1 / 0 }}", "template failed", r"ZeroDivisionError: division by zero"),
    ("{{ 10 ** 5000 }}", "template failed", r"ValueError: Exceeds the limit \(4300 digits\) .*"),
])
def test_every_render_error_is_one_line_naming_task_item_and_field(template, what, why):
    with pytest.raises(TaskError, match=LINE.format(what=what, why=why)) as exc:
        sandbox.render(template, ROW, WHERE)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("error,why", [(MemoryError(), "MemoryError: out of memory"),
                                       (RecursionError("maximum recursion depth exceeded"),
                                        "RecursionError: maximum recursion depth exceeded")])
def test_memory_and_recursion_errors_are_budget_errors(monkeypatch, error, why):
    def boom(source):
        raise error

    monkeypatch.setattr(sandbox, "_template", boom)
    with pytest.raises(TaskError, match=LINE.format(what="template over its budget", why=why)):
        sandbox.render("{{ q }}", ROW, WHERE)


def test_ordinary_templates_render_as_jinja_does():
    template = ("{{ q[:3] }}|{{ a }}|{{ 'ABCD'[n - 4] }}|{{ '%s-%d' % ('x', 3) }}|{{ '{:>4}'.format(a) }}|"
                "{{ [1, 2]|join(',') }}|{{ q|length }}|{% for c in 'ab' %}{{ loop.index }}{{ c }}{% endfor %}|"
                "{{ 'a-b'|replace('-', '+') }}|{{ [1, 2, 3]|batch(2, 0)|list }}|{{ m.k ~ a }}|{{ 'ab'|center(6) }}|"
                "{{ [[1], [2]]|sum(start=[]) }}|{{ 2 ** 10 }}|{{ 'x' * 3 }}")
    assert sandbox.render(template, ROW, WHERE) == "xxx|1|B|x-3|   1|1,2|1000|1a2b|a+b|[[1, 2], [3, 0]]|v1|  ab  |[1, 2]|1024|xxx"


def test_the_size_budget_grows_with_the_item():
    """A long document renders whole: the budget is the item's own size plus EXTRA_CHARS."""
    doc = "word " * 500_000  # 2.5 MB, over EXTRA_CHARS on its own
    assert sandbox.render("{{ text }}", {"text": doc}, WHERE) == doc
    with pytest.raises(TaskError, match="over its budget"):
        sandbox.render("{{ text }}{{ text }}", {"text": doc}, WHERE)


def _bomb_task(tmp_path, n_items=1001):
    """A multiple-choice task whose template is harmless on items 0..999 and a bomb (or an escape)
    only on the item whose fields say so."""
    rows = [{"q": "x", "k": 0, "n": 1, "y": 0} for _ in range(n_items)]
    path = tmp_path / "d.jsonl"
    task = tmp_path / "t.yaml"
    task.write_text(yaml.safe_dump({"name": "t", "kind": "multiple_choice", "path": str(path),
                                    "prompt": "{{ q[k] }}{{ q * n }}", "choices": ["a", "b"], "target": "{{y}}"}))
    return rows, path, task


@pytest.mark.parametrize("field,value,why", [("n", 10**9, "a repeated value"),
                                             ("k", "__class__", "access to attribute '__class__'")])
def test_check_templates_renders_every_item(tmp_path, field, value, why):
    rows, path, task = _bomb_task(tmp_path)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    check_templates(load_task_file(task), Path)  # items 0..1000 are harmless
    rows[1000][field] = value
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(TaskError, match=rf"^task 't': item 1000 of .*d\.jsonl: field 'prompt': .*{why}"):
        check_templates(load_task_file(task), Path)


def test_a_bomb_in_item_1000_is_refused_by_preflight(tmp_path, tiny_llama_dir):
    import ray

    from raycompress.distributed.plan import PreflightError, preflight
    from raycompress.models.fetch import ModelRef

    rows, path, _ = _bomb_task(tmp_path)
    rows[1000]["n"] = 10**9
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = {"name": "t", "kind": "multiple_choice", "path": str(path), "prompt": "{{ q[k] }}{{ q * n }}",
            "choices": ["a", "b"], "target": "{{y}}"}
    job = JobConfig.model_validate({
        "model": str(tiny_llama_dir), "base_dir": str(tmp_path), "evaluate": {"tasks": [task]},
        "select": {"sources": {"a": {"path": str(REPO / "data/corpora/biomed_pubmedqa_pool.jsonl")}},
                   "n_samples": 4, "seq_len": 64},
        "compress": {"algorithm": "sparsegpt", "sparsity": 0.5}})
    was_up = ray.is_initialized()
    with pytest.raises(PreflightError, match=r"^evaluate\.tasks: task 't': item 1000 of .*d\.jsonl: field 'prompt': "
                                             r"template over its budget \(a repeated value"):
        preflight(job, ModelRef(str(tiny_llama_dir)))
    assert ray.is_initialized() == was_up


def test_evaluation_refuses_a_bomb_in_a_later_item_too(tmp_path):
    """prepare_task (what the eval actors run) goes through the same sandbox."""
    rows, path, task = _bomb_task(tmp_path, 3)
    rows[2]["n"] = 10**9
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(TaskError, match=r"^task 't': item 2 of .*d\.jsonl: field 'prompt': template over its budget"):
        prepare_task(load_task_file(task), CharTok(), 64, Path)


class CharTok:
    """Character-level tokenizer: ids are code points; BOS = 1."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}
