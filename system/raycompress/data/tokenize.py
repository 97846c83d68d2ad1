"""Packing tokenized documents into fixed-length calibration candidates, and ZipCal concepts."""
from __future__ import annotations

import numpy as np


def concept_table(tokenizer) -> np.ndarray:
    """Token id -> concept id (int32, -1 = no concept), as in ZipCal's `unique_tokens_sampling`.

    A token's concept is the token decoded alone, lower-cased, with spaces and the byte-level
    marker 'Ġ' removed; special tokens and tokens that normalise to "" have none. Concept ids
    number the distinct concept strings in sorted order, so they are stable for a tokenizer.
    Source: github.com/FrancescoMonaco/ZipCal `source/similarity_check.py`.
    """
    special = set(tokenizer.all_special_ids)
    vocab = len(tokenizer)
    strings: list[str | None] = []
    for tid in range(vocab):
        if tid in special:
            strings.append(None)
            continue
        s = tokenizer.decode([tid], skip_special_tokens=True).lower().replace(" ", "").replace("Ġ", "").strip()
        strings.append(s or None)
    ids = {s: i for i, s in enumerate(sorted({s for s in strings if s is not None}))}
    return np.array([ids[s] if s is not None else -1 for s in strings], dtype=np.int32)


def pack(token_lists: list[list[int]], doc_ids: list[str], seq_len: int, sep: int) -> list[tuple[np.ndarray, list[str]]]:
    """Join documents (in order, each followed by `sep`) and cut into windows of exactly `seq_len`.

    Returns:
        per window, (input_ids (seq_len,) int32, ids of the documents it spans); a trailing
        partial window is dropped.
    """
    stream: list[int] = []
    owners: list[int] = []  # index of the document each token comes from
    for j, ids in enumerate(token_lists):
        stream.extend(ids)
        stream.append(sep)
        owners.extend([j] * (len(ids) + 1))
    out = []
    for start in range(0, len(stream) - seq_len + 1, seq_len):
        docs = sorted(set(owners[start : start + seq_len]))
        out.append((np.asarray(stream[start : start + seq_len], dtype=np.int32), [doc_ids[d] for d in docs]))
    return out
