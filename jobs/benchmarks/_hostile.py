"""Hostile inputs for `chaos.py`: bad job files, task files and checkpoints that must be refused
cleanly, and a corpus of broken files that must be skipped and counted. Inputs that try to run code
create a marker file under WORKDIR/markers if they succeed. Returns one dict per input:
{input, kind, clean, before_ray, seconds, error}."""
from __future__ import annotations

import copy
import gzip
import json
import pickle
import shutil
import struct
from pathlib import Path

from chaos import first_error, hostile_result, run_cli, write_job

TIMEOUT_S = 240.0  # a hostile input still running after this is a hang (chaos.py raises it to 3x the reference run)


def marker_dir(work: Path) -> Path:
    return work / "markers"


def markers(work: Path) -> list[str]:
    """Marker files a hostile input managed to create (must be none)."""
    d = marker_dir(work)
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def _set(job: dict, dotted: str, value) -> dict:
    job = copy.deepcopy(job)
    *parents, leaf = dotted.split(".")
    node = job
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return job


def bad_configs(job: dict) -> dict[str, dict]:
    """name -> a job that is wrong in one field."""
    cases = {
        "unknown_top_level_key": _set(job, "colour", "blue"),
        "unknown_compress_key": _set(job, "compress.sparsityy", 0.5),
        "n_samples_not_a_number": _set(job, "select.n_samples", "many"),
        "n_samples_boolean": _set(job, "select.n_samples", True),
        "n_samples_beyond_pool": _set(job, "select.n_samples", 100000),
        "sparsity_1_5": _set(job, "compress.sparsity", 1.5),
        "n_m_n_ge_m": _set(job, "compress.n_m", [4, 4]),
        "unknown_algorithm": _set(job, "compress.algorithm", "obs_magic"),
        "unknown_select_method": _set(job, "select.method", "vibes"),
        "unknown_task": _set(job, "evaluate.tasks", [{"name": "no_such_task"}]),
        "missing_corpus_file": _set(job, "select.sources.biomed.path", "/nonexistent/corpus.jsonl"),
        "bad_targets": _set(job, "compress.targets", ["mlp.nonexistent_proj"]),
        "sparsity_list_wrong_length": _set(job, "compress.sparsity", [0.5, 0.5]),
        "torch_threads_negative": _set(job, "ray.torch_threads", -3),
        "gpus_per_actor_negative": _set(job, "ray.gpus_per_actor", -1),
        "missing_model_folder": _set(job, "model", "/nonexistent/model"),
    }
    cases.update(absurd_sizes(job))
    gptq = _set(job, "compress.algorithm", "gptq")
    cases["group_size_not_dividing"] = _set(gptq, "compress.quant", {"bits": 4, "group_size": 48})
    return cases


def absurd_sizes(job: dict) -> dict[str, dict]:
    """Sizes no cluster or corpus can give: to be refused before Ray work starts, never waited on."""
    return {"compress_actors_1000000": _set(job, "ray.compress_actors", 1000000),
            "n_samples_1000000000": _set(job, "select.n_samples", 1000000000),
            "seq_len_10e12": _set(job, "select.seq_len", 10**12)}


def _task_job(work: Path, job: dict, name: str, body: dict, items: list) -> dict:
    """A job evaluating one task `name` (`body`) over `items`, in a task folder of its own."""
    folder = work / "tasks" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (folder / f"{name}.yaml").write_text(json.dumps({"name": name, **body}))
    return _set(job, "evaluate", {**job["evaluate"], "task_dirs": [str(folder)], "tasks": [{"name": name}]})


def template_bombs(work: Path, job: dict, smoke: bool = False) -> dict[str, dict]:
    """Templates that are harmless on item 0 and explode (time, memory, recursion, Jinja errors that
    are not template errors) on item 1 or item 1000: the preflight must render every item."""
    mc = {"kind": "multiple_choice", "path": "items.jsonl", "choices": ["{{a}}", "{{b}}"], "target": "{{label}}"}
    item = lambda **kw: {"q": "ab", "n": 1, "a": "yes", "b": "no", "label": 0, **kw}  # noqa: E731
    loops = "{% for x in q %}{% for y in q %}{{x}}{% endfor %}{% endfor %}"
    cases = {  # name: (prompt, items)
        "bomb_nested_range_item1": ("{% for i in range(n) %}{% for j in range(n) %}.{% endfor %}{% endfor %}",
                                    [item(), item(n=99999)]),
        "bomb_nested_loops_item1000": (loops, [item() for _ in range(1000)] + [item(q="x" * 50000)]),
        "jinja_range_overflow_item1": ("{{ range(n) | list | length }}", [item(), item(n=10**20)]),
        "jinja_memory_error_item1": ("{{ q * n }}", [item(), item(n=10**15)]),
        "jinja_include_no_loader": ("{% include 'other.txt' %}{{q}}", [item(), item()]),
        "jinja_recursion": ("{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(q) }}", [item(), item()]),
        "item_not_a_mapping_item1": ("{{q}}", [item(), "just a string"]),
    }
    if not smoke:  # ~4 GB in whichever process renders it, if nothing stops it
        cases["bomb_repeat_item1"] = ("{{ q * n }}", [item(), item(q="abcd", n=10**9)])
    return {f"task_{k}": _task_job(work, job, k, {**mc, "prompt": prompt}, items) for k, (prompt, items) in cases.items()}


