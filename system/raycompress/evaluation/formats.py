"""Task data readers (a task's `format`) and text filters (a task's `detokenize`), by name.

A reader turns one data file into a list of items (dicts whose fields the task's Jinja templates
name). A text filter maps a document's text to the text the model scores.

Readers take a location (local path or URI, see `storage.uri`); text is decoded as UTF-8 with
universal newlines ("\r\n" and "\r" read as "\n"), as a local file opened in text mode reads.
"""
from __future__ import annotations

import json
import os
import re
from typing import Callable

from raycompress.registry import Registry
from raycompress.storage import uri

Location = str | os.PathLike
READERS: Registry[Callable[[Location], list[dict]]] = Registry("task data format", "raycompress.evaluation.formats")
TEXT_FILTERS: Registry[Callable[[str], str]] = Registry("text filter", "raycompress.evaluation.formats")


def _text(location: Location) -> str:
    """The file at `location` as text (UTF-8, universal newlines).

    Raises:
        FileNotFoundError: nothing at `location` (named without its URI query).
        ValueError: the file is not UTF-8 (UnicodeDecodeError; the message names the location).
    """
    data = uri.read_bytes(location)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{uri.display(location)}: not UTF-8 text: {exc}") from exc
    return text.replace("\r\n", "\n").replace("\r", "\n")


@READERS.register("jsonl")
def read_jsonl(location: Location) -> list[dict]:
    """One item per non-blank JSON line.

    Raises:
        FileNotFoundError: nothing at `location`.
        ValueError: the file is not UTF-8, or a line is not a JSON object; the message names the
            location (`uri.display`) and the line number.
    """
    rows, where = [], uri.display(location)
    for n, line in enumerate(_text(location).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}:{n}: malformed JSON line: {exc}") from exc
        if not isinstance(row, dict):
            raise ValueError(f"{where}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


@READERS.register("text")
def read_text(location: Location) -> list[dict]:
    """The whole file as one item `{"text": ...}`.

    Raises:
        FileNotFoundError: nothing at `location`.
        ValueError: the file is not UTF-8.
    """
    return [{"text": _text(location)}]


HEADING = re.compile(r"^ = [^=].* = $")  # a top-level WikiText heading line, " = Title = "


def _rows(text: str) -> list[str]:
    """Invert `"\\n\\n".join(rows)` where each row is "" (a blank line) or ends with "\\n" (the
    Hugging Face `wikitext` rows, as plain-text dumps of it are written)."""
    rows, i, n = [], 0, len(text)
    while i <= n:
        if i == n or text.startswith("\n\n", i):
            rows.append("")
            i += 2
            continue
        j = text.find("\n", i)
        j = n - 1 if j < 0 else j
        rows.append(text[i : j + 1])
        i = j + 3
    return rows


def wikitext_pages(text: str) -> list[str]:
    """Split a raw WikiText dump into articles, one per top-level heading, as the `page` field of
    EleutherAI/wikitext_document_level (which lm-eval's `wikitext` task scores) holds them.

    The dump is the `wikitext-2-raw-v1` rows joined by blank lines; rows are turned back into the
    raw file's lines (a blank row is the raw " " line) and an article is every line from its
    " = Title = " heading to the next one, joined with "\\n". Lines before the first heading are
    dropped. (The exact whitespace of the upstream pages could not be checked offline.)
    """
    lines = [r[:-1] if r.endswith("\n") else (r or " ") for r in _rows(text.replace("\r\n", "\n"))]
    starts = [i for i, line in enumerate(lines) if HEADING.match(line)]
    return ["\n".join(lines[a:b]) for a, b in zip(starts, starts[1:] + [len(lines)])]


@READERS.register("wikitext")
def read_wikitext(location: Location) -> list[dict]:
    """WikiText raw dump -> one item `{"page": article}` per article (see `wikitext_pages`).

    Raises:
        FileNotFoundError: nothing at `location`.
        ValueError: the file is not UTF-8.
    """
    return [{"page": p} for p in wikitext_pages(_text(location))]


# WikiText tokenization undone, rule by rule, in the order lm-eval's `wikitext_detokenizer`
# (lm_eval/tasks/wikitext/preprocess_wikitext.py) applies them: ("s", old, new) is a plain
# replacement, ("r", pattern, repl) a regular-expression substitution.
_WIKITEXT_RULES: tuple[tuple[str, str, str], ...] = (
    ("s", "s '", "s'"), ("r", r"/' [0-9]/", r"/'[0-9]/"),
    ("s", " @-@ ", "-"), ("s", " @,@ ", ","), ("s", " @.@ ", "."),
    *(("s", f" {p} ", f"{p} ") for p in ":;.!?,"),
    ("r", r"\(\s*([^\)]*?)\s*\)", r"(\1)"), ("r", r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
    ("r", r"{\s*([^}]*?)\s*}", r"{\1}"), ("r", r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
    ("r", r"'\s*([^']*?)\s*'", r"'\1'"),
    ("s", "= = = =", "===="), ("s", "= = =", "==="), ("s", "= =", "=="),
    ("s", " \u00b0 ", "\u00b0"), ("s", " \n", "\n"), ("s", "\n ", "\n"), ("s", " N ", " 1 "), ("s", " 's", "'s"),
)


@TEXT_FILTERS.register("wikitext")
def wikitext_detokenize(text: str) -> str:
    """WikiText's tokenized spacing ("1 @,@ 000", "word , word") back to running text."""
    for how, old, new in _WIKITEXT_RULES:
        text = text.replace(old, new) if how == "s" else re.sub(old, new, text)
    return text
