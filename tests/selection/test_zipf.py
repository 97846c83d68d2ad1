"""selection.zipf: word splitting, rarity score on a known case, exact two-round top-k."""
import numpy as np

from raycompress.registry import SELECTORS
from raycompress.selection.base import SelectContext, Window
from raycompress.selection.zipf import word_counts, words, zipf_score


def test_words_and_counts():
    assert words("The cat, the DOG.End") == ["the", "cat", "the", "dog", "end"]
    assert word_counts(["a b a", "b c"]) == {"a": 2, "b": 2, "c": 1}


def test_score_known_case():
    freq = {"a": 4, "b": 2, "c": 1}
    # unique words {a, b, c}: 1/4 + 1/2 + 1/1
    assert zipf_score("a a b c", freq) == 1.75


def test_top_k_two_rounds_equal_one():
    texts = ["a a", "a b", "c", "b c", "a", "c c b"]
    freq = dict(word_counts(texts))
    ctx = SelectContext(seed=0, word_freq=freq)
    m = SELECTORS.get("zipf")

    def wins():
        return [Window(f"f:{i // 3}:{i % 3}", "s", [str(i)], np.zeros(1, np.int32), np.zeros(0, np.int32), text=t)
                for i, t in enumerate(texts)]

    whole = [w.uid for w in m.local(wins(), 3, ctx)]
    ws = wins()
    rounds = m.local(ws[:3], 3, ctx, "f:0") + m.local(ws[3:], 3, ctx, "f:1")
    assert [w.uid for w in m.merge(rounds, 3, ctx)] == whole
    # freq a=4, b=3, c=4: "a b", "b c", "c c b" all score 1/4 + 1/3 and tie; ties go by uid
    assert whole == ["f:0:1", "f:1:0", "f:1:2"]
