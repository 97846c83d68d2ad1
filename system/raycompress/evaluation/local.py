"""Tasks -> requests -> results for a whole task list, and an in-process evaluation (no Ray) for
benchmarks and notebooks; the Ray pool (`distributed/evaluate.py`) shares the first and last step."""
from __future__ import annotations

from raycompress.config import TaskConfig
from raycompress.evaluation.groups import group_results
from raycompress.evaluation.scoring import Request, loglikelihoods, model_max_length
from raycompress.evaluation.tasks import PreparedTask, finalize_task, prepare_task


def prepare_all(tasks: list[TaskConfig], tokenizer, max_len: int, resolve) -> tuple[list[PreparedTask], list[Request]]:
    """Every task's requests, and all of them concatenated in task order."""
    prepared = [prepare_task(t, tokenizer, max_len, resolve) for t in tasks]
    return prepared, [r for p in prepared for r in p.requests]


def finalize_all(prepared: list[PreparedTask], results: list[tuple[float, bool]]) -> dict:
    """{"tasks": {name: record}, "groups": {name: record}} from the results of all requests, in
    the order `prepare_all` concatenated them."""
    records, outcomes, start = {}, {}, 0
    for p in prepared:
        records[p.cfg.name], outcomes[p.cfg.name] = finalize_task(p, results[start : start + len(p.requests)])
        start += len(p.requests)
    return {"tasks": records, "groups": group_results(records, outcomes)}


def evaluate_in_process(model, tokenizer, tasks: list[TaskConfig], resolve, batch_tokens: int = 4096) -> dict:
    """Score `tasks` on a loaded causal LM in this process (no Ray); same numbers as the pool.

    Args:
        resolve: maps a task's data path to a location, a URI or an absolute path (e.g. `JobConfig.resolve`).
    Returns:
        {"tasks": {name: record}, "groups": {...}} as in `evaluate/results.json`.
    """
    max_len = model_max_length(model.config, tokenizer)
    prepared, requests = prepare_all(tasks, tokenizer, max_len, resolve)
    return finalize_all(prepared, loglikelihoods(model, requests, max_len, batch_tokens))
