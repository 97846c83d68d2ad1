"""Tokenization and packing into fixed-length calibration candidates, plus ZipCal concepts.

`TokenizePack` is a Ray Data callable class (the tokenizer loads once per actor): it tokenizes a
batch of documents, joins them with EOS in order, and cuts the stream into windows of exactly
`seq_len` tokens (a trailing partial window is dropped). Each window row carries the ids of the
documents it spans and its set of ZipCal concepts (see `concept_table`).
"""
from __future__ import annotations

from typing import Any

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


class TokenizePack:
    """Ray Data batch callable: documents -> windows {source, doc_ids, input_ids, concepts}."""

    def __init__(self, model_dir: str, seq_len: int) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.seq_len = seq_len
        self.sep = self.tokenizer.eos_token_id
        self.concepts = concept_table(self.tokenizer)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        keep = [i for i, r in enumerate(batch["reason"]) if r == ""]  # rejected documents are skipped
        batch = {k: [batch[k][i] for i in keep] for k in ("text", "source", "doc_id")}
        enc = self.tokenizer(list(batch["text"]), add_special_tokens=False)["input_ids"] if keep else []
        out: dict[str, list] = {"source": [], "doc_ids": [], "input_ids": [], "concepts": []}
        stream: list[int] = []
        owners: list[int] = []  # index into batch of the document each token comes from
        for j, ids in enumerate(enc):
            stream.extend(ids + [self.sep])
            owners.extend([j] * (len(ids) + 1))
        for start in range(0, len(stream) - self.seq_len + 1, self.seq_len):
            window = np.asarray(stream[start : start + self.seq_len], dtype=np.int32)
            docs = sorted(set(owners[start : start + self.seq_len]))
            cs = np.unique(self.concepts[window])
            out["source"].append(batch["source"][docs[0]])
            out["doc_ids"].append([str(batch["doc_id"][d]) for d in docs])
            out["input_ids"].append(window)
            out["concepts"].append(cs[cs >= 0].astype(np.int32))
        return out
