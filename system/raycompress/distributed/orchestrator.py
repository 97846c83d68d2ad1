"""The job as an explicit state machine: PENDING -> SELECTED -> COMPRESSED -> EVALUATED -> REPORTED.

Each stage reads what the earlier one wrote in the output folder and writes its own sub-folder;
`state.json` records, per finished stage, its wall seconds and peak memory, so a rerun skips
finished stages and a single stage can run on its own (`raycompress compress ...`). The validated
job config is saved as `job.json` beside it, so a report can be rebuilt from the folder alone.
"""
from __future__ import annotations

import json
import logging
from enum import Enum
from pathlib import Path

from raycompress.config import JobConfig
from raycompress.models.checkpoint import write_atomic_text

log = logging.getLogger(__name__)


class Stage(str, Enum):
    SELECT = "select"
    COMPRESS = "compress"
    EVALUATE = "evaluate"
    REPORT = "report"


ORDER = [Stage.SELECT, Stage.COMPRESS, Stage.EVALUATE, Stage.REPORT]


class JobState:
    """`out_dir/state.json`: finished stages with their metrics."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / "state.json"
        self.stages: dict[str, dict] = json.loads(self.path.read_text())["stages"] if self.path.is_file() else {}

    def done(self, stage: Stage) -> bool:
        return stage.value in self.stages

    def finish(self, stage: Stage, record: dict) -> None:
        self.stages[stage.value] = record
        write_atomic_text(self.path, json.dumps({"stages": self.stages}, indent=2))


def _fingerprint(job: JobConfig, model_dir: Path, out_dir: Path) -> str:
    import hashlib

    manifest = json.loads((out_dir / "select" / "manifest.json").read_text())
    src = json.dumps({"model": str(model_dir), "calibration": manifest["calibration_sha256"],
                      "compress": job.compress.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(src.encode()).hexdigest()


def run_stage(stage: Stage, job: JobConfig, out_dir: Path, model_dir: Path) -> dict:
    """Run one stage (Ray already initialised); returns the stage's own summary."""
    from raycompress.distributed.compress import run_compress
    from raycompress.distributed.evaluate import evaluate_models
    from raycompress.distributed.select import run_select
    from raycompress.report.report import write_report

    if stage is Stage.SELECT:
        m = run_select(job, model_dir, out_dir / "select")
        return {"fingerprint": m["fingerprint"], "n": len(m["selected"])}
    if stage is Stage.COMPRESS:
        r = run_compress(job, model_dir, out_dir / "select" / "calibration.parquet", out_dir / "compress",
                         _fingerprint(job, model_dir, out_dir))
        return {"modules": len(r["modules"])}
    if stage is Stage.EVALUATE:
        models = {"compressed": out_dir / "compress" / "model"}
        if job.evaluate.include_dense:
            models = {"dense": model_dir, **models}
        res = evaluate_models(job, models)
        (out_dir / "evaluate").mkdir(parents=True, exist_ok=True)
        write_atomic_text(out_dir / "evaluate" / "results.json", json.dumps(res, indent=2))
        return {"models": list(res)}
    return {"files": write_report(job, out_dir)}


def run_job(job: JobConfig, out_dir: Path, stages: list[Stage], model_dir: Path) -> JobState:
    """Run `stages` in order, skipping those `state.json` already records as finished."""
    from raycompress.distributed.monitor import StageMonitor
    from raycompress.distributed.resources import init_ray

    out_dir.mkdir(parents=True, exist_ok=True)
    # the validated config, so that `raycompress report DIR` needs nothing but the folder
    write_atomic_text(out_dir / "job.json", json.dumps(job.model_dump(mode="json"), indent=2))
    state = JobState(out_dir)
    init_ray(job.ray)
    for stage in stages:
        if state.done(stage) and stage is not Stage.REPORT:
            log.info("stage %s already finished in %s; skipping", stage.value, out_dir)
            continue
        log.info("stage %s: start", stage.value)
        with StageMonitor() as mon:
            summary = run_stage(stage, job, out_dir, model_dir)
        state.finish(stage, {"wall_s": round(mon.seconds, 2), "peak_rss_mb": round(mon.peak_rss_mb, 1), **summary})
        log.info("stage %s: %.1f s, peak %.0f MiB", stage.value, mon.seconds, mon.peak_rss_mb)
    return state
