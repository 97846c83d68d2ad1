"""Evaluate stage on Ray: a pool of `EvalActor` actors, each loading a checkpoint once and
scoring work units of log-likelihood requests; the driver tokenizes, cuts units, aggregates.

Units are fixed before any actor starts (requests sorted by length, cut at `unit_tokens`), and an
actor scores a unit the same way wherever it runs, so 1 or K actors, or an actor that died and was
replaced (its unit re-run on the replacement), give the same numbers. Actors take GPUs when the
cluster has them, CPU otherwise; `evaluate.device_map: auto` loads a model too large for one
device across GPUs and CPU memory with accelerate.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from pathlib import Path

import ray

from raycompress.config import JobConfig
from raycompress.distributed.resources import actor_options, torch_threads
from raycompress.evaluation.local import finalize_all, prepare_all
from raycompress.evaluation.scoring import Request, model_input
from raycompress.evaluation.taskfiles import resolve_tasks

log = logging.getLogger(__name__)

CHAOS_ENV = ("RAYCOMPRESS_CHAOS_KILL_EVAL_UNIT", "RAYCOMPRESS_CHAOS_MARKER")


def _chaos(unit: int) -> None:
    """Failure injection for tests: the first actor to start unit N (RAYCOMPRESS_CHAOS_KILL_EVAL_UNIT)
    dies at once, leaving a marker file (RAYCOMPRESS_CHAOS_MARKER) so that it happens once."""
    target, marker = (os.environ.get(k) for k in CHAOS_ENV)
    if not (target and marker and unit == int(target)):
        return
    try:
        Path(marker).touch(exist_ok=False)
    except FileExistsError:
        return
    os._exit(1)


class EvalActor:
    """Holds one model; scores units of requests. All maths is in `evaluation.scoring`."""

    def __init__(self, model_dir: str, threads: int, dtype: str, device_map: str | None) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        kwargs: dict = {"dtype": getattr(torch, dtype)}
        if device_map:
            import tempfile

            kwargs.update(device_map=device_map, offload_folder=tempfile.mkdtemp(prefix="raycompress-offload-"))
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()
        if not device_map and torch.cuda.is_available():
            self.model.to("cuda")

    def score(self, unit: int, requests: list[Request], max_len: int, batch_tokens: int) -> list[tuple[float, bool]]:
        from raycompress.evaluation.scoring import loglikelihoods

        _chaos(unit)
        return loglikelihoods(self.model, requests, max_len, batch_tokens)


def make_units(requests: list[Request], max_len: int, unit_tokens: int) -> list[list[int]]:
    """Request indices cut into units of about `unit_tokens` model-input tokens, longest first.

    Requests with the same model input stay in one unit (they share a forward pass there).
    """
    keys = [model_input(r, max_len) for r in requests]
    order = sorted(range(len(requests)), key=lambda i: (-len(keys[i]), keys[i]))
    units: list[list[int]] = []
    size = unit_tokens
    for pos, i in enumerate(order):
        same = pos > 0 and keys[order[pos - 1]] == keys[i]
        if size + len(keys[i]) > unit_tokens and not same:
            units.append([])
            size = 0
        units[-1].append(i)
        size += 0 if same else len(keys[i])
    return units


def run_pool(spawn, units: list[list[Request]], n_actors: int, call, max_restarts: int) -> tuple[list[list], int]:
    """Score every unit on a pool of `n_actors` from `spawn()`; a dead actor is replaced and its
    unit re-run. `call(actor, k, unit)` returns an ObjectRef. Returns (results per unit, restarts).

    Raises:
        ray.exceptions.RayActorError: actors died more than `max_restarts` times.
    """
    from ray.exceptions import RayActorError

    actors = [spawn() for _ in range(min(n_actors, len(units)))]
    todo, inflight = deque(range(len(units))), {}
    results: list = [None] * len(units)
    restarts = 0
    try:
        while todo or inflight:
            busy = {slot for slot, _ in inflight.values()}
            for slot in range(len(actors)):
                if slot not in busy and todo:
                    k = todo.popleft()
                    inflight[call(actors[slot], k, units[k])] = (slot, k)
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            slot, k = inflight.pop(ref)
            try:
                results[k] = ray.get(ref)
            except RayActorError as exc:
                if restarts >= max_restarts:
                    raise
                restarts += 1
                log.warning("eval actor %d died on unit %d (%s); replacing it (%d/%d)", slot, k,
                            type(exc).__name__, restarts, max_restarts)
                ray.kill(actors[slot])
                actors[slot] = spawn()
                todo.appendleft(k)
    finally:
        for a in actors:
            ray.kill(a)
    return results, restarts


def _context_length(model_dir: Path, tokenizer) -> int:
    from transformers import AutoConfig

    from raycompress.evaluation.scoring import model_max_length

    return model_max_length(AutoConfig.from_pretrained(model_dir), tokenizer)


def score_model(job: JobConfig, model_dir: Path, requests: list[Request], max_len: int) -> tuple[list, int]:
    """(log-likelihood, greedy) per request for one checkpoint, and the actor restarts it took."""
    ev = job.evaluate
    order = make_units(requests, max_len, ev.unit_tokens)
    env = {k: os.environ[k] for k in CHAOS_ENV if k in os.environ}
    opts = {**actor_options(job.ray), **({"runtime_env": {"env_vars": env}} if env else {})}
    actor_cls = ray.remote(EvalActor).options(**opts)
    spawn = lambda: actor_cls.remote(str(model_dir), torch_threads(job.ray), ev.dtype, ev.device_map)  # noqa: E731
    call = lambda a, k, unit: a.score.remote(k, unit, max_len, ev.batch_tokens)  # noqa: E731
    per_unit, restarts = run_pool(spawn, [[requests[i] for i in u] for u in order], job.ray.eval_actors,
                                  call, ev.max_actor_restarts)
    out: list = [None] * len(requests)
    for idx, res in zip(order, per_unit):
        for i, r in zip(idx, res):
            out[i] = r
    return out, restarts


def evaluate_models(job: JobConfig, models: dict[str, Path]) -> dict:
    """Score every task of the job on every model, with the same requests.

    Returns:
        {label: {"seconds": wall s, "restarts": int, "tasks": {name: record}, "groups": {name: record}}}
        (records as `finalize_task` / `group_results` write them).
    Raises:
        FileNotFoundError: a model folder has no config.json.
        TaskError: a task file or the job's task list is wrong (named file and field).
    """
    from transformers import AutoTokenizer

    for label, path in models.items():
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"model '{label}': {path} has no config.json")
    tasks = resolve_tasks(job)
    first = Path(next(iter(models.values())))
    tokenizer = AutoTokenizer.from_pretrained(first)
    max_len = _context_length(first, tokenizer)
    prepared, requests = prepare_all(tasks, tokenizer, max_len, job.resolve)
    log.info("evaluate: %d tasks, %d requests, context length %d", len(tasks), len(requests), max_len)
    out: dict[str, dict] = {}
    for label, path in models.items():
        t0 = time.perf_counter()
        results, restarts = score_model(job, Path(path), requests, max_len)
        scored = finalize_all(prepared, results)
        out[label] = {"seconds": time.perf_counter() - t0, "restarts": restarts, **scored}
        log.info("evaluate[%s]: %.1f s", label, out[label]["seconds"])
    return out
