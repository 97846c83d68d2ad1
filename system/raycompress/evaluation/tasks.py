"""Turn a `TaskConfig` into token-level work units, and work-unit results into metrics.

Perplexity tasks: the documents are joined with blank lines, tokenized once and cut into
non-overlapping windows of `seq_len` tokens (the GPTQ / SparseGPT evaluation protocol), the first
`max_tokens` tokens only when a cap is set. Multiple-choice tasks: one (context, continuation)
request per choice, the first `limit` items when a cap is set.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from raycompress.config import JobConfig, TaskConfig
from raycompress.evaluation.metrics import mc_metrics, perplexity_metrics
from raycompress.evaluation.scoring import encode_pair
from raycompress.registry import TASK_KINDS


@dataclass
class PreparedTask:
    cfg: TaskConfig
    kind: str  # "nll" (windows) or "ll" (context/continuation pairs)
    requests: list = field(default_factory=list)
    items: list = field(default_factory=list)  # MCItem per item (multiple choice)


def prepare_task(job: JobConfig, task: TaskConfig, tokenizer) -> PreparedTask:
    """Read the task's file with its registered reader and tokenize it into requests.

    Raises:
        FileNotFoundError: the task's data file is missing (named with the task).
        KeyError: the task's `format` has no registered reader.
    """
    path = job.resolve(task.path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluate.tasks[{task.name}].path: {path} not found")
    data = TASK_KINDS.get(task.format)(path)
    if task.kind == "perplexity":
        ids = tokenizer("\n\n".join(data), add_special_tokens=False)["input_ids"]
        if task.max_tokens:
            ids = ids[: task.max_tokens]
        windows = [ids[i : i + task.seq_len] for i in range(0, len(ids), task.seq_len)]
        return PreparedTask(task, "nll", [w for w in windows if len(w) > 1])
    items = data[: task.limit] if task.limit else data
    reqs = [encode_pair(tokenizer, it.context, ch) for it in items for ch in it.choices]
    return PreparedTask(task, "ll", reqs, items)


def finalize_task(prep: PreparedTask, results: list) -> dict:
    """Metrics for one task from the per-request results (in request order)."""
    if prep.kind == "nll":
        nll = sum(r[0] for r in results)
        tokens = sum(r[1] for r in results)
        return {**perplexity_metrics(nll, tokens), "domain": prep.cfg.domain, "windows": len(prep.requests)}
    lls, k = [], 0
    for it in prep.items:
        lls.append([results[k + j][0] for j in range(len(it.choices))])
        k += len(it.choices)
    m = mc_metrics(lls, [it.choices for it in prep.items], [it.label for it in prep.items])
    return {**m, "domain": prep.cfg.domain}
