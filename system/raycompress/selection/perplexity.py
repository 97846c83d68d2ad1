"""Perplexity-based selection, the model-scored baseline ZipCal is measured against: every
candidate window is scored by the model's perplexity and the lowest are kept (`least_perplexity`
in github.com/FrancescoMonaco/ZipCal `source/similarity_check.py`; Williams & Aletras 2024,
"On the impact of calibration data in post-training quantization and pruning"). Bottom-k per
shard then bottom-k of the union is exactly the global bottom-k. The model is loaded once per
selector actor (on a GPU when the actor has one)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from raycompress.registry import SELECTORS
from raycompress.selection.base import SelectContext, SelectionMethod, Window, top_k


def model_scorer(model_dir: str, batch: int = 8) -> Callable[[list[np.ndarray]], list[float]]:
    """A function windows -> perplexities (exp of mean token NLL), holding the model."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=False).to(device).eval()

    @torch.no_grad()
    def score(windows: list[np.ndarray]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(windows), batch):
            ids = torch.tensor(np.stack(windows[i : i + batch]), dtype=torch.long, device=device)  # (b, T)
            logits = model(input_ids=ids).logits.float()  # (b, T, vocab)
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)  # (b,)
            out.extend(torch.exp(nll).tolist())
        return out

    return score


def local(windows: list[Window], k: int, ctx: SelectContext, shard_key: str = "") -> list[Window]:
    if ctx.ppl_fn is None:
        raise ValueError("perplexity selection needs a model scorer (ctx.ppl_fn)")
    for w, p in zip(windows, ctx.ppl_fn([w.input_ids for w in windows]) if windows else []):
        w.score = float(p)
    return top_k(windows, k, largest=False)


def merge(windows: list[Window], k: int, ctx: SelectContext) -> list[Window]:
    return top_k(windows, k, largest=False)


SELECTORS.register("perplexity")(SelectionMethod(local, merge, frozenset({"model"}), "ZipCal least_perplexity"))
