"""sweep.config: a sweep file expands into validated jobs, one per variant combination and seed."""
import pytest
import yaml

from raycompress.config import ConfigError
from raycompress.sweep.config import load_sweep

BASE = {"name": "b", "model": "m", "select": {"method": "zipcal", "mix": {"bio": 0.75, "gen": 0.25}, "seed": 7,
        "sources": {"bio": {"path": "bio.jsonl"}, "gen": {"path": "gen.jsonl"}}},
        "compress": {"algorithm": "sparsegpt", "sparsity": 0.5}, "evaluate": {"tasks": ["wikitext2"]}}


def _write(tmp_path, sweep, base=BASE):
    (tmp_path / "jobs").mkdir(exist_ok=True)
    (tmp_path / "jobs" / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "sw.yaml").write_text(yaml.safe_dump({"base": "jobs/base.yaml", **sweep}))
    return tmp_path / "sw.yaml"


def test_grid_of_named_variants_shorthand_axes_and_seeds(tmp_path):
    sweep, points = load_sweep(_write(tmp_path, {
        "seeds": [0, 1], "set": {"select.n_samples": 16},
        "axes": {"calib": {"bio": {"select.mix": {"bio": 1.0}},
                           "mix": {"select.mix": {"bio": 0.5, "gen": 0.5},
                                   "compress.mixcal": {"general_sources": ["gen"], "lam": 0.1}}},
                 "compress.sparsity": [0.5, 0.6]}}))
    assert sweep.name == "sw" and len(points) == 2 * 2 * 2
    assert [p.label for p in points[:4]] == ["bio+sparsity=0.5", "bio+sparsity=0.5", "bio+sparsity=0.6", "bio+sparsity=0.6"]
    p = points[0]
    assert p.seed == 0 and p.folder == "points/bio+sparsity=0.5/seed-0"
    assert p.job.select.mix == {"bio": 1.0}  # replaced whole, not merged with the base's mix
    assert p.job.select.n_samples == 16 and p.job.evaluate.include_dense is False
    assert p.job.name == "sw.bio+sparsity=0.5.s0" and p.job.base_dir == str((tmp_path / "jobs").resolve())
    mix = next(q for q in points if q.label == "mix+sparsity=0.6" and q.seed == 1)
    assert mix.job.compress.mixcal.lam == 0.1 and mix.job.compress.sparsity == 0.6 and mix.job.select.seed == 1
    assert mix.variants == {"calib": "mix", "compress.sparsity": "sparsity=0.6"}
    assert len({q.job.name for q in points}) == len(points)


def test_default_seed_is_the_base_jobs(tmp_path):
    _, points = load_sweep(_write(tmp_path, {"axes": {"a": {"x": {}}}}))
    assert [(p.label, p.seed) for p in points] == [("x", 7)]


@pytest.mark.parametrize("sweep, match", [
    ({"axes": {"a": {"x": {"evaluate.tasks": []}}}}, r"axes\.a\.x: 'evaluate\.tasks' cannot vary in a sweep"),
    ({"set": {"model": "other"}}, r"set: 'model' cannot vary"),
    ({"axes": {"a": {"bad label": {}}}}, r"label 'bad label'"),
    ({"axes": {"a": {}}}, r"axes\.a: no variants"),
    ({"axes": {"a": {"x": {"compress.algoritm": "wanda"}}}}, r"point x seed 7: the job it makes is invalid\n"
                                                              r"  field 'compress\.algoritm'"),
    ({"axes": {"a": {"x": {"select.mix": {"nope": 1.0}}}}}, r"point x seed 7"),
    ({"seeds": [1, 1]}, r"field 'seeds'"),
    ({"paralel": 2}, r"field 'paralel'"),
])
def test_bad_sweeps_are_refused_naming_the_field(tmp_path, sweep, match):
    with pytest.raises(ConfigError, match=match):
        load_sweep(_write(tmp_path, sweep))


def test_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="sweep file not found"):
        load_sweep(tmp_path / "none.yaml")
    (tmp_path / "sw.yaml").write_text("base: nothere.yaml\n")
    with pytest.raises(ConfigError, match=r"field 'base': job file not found: .*nothere\.yaml"):
        load_sweep(tmp_path / "sw.yaml")
