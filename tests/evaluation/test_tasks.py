"""evaluation.taskfiles / tasks: task YAML validation naming file and field, lookup by name, group
and path with overrides, prompts (lm-eval's piqa / pubmedqa / MMLU 5-shot), perplexity caps, and
task folders and data in a bucket reading as on disk."""
import json
from pathlib import Path

import pytest
import yaml

from raycompress.config import ConfigError, JobConfig, load_config
from raycompress.evaluation.taskfiles import TaskError, load_task_file, resolve_tasks
from raycompress.evaluation.tasks import finalize_task, prepare_task
from raycompress.storage import uri

REPO = Path(__file__).resolve().parents[2]


class CharTok:
    """Character-level tokenizer: ids are code points; BOS = 1."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def _task(tmp_path, name="t.yaml", **fields):
    base = {"name": "t", "kind": "multiple_choice", "path": "d.jsonl", "prompt": "Q: {{q}}\nA:",
            "choices": ["{{a}}", "{{b}}"], "target": "{{y}}"}
    p = tmp_path / name
    p.write_text(yaml.safe_dump({**base, **fields}))
    return p


@pytest.mark.parametrize("fields,field", [
    ({"kind": "ranking"}, "kind"),
    ({"limit": 0}, "limit"),
    ({"choices": None}, "choices"),
    ({"metrics": ["word_perplexity"]}, "metrics"),
    ({"format": "csv"}, "format"),
    ({"lmit": 3}, "lmit"),
    ({"num_fewshot": 2}, "fewshot_path"),
])
def test_task_file_errors_name_file_and_field(tmp_path, fields, field):
    p = _task(tmp_path, **fields)
    with pytest.raises(TaskError) as exc:
        load_task_file(p)
    assert str(p) in str(exc.value) and field in str(exc.value)


def test_include_merges_and_include_cycle(tmp_path):
    (tmp_path / "_base.yaml").write_text(yaml.safe_dump({"kind": "multiple_choice", "choices": ["x", "y"],
                                                         "target": "{{y}}", "metrics": ["acc"]}))
    (tmp_path / "a.yaml").write_text("include: _base.yaml\nname: a\npath: d.jsonl\nmetrics: [acc_norm]\n")
    t = load_task_file(tmp_path / "a.yaml")
    assert t.choices == ["x", "y"] and t.metrics == ["acc_norm"]
    (tmp_path / "b.yaml").write_text("include: b.yaml\nname: b\n")
    with pytest.raises(TaskError, match="include"):
        load_task_file(tmp_path / "b.yaml")


def _job(tmp_path, tasks):
    return JobConfig.model_validate({"model": "m", "select": {"sources": {"x": {"path": "x"}}}, "compress": {},
                                     "evaluate": {"tasks": tasks, "task_dirs": [str(REPO / "jobs/tasks")]},
                                     "base_dir": str(REPO)})


def test_shipped_tasks_resolve_by_name_group_and_path(tmp_path):
    tasks = resolve_tasks(_job(tmp_path, ["piqa", {"name": "pubmedqa", "limit": 7}, "mmlu_biomed",
                                          "jobs/tasks/wikitext2.yaml"]))
    names = [t.name for t in tasks]
    assert names[:2] == ["piqa", "pubmedqa"] and tasks[1].limit == 7 and names[-1] == "wikitext2"
    assert names[2:-1] == ["mmlu_anatomy", "mmlu_clinical_knowledge", "mmlu_college_medicine",
                           "mmlu_medical_genetics", "mmlu_professional_medicine"]
    assert all(t.domain == "biomed" and t.num_fewshot == 5 for t in tasks[2:-1])
    general = resolve_tasks(_job(tmp_path, [{"name": "mmlu_general", "limit": 1}]))
    assert len(general) == 49 and all(t.limit == 1 and t.domain == "general" for t in general)


def test_unknown_task_and_bad_override_name_the_field(tmp_path):
    with pytest.raises(TaskError, match=r"evaluate.tasks\[0\].*no task or group named 'piqq'"):
        resolve_tasks(_job(tmp_path, ["piqq"]))
    with pytest.raises(TaskError, match=r"(?s)evaluate.tasks\[0\] \(piqa\).*stride"):
        resolve_tasks(_job(tmp_path, [{"name": "piqa", "max_length": 4, "stride": 8}]))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"model": "m", "select": {"sources": {"x": {"path": "x"}}}, "compress": {},
                                   "evaluate": {"tasks": [{"name": "piqa", "limt": 3}]}}))
    with pytest.raises(ConfigError, match=r"(?s)job.yaml.*evaluate.tasks.0.*limt"):
        load_config(job)


def test_shipped_prompts_match_lm_eval(tmp_path):
    job = _job(tmp_path, ["piqa", "pubmedqa", "mmlu_anatomy"])
    piqa, pqa, mmlu = (prepare_task(t, CharTok(), 4096, job.resolve) for t in resolve_tasks(job))
    row = json.loads((REPO / "data/eval/general_piqa_valid.jsonl").read_text().splitlines()[0])
    ctx, cont = piqa.requests[0]
    assert CharTok().decode(ctx) == f"Question: {row['goal']}\nAnswer:" and CharTok().decode(cont) == " " + row["sol1"]
    assert pqa.items[0][0] == ["yes", "no", "maybe"] and CharTok().decode(pqa.requests[2][1]) == " maybe"
    dev = [json.loads(x) for x in (REPO / "data/eval/mmlu/anatomy_dev.jsonl").read_text().splitlines()]
    text = CharTok().decode(mmlu.requests[0][0])
    head = "The following are multiple choice questions (with answers) about anatomy.\n\n"
    first = f"{dev[0]['question'].strip()}\nA. {dev[0]['choices'][0]}\n"
    assert text.startswith(head + first) and text.count("\nAnswer:") == 6
    assert f"Answer: {'ABCD'[dev[4]['answer']]}\n\n" in text and text.endswith("\nAnswer:")
    assert [CharTok().decode(c) for _, c in mmlu.requests[:4]] == [" A", " B", " C", " D"]


@pytest.mark.parametrize("field", ["prompt", "choices"])
def test_templates_cannot_run_code_or_read_files(tmp_path, field):
    """Task files are data: Jinja renders in a sandbox, so an attribute walk to Python internals
    (the classic `cycler.__init__.__globals__.os` escape) is refused, naming the item and field."""
    (tmp_path / "d.jsonl").write_text(json.dumps({"q": "x", "a": "1", "b": "2", "y": "0"}) + "\n")
    marker = tmp_path / "pwned"
    hostile = "{{ cycler.__init__.__globals__.os.system('touch %s') }}" % marker
    reader = "{{ cycler.__init__.__globals__.__builtins__.open('/etc/hostname').read() }}"
    job = _job(tmp_path, [])
    for template in (hostile, reader):
        value = template if field == "prompt" else [template, "{{b}}"]
        with pytest.raises(TaskError, match=rf"^task 't': item 0 of .*d.jsonl: field '{field}': .*(unsafe|undefined)"):
            prepare_task(load_task_file(_task(tmp_path, path=str(tmp_path / "d.jsonl"), **{field: value})),
                         CharTok(), 64, job.resolve)
    assert not marker.exists()


def test_bad_target_and_missing_field_name_the_item(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"q": "x", "a": "1", "b": "2", "y": "7"}) + "\n")
    job = _job(tmp_path, [])
    with pytest.raises(TaskError, match=r"^task 't': item 0 of .*d.jsonl: field 'target': '7' is neither"):
        prepare_task(load_task_file(_task(tmp_path, path=str(tmp_path / "d.jsonl"))), CharTok(), 64, job.resolve)
    with pytest.raises(TaskError, match=r"^task 't': item 0 of .*d.jsonl: field 'prompt': .*'zz' is undefined"):
        prepare_task(load_task_file(_task(tmp_path, path=str(tmp_path / "d.jsonl"), prompt="{{zz}}")),
                     CharTok(), 64, job.resolve)


def test_perplexity_caps_windows_and_counts(tmp_path):
    docs = [{"text": "ab cd"}, {"text": "efghij"}, {"text": "klm"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    p = tmp_path / "ppl.yaml"
    p.write_text(yaml.safe_dump({"name": "ppl", "kind": "perplexity", "path": str(tmp_path / "c.jsonl"),
                                 "max_tokens": 8, "max_length": 4}))
    prep = prepare_task(load_task_file(p), CharTok(), 64, _job(tmp_path, []).resolve)
    assert prep.items == [(2, 5, 5), (1, 3, 3)]  # the cap keeps "ab cd" and "efg"
    assert [(CharTok().decode(c), CharTok().decode(x)) for c, x in prep.requests] == \
        [("\x01", "ab c"), ("ab c", "d"), ("\x01", "efg")]
    record, _ = finalize_task(prep, [(-1.0, False), (-2.0, False), (-3.0, True)])
    assert record["metrics"]["token_perplexity"] == pytest.approx(2.718281828 ** (6 / 8))
    assert record["metrics"]["word_perplexity"] == pytest.approx(2.718281828 ** 2)
    assert record["n"] == 2 and record["primary"] == "word_perplexity" and record["stderr"] == {}
    assert record["higher_is_better"]["word_perplexity"] is False


def _task_tree(root: str, data: str) -> None:
    """A task folder at `root` and its data at `data` (each a local folder or a URI): a template, a
    2-shot multiple choice task in a subfolder that includes it, a perplexity task on a text file."""
    rows = [{"q": f"question {i}", "a": f"yes {i}", "b": f"no {i}", "y": i % 2} for i in range(5)]
    uri.write_text(uri.join(data, "mc.jsonl"), "\n".join(json.dumps(r) for r in rows[2:]) + "\n\n")
    uri.write_text(uri.join(data, "shots.jsonl"), "\n".join(json.dumps(r) for r in rows[:2]) + "\n")
    uri.write_text(uri.join(data, "doc.txt"), "one two three\r\nfour five six seven\n")
    uri.write_text(uri.join(root, "_mc.yaml"), yaml.safe_dump({
        "kind": "multiple_choice", "group": "g", "prompt": "Q: {{q}}\nA:", "choices": ["{{a}}", "{{b}}"],
        "target": "{{y}}"}))
    uri.write_text(uri.join(root, "sub", "mc.yaml"), yaml.safe_dump({
        "include": "../_mc.yaml", "name": "mc", "path": uri.join(data, "mc.jsonl"), "num_fewshot": 2,
        "fewshot_path": uri.join(data, "shots.jsonl")}))
    uri.write_text(uri.join(root, "doc.yml"), yaml.safe_dump({
        "name": "doc", "kind": "perplexity", "format": "text", "path": uri.join(data, "doc.txt"), "max_length": 8}))


def _prepared(root: str, tmp_path) -> list[tuple]:
    job = JobConfig.model_validate({"model": "m", "select": {"sources": {"x": {"path": "x"}}}, "compress": {},
                                    "evaluate": {"tasks": ["g", uri.join(root, "doc.yml")], "task_dirs": [root]},
                                    "base_dir": str(tmp_path)})
    out = []
    for t in resolve_tasks(job):
        p = prepare_task(t, CharTok(), 64, job.resolve)
        out.append((t.model_dump(exclude={"path", "fewshot_path"}), p.requests, p.spans, p.items))
    return out


def test_task_folder_and_data_in_a_bucket_prepare_as_on_disk(tmp_path, s3_server):
    local = str(tmp_path / "local")
    remote = s3_server(f"tasks/{tmp_path.name}")
    _task_tree(uri.join(local, "tasks"), uri.join(local, "data"))
    _task_tree(uri.join(remote, "tasks"), uri.join(remote, "data"))
    on_disk = _prepared(uri.join(local, "tasks"), tmp_path)
    assert [t["name"] for t, *_ in on_disk] == ["mc", "doc"] and on_disk[0][0]["choices"] == ["{{a}}", "{{b}}"]
    assert CharTok().decode(on_disk[0][1][0][0]).startswith("Q: question 0\nA: yes 0\n\nQ: question 1\nA: no 1")
    assert _prepared(uri.join(remote, "tasks"), tmp_path) == on_disk


def test_errors_about_files_in_a_bucket_name_them_without_the_query(tmp_path, s3_server):
    root = s3_server(f"tasks/{tmp_path.name}")
    uri.write_text(uri.join(root, "a.yaml"), "include: _missing.yaml\nname: a\n")
    with pytest.raises(TaskError, match=r"s3://raycompress-test/tasks/.*/a.yaml: field 'include': "
                                        r"s3://raycompress-test/tasks/.*/_missing.yaml not found") as exc:
        load_task_file(uri.join(root, "a.yaml"))
    assert "endpoint_override" not in str(exc.value)
    task = load_task_file(_task(tmp_path, path=uri.join(root, "none.jsonl")))
    with pytest.raises(TaskError, match=r"field 'path': s3://raycompress-test/tasks/.*/none.jsonl not found") as exc:
        prepare_task(task, CharTok(), 64, _job(tmp_path, []).resolve)
    assert "endpoint_override" not in str(exc.value)


@pytest.mark.parametrize("field,value", [("path", "/etc/passwd"), ("path", "../../../../../../etc/hostname"),
                                         ("fewshot_path", "../../outside.jsonl"), ("include", "../../_evil.yaml")])
def test_task_files_cannot_name_local_files_outside_their_folders(tmp_path, field, value):
    tasks = tmp_path / "job" / "tasks"
    tasks.mkdir(parents=True)
    fields = {field: value, **({"num_fewshot": 1} if field == "fewshot_path" else {})}
    (tasks / "t.yaml").write_text(yaml.safe_dump({"name": "t", "kind": "perplexity", "path": "d.jsonl", **fields}))
    job = JobConfig.model_validate({"model": "m", "select": {"sources": {"x": {"path": "x"}}}, "compress": {},
                                    "evaluate": {"tasks": ["t"], "task_dirs": ["tasks"]}, "base_dir": str(tmp_path / "job")})
    with pytest.raises(TaskError, match=rf"t.yaml: field '{field}': .* is outside the task folders"):
        resolve_tasks(job)


def test_a_job_override_may_point_a_task_at_other_data(tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "t.yaml").write_text(yaml.safe_dump({"name": "t", "kind": "perplexity", "path": "d.jsonl"}))
    job = JobConfig.model_validate({"model": "m", "select": {"sources": {"x": {"path": "x"}}}, "compress": {},
                                    "evaluate": {"tasks": [{"name": "t", "path": "/srv/legal/contracts.jsonl"}],
                                                 "task_dirs": [str(tmp_path / "tasks")]}, "base_dir": str(tmp_path)})
    assert resolve_tasks(job)[0].path == "/srv/legal/contracts.jsonl"  # the job's own choice, not the file's


def _digest_tree(tmp_path, entry="t"):
    """A task folder with an include, data and few-shot examples; (job, task file, include, data, shots)."""
    tasks = tmp_path / "tasks"
    tasks.mkdir(parents=True)
    rows = [{"q": f"q{i}", "a": "yes", "b": "no", "y": i % 2} for i in range(4)]
    (tasks / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tasks / "shots.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n")
    (tasks / "_base.yaml").write_text(yaml.safe_dump({"kind": "multiple_choice", "choices": ["{{a}}", "{{b}}"],
                                                      "target": "{{y}}"}))
    (tasks / "t.yaml").write_text(yaml.safe_dump({"include": "_base.yaml", "name": "t", "path": "d.jsonl",
                                                  "prompt": "Q: {{q}}\nA:", "num_fewshot": 1,
                                                  "fewshot_path": "shots.jsonl"}))
    job = JobConfig.model_validate({"model": "m", "select": {"sources": {"x": {"path": "x"}}}, "compress": {},
                                    "evaluate": {"tasks": [entry], "task_dirs": ["tasks"]}, "base_dir": str(tmp_path)})
    return job, tasks


def _digest(job):
    from raycompress.evaluation.taskfiles import task_digest

    (task,) = resolve_tasks(job)
    return task_digest(task, job.resolve)


@pytest.mark.parametrize("name,edit", [
    ("t.yaml", lambda s: s.replace("Q: {{q}}", "Question: {{q}}")),     # the task's template
    ("_base.yaml", lambda s: s.replace("'{{a}}'", "'{{a|upper}}'")),    # a template in its include
    ("d.jsonl", lambda s: s.replace('"q1"', '"q one"')),                # one item of its data
    ("shots.jsonl", lambda s: s.replace('"q0"', '"q zero"')),           # its few-shot examples
])
def test_task_digest_follows_the_task_file_its_includes_and_its_data(tmp_path, name, edit):
    job, tasks = _digest_tree(tmp_path)
    before = _digest(job)
    assert _digest(job) == before and len(before) == 64  # nothing changed: the same digest
    path = tasks / name
    text = path.read_text()
    assert edit(text) != text
    path.write_text(edit(text))
    after = _digest(job)
    assert after != before
    path.write_text(text)
    assert _digest(job) == before  # content, not modification time


def test_task_digest_is_the_same_wherever_the_files_lie(tmp_path):
    job_a, _ = _digest_tree(tmp_path / "a")
    job_b, _ = _digest_tree(tmp_path / "b")
    assert _digest(job_a) == _digest(job_b)
    job_c, _ = _digest_tree(tmp_path / "c", {"name": "t", "limit": 2})
    assert _digest(job_c) != _digest(job_a)  # a job's override is part of the task


def test_task_digest_names_a_missing_data_file(tmp_path):
    from raycompress.evaluation.taskfiles import task_digest

    job, tasks = _digest_tree(tmp_path)
    (task,) = resolve_tasks(job)
    (tasks / "d.jsonl").unlink()
    with pytest.raises(TaskError, match=r"task 't': path: cannot read .*d\.jsonl"):
        task_digest(task, job.resolve)
