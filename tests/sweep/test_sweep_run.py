"""distributed.sweep on a local Ray: 2 algorithms x 2 seeds of the tiny job, 2 points at once; each
seed's selection made once and shared, the dense model evaluated once, every point an ordinary
run folder with a whole report, the sweep report written, and a rerun reusing everything."""
import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sweep_run(tiny_job_dir, ray_local, tmp_path_factory):
    from raycompress.models.fetch import ModelRef
    from raycompress.sweep.config import load_sweep
    from raycompress.distributed.sweep import run_sweep

    root = tmp_path_factory.mktemp("sweep")
    base = yaml.safe_load((tiny_job_dir / "job.yaml").read_text())  # one actor per stage: half the actor starts
    base["ray"].update(compress_actors=1, eval_actors=1)
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    (root / "sw.yaml").write_text(yaml.safe_dump({
        "base": "base.yaml", "seeds": [0, 1], "parallel": 2,
        "set": {"select.method": "random"},  # ZipCal on this 40-document pool picks the same rows for any seed
        "axes": {"algorithm": {"sparsegpt": {}, "magnitude": {"compress.algorithm": "magnitude"}}}}))
    sweep, points = load_sweep(root / "sw.yaml")
    model = ModelRef(str(tiny_job_dir / "model"))
    return sweep, points, model, root / "out", run_sweep(sweep, points, model, str(root / "out"))


def test_sweep_shares_selection_and_dense_and_reports(sweep_run):
    sweep, points, model, out, result = sweep_run
    assert result["errors"] == {} and result["at_once"] == 2
    assert len(list((out / "selections").iterdir())) == 2  # one per seed, not one per point
    dense = json.loads((out / "dense" / "results.json").read_text())["dense"]
    for p in points:
        run = out / p.folder
        state = json.loads((run / "state.json").read_text())["stages"]
        assert "shared_from" in state["select"] and {"compress", "evaluate"} <= set(state)
        res = json.loads((run / "evaluate" / "results.json").read_text())
        assert set(res) == {"dense", "compressed"} and res["dense"] == dense
        assert "dense" in (run / "report.md").read_text()
    for seed in (0, 1):
        a, b = (out / f"points/{alg}/seed-{seed}/select/calibration.parquet" for alg in ("sparsegpt", "magnitude"))
        assert a.read_bytes() == b.read_bytes()

    report = json.loads((out / "sweep.json").read_text())
    assert set(report["points"]) == {"sparsegpt", "magnitude"} and report["seeds"] == [0, 1]
    for p in report["points"].values():
        assert p["n"] == 2 and p["seeds"] == [0, 1] and p["dominated_by"] is not None
        ret = p["retention"]["general"]
        assert 0 < ret["mean"] and ret["sd"] is not None
    assert report["points"]["sparsegpt"]["tasks"]["ppl"]["sd"] > 0  # seeds select different rows
    assert all(p["distinct_calibrations"] == 2 for p in report["points"].values())
    assert report["points"]["magnitude"]["tasks"]["ppl"]["sd"] == 0  # magnitude reads no calibration
    assert report["seed_noise"]["general_ppl"] is not None and report["verdicts"]["general"]["best"] in report["points"]
    md, html = (out / "sweep.md").read_text(), (out / "sweep.html").read_text()
    assert "| point | seeds |" in md and "Seed noise" in md and "Best general retention" in md
    assert "data:image/png;base64," in html


def _stage_outputs(out: Path) -> dict[str, tuple[bytes, int]]:
    """Every file a stage writes when it runs, and only then -> (bytes, mtime_ns): the stage
    records (`state.json`: a stage that ran again records its own wall_s and peak RSS), the
    calibration sets, the compressed shards, the dense results and what made them."""
    patterns = ("**/state.json", "**/select/calibration.parquet", "**/compress/model/*.safetensors", "dense/*.json")
    return {p.relative_to(out).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for pattern in patterns for p in out.glob(pattern)}


def test_rerun_reuses_every_stage(sweep_run):
    """A rerun runs no stage again: every stage record and every stage's output is the same
    file, untouched (a unit runs in a Ray task, whose log the driver's caplog never sees)."""
    from raycompress.distributed.sweep import run_sweep

    sweep, points, model, out, _ = sweep_run
    before_report = json.loads((out / "sweep.json").read_text())
    before = _stage_outputs(out)
    states = [k for k in before if k.endswith("state.json")]
    assert len(states) == len(points) + 2  # each point, and the two shared selections
    assert sum(k.endswith(".safetensors") for k in before) >= len(points)
    assert {"dense/results.json", "dense/inputs.json"} <= set(before)
    again = run_sweep(sweep, points, model, str(out))
    assert again["errors"] == {}
    after = _stage_outputs(out)
    assert after.keys() == before.keys()
    changed = sorted(k for k in before if after[k] != before[k])
    assert changed == [], f"re-ran or rewrote: {changed}"
    for p in points:  # every stage of every point is recorded as finished before and after
        stages = json.loads((out / p.folder / "state.json").read_text())["stages"]
        assert {"select", "compress", "evaluate"} <= set(stages)
    assert json.loads((out / "sweep.json").read_text())["points"] == before_report["points"]
