"""The job as an explicit state machine: PENDING -> SELECTED -> COMPRESSED [-> TRAINED] -> EVALUATED
-> REPORTED (TRAINED only when the job has a `train` section).

Each stage reads what the earlier one wrote in the output folder and writes its own sub-folder;
`state.json` records, per finished stage, its wall seconds and peak memory, so a rerun skips
finished stages and a single stage can run on its own (`raycompress compress ...`). The validated
job config is saved as `job.json` beside it, so a report can be rebuilt from the folder alone.
The output folder is a location (local path or URI): every file in it is written atomically by
whoever produced it, and read back from there, so the driver and actors may be on any nodes.
"""
from __future__ import annotations

import json
import logging
from enum import Enum
from pathlib import Path

from raycompress.config import JobConfig
from raycompress.models.fetch import ModelRef
from raycompress.storage import uri

log = logging.getLogger(__name__)


class Stage(str, Enum):
    SELECT = "select"
    COMPRESS = "compress"
    TRAIN = "train"
    EVALUATE = "evaluate"
    REPORT = "report"


ORDER = [Stage.SELECT, Stage.COMPRESS, Stage.TRAIN, Stage.EVALUATE, Stage.REPORT]


def job_stages(job: JobConfig, stages: list[Stage]) -> list[Stage]:
    """`stages` less `train` when the job has no `train` section."""
    return [s for s in stages if s is not Stage.TRAIN or job.train is not None]


class JobState:
    """`out_dir/state.json` (local or URI): finished stages with their metrics."""

    def __init__(self, out_dir: str | Path) -> None:
        self.path = uri.join(out_dir, "state.json")
        self.stages: dict[str, dict] = json.loads(uri.read_text(self.path))["stages"] if uri.exists(self.path) else {}

    def done(self, stage: Stage) -> bool:
        return stage.value in self.stages

    def finish(self, stage: Stage, record: dict) -> None:
        self.stages[stage.value] = record
        uri.write_text(self.path, json.dumps({"stages": self.stages}, indent=2))


