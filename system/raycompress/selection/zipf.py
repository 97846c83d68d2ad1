"""ZipCal's `zipf` variant: score a sample by the rarity of its words.

Words: the sample's text lower-cased, '.' and ',' replaced by spaces, split on white space.
Score: the sum over the sample's *unique* words of 1 / (corpus frequency of the word); the top-k
scores are chosen. Source: github.com/FrancescoMonaco/ZipCal `source/similarity_check.py`
(`zipf_sampling`). Corpus frequencies come from the whole source (the select stage's first pass).
Top-k per shard then top-k of the union is exactly the global top-k.
"""
from __future__ import annotations

from collections import Counter

from raycompress.registry import SELECTORS
from raycompress.selection.base import SelectContext, SelectionMethod, Window, top_k


def words(text: str) -> list[str]:
    return text.lower().replace(".", " ").replace(",", " ").split()


def word_counts(texts: list[str]) -> Counter:
    c: Counter = Counter()
    for t in texts:
        c.update(words(t))
    return c


def zipf_score(text: str, freq: dict[str, int]) -> float:
    """sum over unique words w of 1 / freq[w] (words absent from `freq` count as frequency 1)."""
    return float(sum(1.0 / max(1, freq.get(w, 1)) for w in set(words(text))))


def local(windows: list[Window], k: int, ctx: SelectContext, shard_key: str = "") -> list[Window]:
    if ctx.word_freq is None:
        raise ValueError("zipf needs corpus word frequencies (ctx.word_freq)")
    for w in windows:
        w.score = zipf_score(w.text or "", ctx.word_freq)
    return top_k(windows, k, largest=True)


def merge(windows: list[Window], k: int, ctx: SelectContext) -> list[Window]:
    return top_k(windows, k, largest=True)


SELECTORS.register("zipf")(SelectionMethod(local, merge, frozenset({"text", "word_freq"}), "ZipCal zipf_sampling"))
