"""distributed.metrics: safe without Ray, nothing at import; the Grafana dashboard plots every
metric; the progress reporter's log lines; one structured line per finished layer; under a local
Ray, actors are named compress-N / eval-N in the job's namespace and the metrics reach the node's
Prometheus endpoint (the scrape of a real head during a submitted job is in tests/test_submit.py)."""
from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raycompress.distributed import metrics
from raycompress.distributed.naming import actor_name
from raycompress.distributed.progress import ProgressLog

REPO = Path(__file__).resolve().parents[2]


def test_record_without_ray_is_a_no_op_and_names_are_checked(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert not metrics.enabled()
    metrics.record("raycompress_layers_done", 3, "job")  # no Ray: nothing happens, nothing raises
    metrics.record("raycompress_tokens", 5, "job", stage="compress", model="dense")
    with pytest.raises(KeyError):
        metrics.record("raycompress_typo", 1, "job")
    with pytest.raises(ValueError, match="tags"):  # a missing tag is caught even without Ray
        metrics.record("raycompress_tokens", 5, "job", stage="compress")
    monkeypatch.delitem(sys.modules, "ray")
    assert not metrics.enabled()  # Ray never imported: not running, and not imported to find out


def test_importing_metrics_imports_no_ray_and_makes_no_metric():
    code = ("import sys, raycompress.distributed.metrics as m; "
            "assert 'ray' not in sys.modules, 'ray imported'; assert m._metric.cache_info().currsize == 0")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_prometheus_names():
    names = metrics.prometheus_names()
    assert {"ray_raycompress_stage", "ray_raycompress_documents_total", "ray_raycompress_layer_seconds_bucket",
            "ray_raycompress_layer_seconds_sum", "ray_raycompress_layer_seconds_count"} <= names
    assert len(names) == sum(3 if kind == "histogram" else 1 for kind, _, _ in metrics.METRICS.values())


def test_grafana_dashboard_plots_every_metric():
    dash = json.loads((REPO / "infra" / "grafana" / "raycompress.json").read_text())
    assert dash["schemaVersion"] >= 36
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = set(re.findall(r"ray_raycompress_[a-z_]+", " ".join(exprs)))
    for name in metrics.METRICS:
        assert any(u.startswith(f"ray_{name}") for u in used), f"{name} is on no panel"
    assert used <= metrics.prometheus_names(), sorted(used - metrics.prometheus_names())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert set(variables) == {"datasource", "job"} and variables["datasource"]["query"] == "prometheus"
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dash["panels"])
    for e in exprs:  # Prometheus owns `job` (the scrape job): ours is job_name
        assert f'{metrics.JOB_TAG}=~"$job"' in e and not re.search(r"\bjob\s*(=|,|\))", e), e


def test_progress_logs_rate_and_eta(caplog):
    with caplog.at_level(logging.INFO, logger="raycompress.distributed.progress"):
        p = ProgressLog("evaluate[dense]", 100, "requests", every_s=1e9, step=0.5)
        for _ in range(10):
            p.update(10)
        p.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2  # at 50% and at 100%, not every update
    assert re.match(r"evaluate\[dense\]: 50/100 requests \(50%\), [\d.]+ requests/s, ETA \d+ s", lines[0])
    assert lines[1].startswith("evaluate[dense]: 100/100 requests (100%)")


def test_progress_logs_every_10_seconds_on_slow_progress(caplog):
    now = [0.0]
    with caplog.at_level(logging.INFO, logger="raycompress.distributed.progress"):
        p = ProgressLog("evaluate[x]", 1000, "requests", clock=lambda: now[0])
        for _ in range(30):  # 1 request per 2 s: 0.1% a step, a line every 10 s
            now[0] += 2.0
            p.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 6 and lines[0].startswith("evaluate[x]: 5/1000 requests (0%), 0.5 requests/s, ETA 1990 s")


def test_actor_names():
    assert [actor_name("compress", 0), actor_name("eval", 3, 2)] == ["compress-0", "eval-3-r2"]


def test_one_structured_line_per_layer(tiny_llama_dir, tmp_path, caplog):
    from raycompress.config import CompressConfig
    from raycompress.engine.pipeline import LocalBackend, compress_layers
    from raycompress.engine.worker import LayerWorker
    from raycompress.models.weights import OffloadedModel

    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.INFO, logger="raycompress.engine.pipeline"):
        compress_layers(LocalBackend([LayerWorker(str(tiny_llama_dir), ids)]), OffloadedModel(tiny_llama_dir),
                        CompressConfig(algorithm="sparsegpt", sparsity=0.5), tmp_path, "fp")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("layer ")]
    pattern = r"layer {}/2 done: seconds=[\d.]+ modules=7 mean_rel_error=[\d.e-]+ bytes=\d+ sha256=[0-9a-f]{{12}}"
    assert len(lines) == 2 and all(re.fullmatch(pattern.format(i + 1), ln) for i, ln in enumerate(lines)), lines