def _fingerprint(job: JobConfig, model: ModelRef, out_dir: str) -> str:
    """What a compression's progress belongs to: the model's content fingerprint, the calibration
    set's SHA-256 and the recipe; no location enters it."""
    import hashlib

    manifest = json.loads(uri.read_text(uri.join(out_dir, "select", "manifest.json")))
    src = json.dumps({"model": model.fingerprint(), "calibration": manifest["calibration_sha256"],
                      "compress": job.compress.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(src.encode()).hexdigest()


def run_stage(stage: Stage, job: JobConfig, out_dir: str, model: ModelRef, inputs: dict | None = None) -> dict:
    """Run one stage (Ray already initialised); returns the stage's own summary."""
    from raycompress.distributed import metrics
    from raycompress.distributed.compress import run_compress
    from raycompress.distributed.evaluate import evaluate_models
    from raycompress.distributed.select import run_select
    from raycompress.distributed.train import run_train
    from raycompress.report.report import write_report

    if stage is Stage.SELECT:
        m = run_select(job, model, uri.join(out_dir, "select"))
        return {"fingerprint": m["fingerprint"], "n": len(m["selected"])}
    if stage is Stage.COMPRESS:
        r = run_compress(job, model, uri.join(out_dir, "select", "calibration.parquet"), uri.join(out_dir, "compress"),
                         _fingerprint(job, model, out_dir))
        return {"modules": len(r["modules"])}
    if stage is Stage.TRAIN:
        return run_train(job, model, out_dir, inputs)
    if stage is Stage.EVALUATE:
        models = {"compressed": ModelRef(uri.join(out_dir, "compress", "model"), job.storage.cache_dir)}
        if job.train is not None:
            models["recovered"] = ModelRef(uri.join(out_dir, "train", "model"), job.storage.cache_dir)
        if job.evaluate.include_dense:
            models = {"dense": model, **models}
        res = evaluate_models(job, models)
        n = uri.write_text(uri.join(out_dir, "evaluate", "results.json"), json.dumps(res, indent=2))
        metrics.record("raycompress_bytes_written", n, job.name, stage="evaluate")
        return {"models": list(res)}
    return {"files": write_report(job, out_dir)}


def _forced(names: list[str] | tuple[str, ...]) -> set[str]:
    """The stages `--force-stage` redoes: each named one and every one after it."""
    order = [s.value for s in ORDER]
    first = min((order.index(n) for n in names), default=len(order))
    return set(order[first:])


def run_job(job: JobConfig, out_dir: str | Path, stages: list[Stage], model: ModelRef | str | Path,
            force_stages: tuple[str, ...] = ()) -> JobState:
    """Run `stages` in order, skipping those `state.json` already records as finished by this job.

    `out_dir` is a local path or URI; `model` is the job's model as `models.fetch.resolve_model`
    checked it. Before Ray starts: `plan.preflight` checks what the job names; the output folder
    must be ours or empty (`guard.claim_output`) and is locked (`guard.OutputLock`); a finished
    stage made by a different job (config, or the content of the model, corpus or task files:
    `guard.input_contents`) is refused unless `force_stages` names it or an earlier stage.

    Raises:
        plan.PreflightError, guard.ForeignOutput, guard.OutputBusy, guard.StageMismatch: before any work.
    """
    from raycompress.distributed.guard import OutputLock, check_stages, claim_output, input_contents, stage_inputs
    from raycompress.distributed.plan import PreflightError, preflight, require_resources
    from raycompress.distributed.train import check_train
    from raycompress.distributed.resources import init_ray

    out_dir = str(out_dir)
    model = model if isinstance(model, ModelRef) else ModelRef(str(model), job.storage.cache_dir)
    preflight(job, model)
    try:
        check_train(job)
    except ValueError as exc:
        raise PreflightError(str(exc)) from exc
    inputs = stage_inputs(job, input_contents(job, model))
    claim_output(out_dir)
    with OutputLock(out_dir):
        state = JobState(out_dir)
        forced = _forced(force_stages)
        check_stages(state.stages, inputs, out_dir, forced)
        for name in forced & set(state.stages):
            del state.stages[name]
        if Stage.COMPRESS.value in forced:
            uri.delete(uri.join(out_dir, "compress", "progress.json"))
        if Stage.TRAIN.value in forced:
            uri.delete_dir(uri.join(out_dir, "train", "runs"))
        # the validated config, so that `raycompress report DIR` needs nothing but the folder
        uri.write_text(uri.join(out_dir, "job.json"), json.dumps(job.model_dump(mode="json"), indent=2))
        init_ray(job.ray)
        require_resources(job, model)  # the dry run's check: a request the cluster cannot give is refused now
        for stage in job_stages(job, stages):
            _run_one(stage, job, out_dir, model, state, inputs.get(stage.value))
    return state


def _run_one(stage: Stage, job: JobConfig, out_dir: str, model: ModelRef, state: JobState, inputs: dict | None) -> None:
    from raycompress.distributed import metrics
    from raycompress.distributed.monitor import StageMonitor

    if state.done(stage) and stage is not Stage.REPORT:
        log.info("stage %s already finished in %s; skipping", stage.value, uri.display(out_dir))
        return
    log.info("stage %s: start", stage.value)
    metrics.record("raycompress_stage", 1, job.name, stage=stage.value)
    try:
        with StageMonitor() as mon:
            summary = run_stage(stage, job, out_dir, model, inputs)
    finally:
        metrics.record("raycompress_stage", 0, job.name, stage=stage.value)
    record = {"wall_s": round(mon.seconds, 2), "peak_rss_mb": round(mon.peak_rss_mb, 1), **summary}
    state.finish(stage, {**record, **({"inputs": inputs} if inputs else {})})
    log.info("stage %s: %.1f s, peak %.0f MiB", stage.value, mon.seconds, mon.peak_rss_mb)
