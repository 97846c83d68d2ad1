"""cli: a bad job is one message naming the field and exit 2, before Ray starts; --debug shows
the traceback instead; a relative --output inside a Ray job is refused."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raycompress.cli import main

SMOKE = Path(__file__).resolve().parents[1] / "jobs" / "smoke.yaml"


def _variant(tmp_path, **compress) -> Path:
    raw = yaml.safe_load(SMOKE.read_text())
    raw["compress"].update(compress)
    text = yaml.safe_dump(raw).replace("../data", str(SMOKE.parents[1] / "data"))
    p = tmp_path / "job.yaml"
    p.write_text(text.replace("random:models", f"random:{SMOKE.parent}/models"))
    return p


def test_bad_algorithm_is_one_message_before_ray(tmp_path, capsys, monkeypatch):
    import ray

    monkeypatch.setenv("RAYCOMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    was_up = ray.is_initialized()
    job = _variant(tmp_path, algorithm="sparsegtp")
    assert main(["run", str(job), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {job}: compress.algorithm: unknown compression algorithm 'sparsegtp'; known: [")
    assert "Traceback" not in err and ray.is_initialized() == was_up and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="compress.algorithm"):
        main(["--debug", "run", str(job), "--output", str(tmp_path / "out")])


def test_relative_output_inside_a_ray_job_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert main(["run", str(SMOKE), "--output", "runs/x"]) == 2
    assert "inside a Ray job" in capsys.readouterr().err
