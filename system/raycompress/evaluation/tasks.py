"""A task's items -> log-likelihood requests, and request results -> the task's metrics.

Multiple choice (lm-eval's `multiple_choice` output type): context = description + few-shot
examples (the first `num_fewshot` of `fewshot_path`, each "prompt + delimiter + answer +
fewshot_delimiter") + prompt; one request per choice with continuation target_delimiter + choice.
Perplexity (lm-eval's `loglikelihood_rolling`): each document, detokenized when the task says so,
is cut into `rolling_windows`; words and bytes are counted on the document before detokenization
(as lm-eval's wikitext task does).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from raycompress.config import TaskConfig
from raycompress.evaluation.formats import READERS, TEXT_FILTERS
from raycompress.evaluation.metrics import (DEFAULT_METRICS, METRICS, mc_outcomes, mc_summary,
                                            perplexity_summary)
from raycompress.evaluation.sandbox import render
from raycompress.evaluation.scoring import Request, encode_pair, prefix_token, rolling_windows
from raycompress.evaluation.taskfiles import TaskError
from raycompress.registry import TASK_KINDS
from raycompress.storage import uri


@dataclass
class PreparedTask:
    """A task's requests; `spans[i]` = (first request, count) of item i; `items[i]` = (choices,
    gold) for multiple choice or (words, bytes, tokens) for a perplexity document."""

    cfg: TaskConfig
    requests: list[Request] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    items: list[tuple] = field(default_factory=list)

    def add(self, reqs: list[Request], item: tuple) -> None:
        self.spans.append((len(self.requests), len(reqs)))
        self.requests.extend(reqs)
        self.items.append(item)


def _site(task: TaskConfig, n: int, file: str) -> str:
    """How messages name one item: "task 'piqa': item 3 of data/eval/piqa.jsonl"."""
    return f"task '{task.name}': item {n} of {file}"


def _gold(task: TaskConfig, row: dict, choices: list[str], site: str) -> int:
    """The answer's index: `target` renders to an index, or to the text of one choice."""
    t = render(task.target or "", row, f"{site}: field 'target'").strip()
    if t.lstrip("-").isdigit() and 0 <= int(t) < len(choices):
        return int(t)
    if t in choices:
        return choices.index(t)
    raise TaskError(f"{site}: field 'target': '{t}' is neither an index below {len(choices)} nor one of {choices}")


def _mc_item(task: TaskConfig, row: dict, site: str, description: bool = True) -> tuple[str, str, list[str], int]:
    """One multiple-choice item rendered: (description, prompt, choices, gold index); a few-shot
    example (`description=False`) renders no description."""
    choices = [render(c, row, f"{site}: field 'choices'") for c in task.choices or []]
    head = render(task.description, row, f"{site}: field 'description'") if description else ""
    return head, render(task.prompt, row, f"{site}: field 'prompt'"), choices, _gold(task, row, choices, site)


def _ppl_item(task: TaskConfig, row: dict, site: str) -> str:
    return render(task.prompt, row, f"{site}: field 'prompt'")


_RENDER_ITEM = {"multiple_choice": _mc_item, "perplexity": _ppl_item}  # by TaskConfig.kind


def _fewshot_block(task: TaskConfig, resolve) -> str:
    if not task.num_fewshot:
        return ""
    location = str(resolve(task.fewshot_path))
    if not uri.is_file(location):
        raise TaskError(f"task '{task.name}': field 'fewshot_path': {uri.display(location)} not found")
    shots = READERS.get(task.format)(location)[: task.num_fewshot]
    if len(shots) < task.num_fewshot:
        raise TaskError(f"task '{task.name}': field 'num_fewshot': {uri.display(location)} has {len(shots)} "
                        f"examples, fewer than {task.num_fewshot}")
    out = []
    for n, row in enumerate(shots):
        _, prompt, choices, gold = _mc_item(task, row, _site(task, n, uri.display(location)), description=False)
        out.append(prompt + task.target_delimiter + choices[gold] + task.fewshot_delimiter)
    return "".join(out)


@TASK_KINDS.register("multiple_choice")
def _prepare_mc(task: TaskConfig, rows: list[dict], file: str, tokenizer, max_length: int,
                resolve) -> PreparedTask:
    prep, prefix = PreparedTask(task), prefix_token(tokenizer)
    shots = _fewshot_block(task, resolve)
    for n, row in enumerate(rows):
        head, prompt, choices, gold = _mc_item(task, row, _site(task, n, file))
        reqs = [encode_pair(tokenizer, head + shots + prompt, task.target_delimiter + c, prefix) for c in choices]
        prep.add(reqs, (choices, gold))
    return prep