def _alive(namespace: str) -> set[str]:
    """Names of the live named actors in `namespace` (from the GCS: no dashboard needed)."""
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == namespace}


def _scrape(job_name: str, want: set[str], timeout: float = 40.0) -> set[str]:
    """Series names with job_name=`job_name` on this node's metrics endpoint, once `want` are there."""
    import ray

    url = f"http://127.0.0.1:{ray._private.worker._global_node.metrics_export_port}/metrics"
    deadline, seen = time.monotonic() + timeout, set()
    while time.monotonic() < deadline and not want <= seen:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        seen |= {ln.split("{")[0] for ln in text.splitlines()
                 if ln.startswith("ray_raycompress_") and f'{metrics.JOB_TAG}="{job_name}"' in ln}
        time.sleep(1)
    return seen


def _job(model_dir, name: str, evaluate: dict | None = None, **ray_cfg):
    from raycompress.config import JobConfig

    return JobConfig.model_validate({
        "name": name, "model": str(model_dir), "select": {"sources": {"x": {"path": "unused"}}},
        "compress": {"algorithm": "sparsegpt"}, "evaluate": {"tasks": [], **(evaluate or {})},
        "ray": {"cpus_per_actor": 0.5, "gpus_per_actor": 0, "torch_threads": 1, **ray_cfg}})


@pytest.mark.integration
def test_compress_run_names_actors_and_exports_metrics(ray_local, tiny_llama_dir, tmp_path, monkeypatch):
    from raycompress.distributed.compress import run_compress
    from raycompress.distributed.naming import actor_namespace
    from raycompress.engine import pipeline

    calib = tmp_path / "calibration.parquet"
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    pq.write_table(pa.table({"input_ids": pa.array(ids.tolist(), pa.list_(pa.int32()))}), calib)
    name = f"metrics-{tmp_path.name}"
    namespace, seen = actor_namespace(name), set()
    mark = pipeline.Progress.mark

    def mark_and_look(self, idx, records, layer):  # while the actors work
        mark(self, idx, records, layer)
        seen.update(_alive(namespace))

    monkeypatch.setattr(pipeline.Progress, "mark", mark_and_look)
    run_compress(_job(tiny_llama_dir, name, compress_actors=2), tiny_llama_dir, calib, tmp_path / "out", "fp")
    assert seen == {"compress-0", "compress-1"} and re.fullmatch(rf"raycompress-[0-9a-f]+-{name}", namespace)
    want = {"ray_raycompress_layers_done", "ray_raycompress_layers_total", "ray_raycompress_layer_seconds_bucket",
            "ray_raycompress_tokens_total", "ray_raycompress_bytes_written_total",
            "ray_raycompress_hessian_bytes_moved_total"}
    assert want <= _scrape(name, want)


@pytest.mark.integration
def test_eval_pool_names_actors_and_reports_progress(ray_local, tiny_llama_dir, monkeypatch, caplog):
    from raycompress.distributed import evaluate
    from raycompress.distributed.naming import actor_namespace
    from raycompress.models.fetch import ModelRef

    namespace, seen, pool = actor_namespace("metrics-eval"), set(), evaluate.run_pool

    def run_pool_and_look(spawn, units, n_actors, call, max_restarts, on_unit):
        def on(k, result):
            seen.update(_alive(namespace))
            on_unit(k, result)
        return pool(spawn, units, n_actors, call, max_restarts, on)

    monkeypatch.setattr(evaluate, "run_pool", run_pool_and_look)
    job = _job(tiny_llama_dir, "metrics-eval", {"unit_tokens": 20}, eval_actors=2)  # several units: both work
    requests = [([i % 7 + 1] * 6, [i % 5 + 2, 3]) for i in range(12)]
    with caplog.at_level(logging.INFO, logger="raycompress.distributed.progress"):
        out, restarts, seconds = evaluate.score_model(job, ModelRef(str(tiny_llama_dir)), requests, 64, "dense")
    assert seen == {"eval-0", "eval-1"} and restarts == 0 and len(out) == len(seconds) == 12
    assert all(s > 0 for s in seconds)
    assert caplog.records[-1].getMessage().startswith("evaluate[dense]: 12/12 requests (100%)")
    want = {"ray_raycompress_eval_requests_done_total", "ray_raycompress_eval_requests_total",
            "ray_raycompress_tokens_total"}
    assert want <= _scrape("metrics-eval", want)