def hostile_tasks(work: Path, job: dict) -> dict[str, dict]:
    """Task files that try to run code through a template or read files outside their folder, each
    in its own task folder (with its own copy of the items)."""
    m = marker_dir(work)
    items = "\n".join(json.dumps({"q": f"question {i}", "a": "yes", "b": "no", "label": 0}) for i in range(4)) + "\n"
    base = {"kind": "multiple_choice", "path": "items.jsonl", "choices": ["{{a}}", "{{b}}"], "target": "{{label}}"}
    files = {
        "template_runs_os_system": {**base, "prompt": "{{ cycler.__init__.__globals__.os.system('touch %s/jinja') }}" % m},
        "choice_runs_os_system": {**base, "prompt": "{{q}}", "choices": ["{{ joiner.__init__.__globals__.os.system('touch %s/choice') }}" % m, "{{b}}"]},
        "template_reads_etc_hostname": {**base, "prompt": "{{ lipsum.__globals__['__builtins__'].open('/etc/hostname').read() }}"},
        "path_outside_folder": {**base, "prompt": "{{q}}", "path": "../../../../../../etc/passwd"},
        "include_outside_folder": {"include": "../../../../../../etc/passwd", "prompt": "{{q}}"},
        "include_loop": {"include": "include_loop.yaml", "prompt": "{{q}}"},
    }
    out = {}
    for name, body in files.items():
        folder = work / "tasks" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "items.jsonl").write_text(items)
        (folder / f"{name}.yaml").write_text(json.dumps({"name": name, **body}))
        out[f"task_{name}"] = _set(job, "evaluate", {**job["evaluate"], "task_dirs": [str(folder)], "tasks": [{"name": name}]})
    return out


def _safetensors_parts(f: Path) -> tuple[dict, bytes]:
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_safetensors(f: Path, header: dict, data: bytes) -> None:
    h = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(h)) + h + data)


