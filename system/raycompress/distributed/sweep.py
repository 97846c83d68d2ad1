"""The sweep on Ray (`raycompress sweep`): shared selections once, the dense model evaluated once,
then every point of `sweep.config` as an ordinary job run, several at once when the cluster has room.

Output folder (a local path or URI)::

    selections/<key>/   one select stage per distinct (model, select config): points that differ
                        only after selection get a copy of it and skip their own
    dense/results.json  the dense model on the evaluation tasks (with `inputs.json`: what made it)
    points/<label>/seed-<s>/   each point's run folder, as `raycompress run` writes it, with the
                        dense entry merged into its evaluate/results.json, so its report is whole
    sweep.json / .md / .html   the sweep report (`report.sweep`)

Each unit of work (a selection, the dense evaluation, a point) is a Ray task with no CPU of its own
(its stages start their actors as a job run does), pinned to the driver's node, where the job's
local paths are. At most `parallel` run at once, fewer when one point's actors (the most any of
its stages asks for) would not fit the cluster that many times. A point that fails is recorded
and the others go on; rerunning the sweep resumes every point (finished stages are skipped, and
a stage made by a different recipe is refused by the job's own guard).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time

import ray

from raycompress.config import JobConfig
from raycompress.models.fetch import ModelRef
from raycompress.storage import uri
from raycompress.sweep.config import Point, SweepConfig

log = logging.getLogger(__name__)


def select_key(job: JobConfig, contents: dict) -> str:
    """What a selection depends on (the select stage's inputs: config and the content digests of
    `guard.input_contents`), as a short hash."""
    from raycompress.distributed.guard import stage_inputs

    src = json.dumps(stage_inputs(job, contents)["select"], sort_keys=True)
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def point_resources(job: JobConfig, cluster_gpus: float) -> tuple[float, float]:
    """(CPUs, GPUs) one point holds at most: its largest stage's actors or Ray Train workers."""
    from raycompress.distributed.resources import gpus_per_actor

    r = job.ray
    gpa = gpus_per_actor(r, cluster_gpus)
    n = max(r.select_actors, r.compress_actors, r.eval_actors)
    cpus, gpus = n * r.cpus_per_actor, n * gpa
    if job.train is not None:
        t = job.train
        cpus, gpus = max(cpus, t.num_workers * t.cpus_per_worker), max(gpus, t.num_workers * t.gpus_per_worker)
    return cpus, gpus


