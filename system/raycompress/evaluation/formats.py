"""Task readers, registered by `format` in `registry.TASK_KINDS`.

A perplexity reader returns a list of texts; a multiple-choice reader returns `MCItem`s whose
prompts follow lm-evaluation-harness's task YAMLs (piqa: "Question: {goal}\\nAnswer:", choices
" {sol}"; pubmedqa: "Abstract: {context}\\nQuestion: {question}\\nAnswer:", choices yes/no/maybe).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from raycompress.registry import TASK_KINDS


@dataclass(frozen=True)
class MCItem:
    context: str
    choices: tuple[str, ...]  # continuations, each with its leading space
    label: int


def _jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: malformed JSON line: {exc}") from exc
    return rows


def _field(row: dict, key: str, path: Path, n: int):
    if key not in row:
        raise ValueError(f"{path}: item {n} has no field '{key}'")
    return row[key]


@TASK_KINDS.register("text")
def read_text(path: Path) -> list[str]:
    """The whole file as one text (WikiText-2 raw)."""
    return [path.read_text(encoding="utf-8")]


@TASK_KINDS.register("jsonl_text")
def read_jsonl_text(path: Path) -> list[str]:
    """The `text` field of each JSONL line."""
    return [str(_field(r, "text", path, n)) for n, r in enumerate(_jsonl(path))]


@TASK_KINDS.register("piqa")
def read_piqa(path: Path) -> list[MCItem]:
    items = []
    for n, r in enumerate(_jsonl(path)):
        ctx = f"Question: {_field(r, 'goal', path, n)}\nAnswer:"
        sols = (" " + str(_field(r, "sol1", path, n)), " " + str(_field(r, "sol2", path, n)))
        items.append(MCItem(ctx, sols, int(_field(r, "label", path, n))))
    return items


PUBMEDQA_LABELS = ("yes", "no", "maybe")


@TASK_KINDS.register("pubmedqa")
def read_pubmedqa(path: Path) -> list[MCItem]:
    items = []
    for n, r in enumerate(_jsonl(path)):
        ctx = f"Abstract: {_field(r, 'context', path, n)}\nQuestion: {_field(r, 'question', path, n)}\nAnswer:"
        label = str(_field(r, "label", path, n)).lower()
        if label not in PUBMEDQA_LABELS:
            raise ValueError(f"{path}: item {n} label '{label}' not in {PUBMEDQA_LABELS}")
        items.append(MCItem(ctx, tuple(" " + c for c in PUBMEDQA_LABELS), PUBMEDQA_LABELS.index(label)))
    return items
