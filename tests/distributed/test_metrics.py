"""distributed.metrics: safe without Ray, the Grafana dashboard plots every metric, the progress
reporter's log lines; named compression actors (the live Prometheus scrape is in tests/test_submit.py)."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from raycompress.distributed import metrics

REPO = Path(__file__).resolve().parents[2]


def test_record_without_ray_is_a_no_op_and_names_are_checked(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    metrics.record("raycompress_layers_done", 3, "job")  # no Ray: nothing happens, nothing raises
    with pytest.raises(KeyError):
        metrics.record("raycompress_typo", 1, "job")


def test_grafana_dashboard_plots_every_metric():
    dash = json.loads((REPO / "infra" / "grafana" / "raycompress.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    used = set(re.findall(r"ray_raycompress_[a-z_]+", exprs))
    for name, (kind, _, _) in metrics.METRICS.items():
        assert any(u.startswith(f"ray_{name}") for u in used), f"{name} is on no panel"
    assert used <= metrics.prometheus_names(), sorted(used - metrics.prometheus_names())
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "job"}


def test_progress_logs_rate_and_eta(caplog):
    with caplog.at_level(logging.INFO, logger=metrics.__name__):
        p = metrics.Progress("evaluate[dense]", 100, "requests", every_s=1e9, step=0.5)
        for _ in range(10):
            p.update(10)
        p.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2  # at 50% and at 100%, not every update
    assert re.match(r"evaluate\[dense\]: 50/100 requests \(50%\), [\d.]+ requests/s, ETA \d+ s", lines[0])
    assert lines[1].startswith("evaluate[dense]: 100/100 requests (100%)")


@pytest.mark.integration
def test_compression_actors_are_named(ray_local, tiny_llama_dir):
    import torch
    from ray._private.state import actors

    from raycompress.config import JobConfig
    from raycompress.distributed.compress import _spawn
    from raycompress.models.fetch import ModelRef

    job = JobConfig.model_validate({"model": str(tiny_llama_dir), "select": {"sources": {"a": {"path": "x"}}},
                                    "compress": {}, "evaluate": {"tasks": []},
                                    "ray": {"cpus_per_actor": 0.5, "gpus_per_actor": 0, "torch_threads": 1}})
    ids = torch.randint(0, 256, (4, 8), generator=torch.Generator().manual_seed(0))
    spawned = _spawn(job, ModelRef(str(tiny_llama_dir)), [ids[:2], ids[2:]], [{}, {}], attempt=1)
    try:
        ray_local.get([a.placement.remote() for a in spawned])
        alive = {a["Name"] for a in actors().values() if a["State"] == "ALIVE"}
        assert {"compress-0-r1", "compress-1-r1"} <= alive
    finally:
        for a in spawned:
            ray_local.kill(a)
