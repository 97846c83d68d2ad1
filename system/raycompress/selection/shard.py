"""Round 1 of selection on one batch of documents: tokenize, pack, describe, select locally.

`ShardSelector` is a callable class (Ray Data runs it in an actor pool; it also runs alone). Its
input batch holds usable documents {source, path, shard, row, doc_id, text}; it groups them by
(path, shard) so that results do not depend on how Ray batches blocks, packs each shard's
documents in row order into windows of `seq_len` tokens, computes each window's ZipCal concepts,
and returns the method's k local winners per shard as rows
{uid, source, doc_ids, input_ids, concepts, score}.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from raycompress.data.tokenize import concept_table, pack
from raycompress.registry import SELECTORS
from raycompress.selection.base import SelectContext, Window

OUTPUT_COLUMNS = ("uid", "source", "doc_ids", "input_ids", "concepts", "score")


class ShardSelector:
    """Args: model: a `models.fetch.ModelRef` (or a local folder), resolved on this actor's node:
    the tokenizer files for every method, the weights only for a method that scores with the model."""

    def __init__(self, model, seq_len: int, method: str, k: int, ctx: SelectContext) -> None:
        from transformers import AutoTokenizer

        from raycompress.models.fetch import ModelRef

        model = model if isinstance(model, ModelRef) else ModelRef(str(model))
        self.tokenizer = AutoTokenizer.from_pretrained(model.local(weights=False), trust_remote_code=False)
        self.seq_len, self.k, self.ctx = seq_len, k, ctx
        self.method = SELECTORS.get(method)
        self.concepts = concept_table(self.tokenizer)
        self.sep = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        if "router" in self.method.needs and "route_fn" not in ctx.extra:
            from raycompress.selection.router_probe import load_probe

            self.ctx = SelectContext(**{**ctx.__dict__, "extra": {
                **ctx.extra, "route_fn": load_probe(model.local(), int(ctx.extra.get("probe_layers", 2)))}})
        if "model" in self.method.needs and ctx.ppl_fn is None:
            from raycompress.selection.perplexity import model_scorer

            self.ctx = SelectContext(**{**ctx.__dict__, "ppl_fn": model_scorer(str(model.local()))})

    def windows(self, docs: list[tuple[int, str, str]], source: str, path: str, shard: int) -> list[Window]:
        """Windows of one shard; docs are (row, doc_id, text) in any order (sorted here by row)."""
        docs = sorted(docs)
        enc = self.tokenizer([d[2] for d in docs], add_special_tokens=False)["input_ids"] if docs else []
        out = []
        for i, (ids, doc_ids) in enumerate(pack(enc, [d[1] for d in docs], self.seq_len, self.sep)):
            cs = np.unique(self.concepts[ids])
            text = self.tokenizer.decode(ids) if "text" in self.method.needs else None
            out.append(Window(f"{path}:{shard}:{i}", source, doc_ids, ids, cs[cs >= 0].astype(np.int32), text=text))
        return out

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        groups: dict[tuple[str, str, int], list] = {}
        for src, path, shard, row, doc_id, text in zip(batch["source"], batch["path"], batch["shard"],
                                                       batch["row"], batch["doc_id"], batch["text"]):
            groups.setdefault((str(src), str(path), int(shard)), []).append((int(row), str(doc_id), str(text)))
        out: dict[str, list] = {c: [] for c in OUTPUT_COLUMNS}
        for (src, path, shard), docs in sorted(groups.items()):
            wins = self.windows(docs, src, path, shard)
            for w in self.method.local(wins, self.k, self.ctx, f"{path}:{shard}"):
                for c in OUTPUT_COLUMNS:
                    out[c].append(getattr(w, c))
        return out


def rows_to_windows(rows: list[dict]) -> list[Window]:
    """Round-1 output rows back into Windows (for the merge on the driver)."""
    return [Window(r["uid"], r["source"], list(r["doc_ids"]), np.asarray(r["input_ids"], dtype=np.int32),
                   np.asarray(r["concepts"], dtype=np.int32), float(r["score"])) for r in rows]