def points_at_once(requested: int, points: list[Point], resources: dict) -> int:
    """How many points to run side by side: `requested`, capped by how many times the hungriest
    point fits the cluster's CPUs and GPUs (at least 1: a lone point waits for room as a job does)."""
    cpus, gpus = max((point_resources(p.job, resources.get("GPU", 0.0)) for p in points), default=(1.0, 0.0))
    fit = int(resources.get("CPU", 0.0) // cpus) if cpus else requested
    if gpus:
        fit = min(fit, int(resources.get("GPU", 0.0) // gpus))
    return max(1, min(requested, fit, len(points)))


# ---- the units of work, each run in a Ray task ----

def _select_unit(job: JobConfig, model: ModelRef, out: str) -> None:
    from raycompress.distributed.orchestrator import Stage, run_job

    run_job(job, out, [Stage.SELECT], model)


def _dense_unit(job: JobConfig, model: ModelRef, out: str) -> None:
    from raycompress.distributed.evaluate import evaluate_models
    from raycompress.distributed.guard import claim_output, input_contents

    contents = input_contents(job, model)
    inputs = {"model": contents["model"], "tasks": contents["tasks"],
              "evaluate": job.evaluate.model_dump(mode="json", include={"tasks", "dtype"})}
    claim_output(out)
    stamp = uri.join(out, "inputs.json")
    if uri.exists(stamp) and json.loads(uri.read_text(stamp)) == inputs and uri.exists(uri.join(out, "results.json")):
        log.info("dense model already evaluated in %s; skipping", uri.display(out))
        return
    res = evaluate_models(job, {"dense": model})
    uri.write_text(uri.join(out, "results.json"), json.dumps(res, indent=2))
    uri.write_text(stamp, json.dumps(inputs, indent=2))


def seed_selection(point_dir: str, selection_dir: str) -> bool:
    """Give a point folder a copy of a shared selection (its select/ files and state record)
    unless it already has a finished select stage. Returns whether it copied."""
    from raycompress.distributed.guard import claim_output
    from raycompress.distributed.orchestrator import JobState, Stage

    claim_output(point_dir)
    state = JobState(point_dir)
    if state.done(Stage.SELECT):
        return False
    for loc, rel in uri.glob_relative("**", uri.join(selection_dir, "select")):
        uri.copy(loc, uri.join(point_dir, "select", rel))
    record = JobState(selection_dir).stages[Stage.SELECT.value]
    state.finish(Stage.SELECT, {**record, "shared_from": uri.display(selection_dir)})
    return True


def _point_unit(job: JobConfig, model: ModelRef, out: str, selection_dir: str, dense_results: str) -> None:
    from raycompress.distributed.orchestrator import ORDER, Stage, run_job
    from raycompress.report.report import write_report

    if seed_selection(out, selection_dir):
        log.info("%s: selection shared from %s", job.name, uri.display(selection_dir))
    run_job(job, out, [s for s in ORDER if s is not Stage.REPORT], model)
    res_path = uri.join(out, "evaluate", "results.json")
    own = json.loads(uri.read_text(res_path))
    dense = json.loads(uri.read_text(dense_results))["dense"]
    uri.write_text(res_path, json.dumps({"dense": dense, **{k: v for k, v in own.items() if k != "dense"}}, indent=2))
    write_report(job, out)


def _run_bounded(units: list[tuple[str, object, tuple]], at_once: int) -> dict[str, str | None]:
    """Run (name, function, args) units as Ray tasks on this node, `at_once` at a time.
    Returns {name: None if it finished, else its error message}."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    pending, running, errors = list(units), {}, {}
    while pending or running:
        while pending and len(running) < at_once:
            name, fn, args = pending.pop(0)
            task = ray.remote(fn).options(num_cpus=0, max_retries=0, scheduling_strategy=here, name=f"sweep:{name}")
            running[task.remote(*args)] = (name, time.monotonic())
            log.info("sweep: %s started (%d running, %d waiting)", name, len(running), len(pending))
        done, _ = ray.wait(list(running), num_returns=1)
        name, t0 = running.pop(done[0])
        try:
            ray.get(done[0])
            errors[name] = None
            log.info("sweep: %s finished in %.0f s", name, time.monotonic() - t0)
        except Exception as exc:  # noqa: BLE001 - one unit's failure is recorded; the others go on
            cause = getattr(exc, "cause", None) or exc
            errors[name] = f"{type(cause).__name__}: {cause}".splitlines()[0][:500]
            log.error("sweep: %s failed: %s", name, errors[name])
    return errors


def run_sweep(sweep: SweepConfig, points: list[Point], model: ModelRef, out: str,
              parallel: int | None = None) -> dict:
    """Run every point (see the module docstring) and write the sweep report.

    Returns {"at_once", "seconds", "errors": {unit: message}, "files": report files}.

    Raises:
        plan.PreflightError: a point's job names something that does not exist (before Ray).
    """
    from raycompress.distributed.guard import claim_output, input_contents
    from raycompress.distributed.plan import preflight
    from raycompress.distributed.resources import init_ray
    from raycompress.report.sweep import write_sweep_report

    t0 = time.monotonic()
    for p in points:
        preflight(p.job, model)
    keys = {p.folder: select_key(p.job, input_contents(p.job, model)) for p in points}
    claim_output(out)
    init_ray(points[0].job.ray)
    at_once = points_at_once(parallel or sweep.parallel, points, ray.cluster_resources())
    log.info("sweep %s: %d points, %d distinct selections, %d at once", sweep.name, len(points),
             len(set(keys.values())), at_once)
    first = {}
    for p in points:
        first.setdefault(keys[p.folder], p)
    dense_dir = uri.join(out, "dense")
    units = [("dense", _dense_unit, (points[0].job, model, dense_dir))]
    units += [(f"select {k}", _select_unit, (p.job, model, uri.join(out, "selections", k))) for k, p in first.items()]
    errors = _run_bounded(units, at_once)
    failed = {k for k, e in errors.items() if e}
    units = [(p.folder, _point_unit, (p.job, model, uri.join(out, p.folder), uri.join(out, "selections", keys[p.folder]),
                                      uri.join(dense_dir, "results.json")))
             for p in points if "dense" not in failed and f"select {keys[p.folder]}" not in failed]
    errors.update(_run_bounded(units, at_once))
    errors = {k: e for k, e in errors.items() if e}
    seconds = time.monotonic() - t0
    files = write_sweep_report(sweep, points, out, errors, seconds, at_once)
    return {"at_once": at_once, "seconds": seconds, "errors": errors, "files": files}
