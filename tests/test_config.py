"""config.load_config: the shipped job validates; errors name field and file."""
import re
import shutil
from pathlib import Path

import pytest
import yaml

from raycompress.config import ConfigError, load_config

JOB = Path(__file__).resolve().parents[1] / "jobs" / "smollm2-biomed-sparsegpt50.yaml"


def _variant(tmp_path, edit, name="job.yaml"):
    raw = yaml.safe_load(JOB.read_text())
    edit(raw)
    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw))
    return p


def test_good_config_loads(tmp_path):
    p = tmp_path / "job.yaml"
    shutil.copy(JOB, p)
    job = load_config(p)
    assert job.name == "smollm2-biomed-sparsegpt50"
    assert job.select.mix == {"biomed": 0.75, "general": 0.25}
    assert job.select.n_samples == 64 and job.select.seq_len == 512
    assert job.compress.algorithm == "sparsegpt" and job.compress.sparsity == 0.5 and job.compress.n_m is None
    assert [t.name for t in job.evaluate.tasks] == ["wikitext2", "biomed_abstracts", "piqa", "pubmedqa"]
    assert job.ray.compress_actors == 2
    # no pyproject above tmp_path: relative paths resolve against the job file's folder
    assert Path(job.base_dir) == tmp_path.resolve()
    assert job.resolve("data/x.jsonl") == str(tmp_path.resolve() / "data" / "x.jsonl")
    assert job.resolve("s3://bucket/x.jsonl?endpoint_override=h:1") == "s3://bucket/x.jsonl?endpoint_override=h:1"
    assert job.resolve("/abs/y") == "/abs/y"


def test_paths_resolve_against_the_job_files_folder():
    job = load_config(JOB)
    assert Path(job.base_dir) == JOB.parent
    assert all(Path(job.resolve(s.path)).is_file() for s in job.select.sources.values())