class _RunsCode:
    """Unpickling this creates a marker file: what a pickle checkpoint can do to whoever loads it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.path}",)


def hostile_checkpoints(work: Path, good: Path, job: dict) -> dict[str, dict]:
    """Copies of a good checkpoint folder, each broken one way."""
    import torch

    root = work / "checkpoints"
    m = marker_dir(work)

    def variant(name: str) -> Path:
        d = root / name
        shutil.copytree(good, d)
        return d

    shards = lambda d: sorted(d.glob("*.safetensors"))  # noqa: E731
    d = variant("truncated")
    f = shards(d)[0]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    d = variant("lying_header")
    f = shards(d)[0]
    header, data = _safetensors_parts(f)
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"] = [0, len(data) * 4]
    _write_safetensors(f, header, data)
    d = variant("nan_weights")
    f = shards(d)[0]
    from safetensors.torch import load_file, save_file

    tensors = load_file(f)
    key = next(k for k in sorted(tensors) if "layers.1." in k and k.endswith("proj.weight"))
    tensors[key][0, :3] = float("nan")
    save_file(tensors, f, metadata={"format": "pt"})
    d = variant("missing_shard")  # the index sends one tensor to a shard that is not there
    index = d / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.exists() else {
        k: shards(d)[0].name for k in _safetensors_parts(shards(d)[0])[0] if k != "__metadata__"}
    weight_map[sorted(weight_map)[-1]] = "model-00009-of-00009.safetensors"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    d = variant("pickle_only")
    for f in shards(d):
        f.unlink()
    (d / "model.safetensors.index.json").unlink(missing_ok=True)
    torch.save({"w": _RunsCode(str(m / "pickle"))}, d / "pytorch_model.bin")
    d = variant("auto_map_remote_code")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="evil_llama", architectures=["EvilForCausalLM"],
               auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"})
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "evil.py").write_text(f"import os\nos.system('touch {m}/auto_map')\n")
    d = variant("unsupported_architecture")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(architectures=["MambaForCausalLM"], model_type="mamba")
    (d / "config.json").write_text(json.dumps(cfg))
    return {f"checkpoint_{p.name}": _set(job, "model", str(p)) for p in sorted(root.iterdir())}


def broken_corpus(work: Path, job: dict) -> tuple[dict, list[str]]:
    """A corpus folder of broken files beside good ones, read through one glob (format: auto)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = work / "corpus"
    d.mkdir(parents=True, exist_ok=True)
    good = [json.dumps({"text": f"A valid document number {i} about cells and proteins. " * 4}) for i in range(40)]
    (d / "good.jsonl").write_text("\n".join(good) + "\n")
    (d / "malformed.jsonl").write_text("{not json\n" + good[0] + "\n[1, 2]\n{\"no_text\": 1}\n")
    (d / "blank_lines.jsonl").write_text(good[1] + "\n\n   \n" + good[2] + "\n")
    (d / "invalid_utf8.jsonl").write_bytes(b'{"text": "caf\xe9 \xff\xfe"}\n' + good[3].encode() + b"\n")
    (d / "nul_bytes.jsonl").write_bytes(b'{"text": "a\x00b"}\n\x00\x00\x00\n' + good[4].encode() + b"\n")
    (d / "empty.jsonl").write_bytes(b"")
    (d / "huge_line.jsonl").write_text(json.dumps({"text": "x" * (100 << 20)}) + "\n")
    full = gzip.compress(("\n".join(good) + "\n").encode())
    (d / "truncated.jsonl.gz").write_bytes(full[: len(full) // 2])
    (d / "fake.parquet").write_bytes(b"PAR1 this is not parquet at all")
    pq.write_table(pa.table({"text": pa.array([1, 2, 3], pa.int64())}), d / "wrong_schema.parquet")
    (d / "plain.txt").write_text("A plain text document mixed into the glob. " * 20)
    src = {"path": str(d / "*"), "format": "auto"}
    corpus_job = _set(_set(job, "select.sources", {"biomed": src, "general": job["select"]["sources"]["general"]}),
                      "select.n_samples", 8)
    bad = ["malformed.jsonl", "blank_lines.jsonl", "invalid_utf8.jsonl", "nul_bytes.jsonl", "empty.jsonl",
           "huge_line.jsonl", "truncated.jsonl.gz", "fake.parquet", "wrong_schema.parquet"]
    return corpus_job, bad


def _refusal(name: str, kind: str, work: Path, job: dict, stage: str = "run") -> dict:
    job_file = write_job(work / "jobs" / f"{name}.yaml", job)
    res = run_cli([stage, job_file, "--output", work / "bad" / name], timeout=TIMEOUT_S)
    out = {"input": name, "kind": kind, **hostile_result(res)}
    if kind == "template":  # the one-line error names the task (and the item)
        task = name.removeprefix("task_")
        out.update(names_task=task in out["error"], names_item="item" in out["error"].lower())
    return out


SMOKE = ("unknown_top_level_key", "n_samples_1000000000")


def run_all(work: Path, job: dict, ref: Path, smoke: bool = False) -> list[dict]:
    from raycompress.models.fetch import resolve_model

    marker_dir(work).mkdir(exist_ok=True)
    configs = bad_configs(job)
    if smoke:
        return [_refusal(n, "config", work, configs[n]) for n in SMOKE]
    out = [_refusal(n, "config", work, j) for n, j in configs.items()]
    out += [_refusal(n, "template", work, j) for n, j in template_bombs(work, job).items()]
    good = Path(resolve_model(job["model"], work, job["storage"]["cache_dir"]).local())
    out += [_refusal(n, "checkpoint", work, j) for n, j in hostile_checkpoints(work, good, job).items()]
    out += [_refusal(n, "task_file", work, j) for n, j in hostile_tasks(work, job).items()]
    corpus_job, bad = broken_corpus(work, job)
    res = run_cli(["select", write_job(work / "jobs" / "corpus.yaml", corpus_job), "--output", work / "corpus_out"])
    skipped = {}
    if res["rc"] == 0:
        skipped = json.loads((work / "corpus_out" / "select" / "manifest.json").read_text())["skipped"].get("biomed", {})
    for name in bad:
        out.append({"input": f"corpus_{name}", "kind": "corpus", "clean": res["rc"] == 0 and bool(skipped.get(name)),
                    "skip_reasons": skipped.get(name), "seconds": res["seconds"],
                    "error": "" if res["rc"] == 0 else first_error(res["out"])})
    return out