@TASK_KINDS.register("perplexity")
def _prepare_ppl(task: TaskConfig, rows: list[dict], file: str, tokenizer, max_length: int,
                 resolve) -> PreparedTask:
    prep, prefix = PreparedTask(task), prefix_token(tokenizer)
    detok = TEXT_FILTERS.get(task.detokenize) if task.detokenize else (lambda s: s)
    budget = task.max_tokens
    for n, row in enumerate(rows):
        text = _ppl_item(task, row, _site(task, n, file))
        ids = tokenizer(detok(text), add_special_tokens=False)["input_ids"]
        if budget is not None and len(ids) >= budget:  # the cap cuts this document: count what is kept
            ids = ids[:budget]
            text = tokenizer.decode(ids)
        if ids:
            windows = rolling_windows(ids, prefix, task.max_length or max_length, task.stride)
            prep.add(windows, (len(re.split(r"\s+", text)), len(text.encode("utf-8")), len(ids)))
        if budget is not None:
            budget -= len(ids)
            if budget <= 0:
                break
    return prep


def _rows(task: TaskConfig, resolve) -> tuple[list[dict], str]:
    """The items the task scores (the first `limit`) and its data file's display name."""
    location = str(resolve(task.path))
    if not uri.is_file(location):
        raise TaskError(f"task '{task.name}': field 'path': {uri.display(location)} not found")
    rows = READERS.get(task.format)(location)
    return (rows[: task.limit] if task.limit else rows), uri.display(location)


def check_templates(task: TaskConfig, resolve) -> None:
    """Render every template of `task` on every item it scores and on its few-shot examples, in
    the bounded sandbox (`evaluation.sandbox`), without tokenizing: before any work starts, an
    escape, a bomb, a syntax error, a field an item lacks or a target that is no choice, in any
    item, is refused.

    Raises:
        TaskError: one line naming the task, the item and its file, and the field.
        ValueError: the data file is not UTF-8 or a JSONL line is malformed.
    """
    rows, file = _rows(task, resolve)
    _fewshot_block(task, resolve)
    render_item = _RENDER_ITEM[task.kind]
    for n, row in enumerate(rows):
        render_item(task, row, _site(task, n, file))


def prepare_task(task: TaskConfig, tokenizer, max_length: int, resolve) -> PreparedTask:
    """Read the task's data file and turn its items into requests.

    Args:
        max_length: the model's context length (tokens): the default perplexity window.
        resolve: maps a data path from the task to a location, a URI or an absolute path
            (`JobConfig.resolve`).
    Raises:
        TaskError: the data file (or few-shot file) is missing or has too few examples, or an
            item lacks a field a template names (naming the location and the item).
        ValueError: the data file is not UTF-8 or a JSONL line is malformed (naming location and line).
    """
    rows, file = _rows(task, resolve)
    return TASK_KINDS.get(task.kind)(task, rows, file, tokenizer, max_length, resolve)


def finalize_task(prep: PreparedTask, results: list[tuple[float, bool]]) -> tuple[dict, dict[str, list[float]]]:
    """(the task's result record, per-metric per-item outcomes for group averages) from the
    per-request (log-likelihood, greedy) results in request order."""
    task = prep.cfg
    names = task.metrics or DEFAULT_METRICS[task.kind]
    per_item = [[ll for ll, _ in results[a : a + k]] for a, k in prep.spans]
    if task.kind == "perplexity":
        docs = [(sum(lls), *item) for lls, item in zip(per_item, prep.items)]
        metrics, stderr, outcomes = perplexity_summary(names, docs), {}, {}
    else:
        outcomes = mc_outcomes(names, per_item, [c for c, _ in prep.items], [g for _, g in prep.items])
        metrics, stderr = mc_summary(outcomes)
    record = {"domain": task.domain, "kind": task.kind, "group": task.group,
              "primary": task.primary or names[0],
              "higher_is_better": {m: METRICS.get(m).higher_is_better for m in names},
              "metrics": metrics, "stderr": stderr, "n": len(prep.items)}
    return record, outcomes