def test_job_file_outside_the_repository_finds_shipped_tasks_and_their_data(tmp_path):
    from raycompress.evaluation.taskfiles import resolve_tasks

    raw = yaml.safe_load(JOB.read_text())
    raw["select"]["sources"] = {"biomed": {"path": "corpus.jsonl"}, "general": {"path": "corpus.jsonl"}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    job = load_config(tmp_path / "job.yaml")
    assert job.resolve("corpus.jsonl") == str(tmp_path.resolve() / "corpus.jsonl")
    tasks = resolve_tasks(job)  # names only: found in the shipped jobs/tasks, data paths from each task file
    assert [t.name for t in tasks] == ["wikitext2", "biomed_abstracts", "piqa", "pubmedqa"]
    for t in tasks:
        assert Path(t.path).is_file() and Path(t.path).is_relative_to(JOB.parents[1] / "data"), t.path


def test_unknown_field_names_dotted_path_and_file(tmp_path):
    p = _variant(tmp_path, lambda r: r["compress"].update(sparsityy=0.5), "typo.yaml")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert "compress.sparsityy" in msg
    assert str(p) in msg


def test_bad_value_names_field(tmp_path):
    p = _variant(tmp_path, lambda r: r["compress"].update(sparsity=1.5))
    with pytest.raises(ConfigError, match=r"compress\.sparsity"):
        load_config(p)


def test_mix_not_summing_to_one(tmp_path):
    p = _variant(tmp_path, lambda r: r["select"].update(mix={"biomed": 0.5, "general": 0.25}))
    with pytest.raises(ConfigError, match="sum to 1"):
        load_config(p)


def test_mix_unknown_source(tmp_path):
    p = _variant(tmp_path, lambda r: r["select"].update(mix={"biomed": 0.5, "legal": 0.5}))
    with pytest.raises(ConfigError, match="legal"):
        load_config(p)


def test_mix_defaults_to_uniform(tmp_path):
    job = load_config(_variant(tmp_path, lambda r: r["select"].pop("mix")))
    assert job.select.mix == {"biomed": 0.5, "general": 0.5}


def test_n_m_order(tmp_path):
    with pytest.raises(ConfigError, match=r"compress\.n_m"):
        load_config(_variant(tmp_path, lambda r: r["compress"].update(n_m=[4, 2]), "a.yaml"))
    job = load_config(_variant(tmp_path, lambda r: r["compress"].update(n_m=[2, 4]), "b.yaml"))
    assert tuple(job.compress.n_m) == (2, 4)


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
    q = tmp_path / "bad.yaml"
    q.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(q)


def test_compress_sources_must_be_calibration_sources(tmp_path):
    dims = {"language": ["general"], "domain": ["biomed"], "task": ["legal_qa"]}
    p = _variant(tmp_path, lambda r: r.update(compress={"algorithm": "cus_prun", "sparsity": 0.25,
                                                        "cus_prun": {"dimensions": dims}}))
    with pytest.raises(ConfigError, match=r"\['legal_qa'\] that select.sources does not define"):
        load_config(p)
    p = _variant(tmp_path, lambda r: r["compress"].update(mixcal={"general_sources": ["web"]}))
    with pytest.raises(ConfigError, match=r"\['web'\]"):
        load_config(p)


@pytest.mark.parametrize("section,field", [("select", "n_samples"), ("compress", "sparsity"), ("ray", "compress_actors")])
def test_yaml_true_is_not_a_number(tmp_path, section, field):
    p = _variant(tmp_path, lambda r: r.setdefault(section, {}).update({field: True}), "bool.yaml")
    with pytest.raises(ConfigError, match=rf"field '{field}': expected a number, got True"):
        load_config(p)


@pytest.mark.parametrize("field,value", [("torch_threads", -3), ("gpus_per_actor", -1), ("num_cpus", 0)])
def test_impossible_ray_values_fail_at_load(tmp_path, field, value):
    p = _variant(tmp_path, lambda r: r.setdefault("ray", {}).update({field: value}), "ray.yaml")
    with pytest.raises(ConfigError, match=rf"field 'ray.{field}"):
        load_config(p)


@pytest.mark.parametrize(("compress", "message"), [
    ({"algorithm": "gptq", "scheme": "W3A5"}, "unknown scheme 'W3A5'"),
    ({"algorithm": "awq", "scheme": "FP8"}, "algorithm 'awq' takes a weight-only integer scheme"),
    ({"algorithm": "wanda", "scheme": "FP8"}, "'scheme' is supported with gptq, rtn, awq or sparsegpt"),
    ({"algorithm": "wanda", "smoothquant": {"alpha": 0.5}}, "'smoothquant' smooths before quantizing"),
    ({"algorithm": "gptq", "scheme": "W8A8", "smoothquant": {"alpha": 1.5}}, "less than or equal to 1"),
    ({"algorithm": "sparsegpt", "kv_cache": {"type": "fp8"}}, "'kv_cache' is written with a quantized checkpoint"),
    ({"algorithm": "gptq", "scheme": "W4A16", "quant": {"bits": 4}}, "give 'scheme' or 'quant', not both"),
    ({"algorithm": "rtn"}, "algorithm 'rtn' needs a 'scheme'"),
    ({"algorithm": "gptq", "scheme": "W4A16", "awq": {"n_grid": 10}}, "an 'awq' section needs algorithm 'awq'"),
])
def test_scheme_recipes_refused_with_the_field(compress, message):
    from raycompress.config import CompressConfig

    with pytest.raises(ValueError, match=re.escape(message) if "(" not in message else message):
        CompressConfig.model_validate(compress)


def test_scheme_aliases_resolve_to_presets():
    from raycompress.config import CompressConfig
    from raycompress.models.quantized import resolve

    assert resolve(CompressConfig(algorithm="gptq", scheme="w8a8-int8")).name == "W8A8"
    assert resolve(CompressConfig(algorithm="rtn", scheme="FP8", kv_cache={"type": "fp8"})).kv is not None
    assert resolve(CompressConfig(algorithm="sparsegpt")) is None
