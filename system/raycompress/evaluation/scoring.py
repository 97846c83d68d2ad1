"""Log-likelihood scoring on a causal LM, batched by length.

- `encode_pair` splits context / continuation tokens the way lm-evaluation-harness does
  (trailing context whitespace moves to the continuation; continuation = tokens of
  context+continuation after the context's tokens).
- `loglikelihoods` returns, per (context_ids, continuation_ids) request, the summed log-probability
  of the continuation and whether it is the greedy continuation. Requests are sorted by length and
  right-padded into batches of at most `batch_tokens` tokens; with causal attention the padding
  never influences the scored positions, so no attention mask is needed.
- `window_nll` gives the summed negative log-likelihood of non-overlapping windows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    n_space = len(context) - len(context.rstrip())
    if n_space:
        continuation = context[-n_space:] + continuation
        context = context[:-n_space]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    if not ctx:
        ctx = [tokenizer.eos_token_id]
        whole = ctx + whole
    return ctx, whole[len(ctx):]


def _logits(model, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch).logits.float()  # (b, T, vocab)


@torch.no_grad()
def loglikelihoods(model, requests: list[tuple[list[int], list[int]]], max_len: int, batch_tokens: int = 4096) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), greedy?) per request, in the input order.

    Inputs longer than `max_len` are truncated on the left (context side). Requests whose model
    input is identical (e.g. the one-token answers " yes"/" no"/" maybe" after one prompt) share
    one forward pass.
    """
    keys = []
    for ctx, cont in requests:
        full = (ctx + cont)[-(max_len + 1):]
        keys.append((tuple(full[:-1]), len(cont)))  # the model sees all but the last token
    unique = sorted(set(keys), key=lambda k: (-len(k[0]), k))
    rows_of: dict[tuple, torch.Tensor] = {}  # key -> (n_cont, vocab) log-probs
    i = 0
    while i < len(unique):
        width = len(unique[i][0])
        chunk = unique[i : i + max(1, batch_tokens // max(1, width))]
        batch = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, (toks, _) in enumerate(chunk):
            batch[r, : len(toks)] = torch.tensor(toks)
        logp = F.log_softmax(_logits(model, batch), dim=-1)  # (b, width, vocab)
        for r, (toks, n_cont) in enumerate(chunk):
            rows_of[(toks, n_cont)] = logp[r, len(toks) - n_cont : len(toks)]
        i += len(chunk)
    results = []
    for (ctx, cont), key in zip(requests, keys):
        lp = rows_of[key]
        target = torch.tensor(cont[-key[1]:])
        results.append((float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
    return results


@torch.no_grad()
def window_nll(model, windows: list[list[int]], batch_tokens: int = 4096) -> tuple[float, int]:
    """(summed NLL in nats, predicted tokens) over windows; each window predicts its tokens 1..T-1."""
    total, count = 0.0, 0
    by_len: dict[int, list[list[int]]] = {}
    for w in windows:
        if len(w) > 1:
            by_len.setdefault(len(w), []).append(w)
    for width, group in sorted(by_len.items()):
        rows = max(1, batch_tokens // width)
        for i in range(0, len(group), rows):
            b = torch.tensor(group[i : i + rows])  # (b, T)
            logits = _logits(model, b)  # (b, T, vocab)
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum")
            total += float(nll)
            count += b[:, 1:].numel()
    return total, count


def score_requests(model, kind: str, requests: list, max_len: int, batch_tokens: int) -> list:
    """Dispatch one work unit: "nll" -> [(nll, tokens)] per window; "ll" -> [(logprob, greedy)]."""
    if kind == "nll":
        return [window_nll(model, [w], batch_tokens) for w in requests]
    if kind == "ll":
        return loglikelihoods(model, requests, max_len, batch_tokens)
    raise ValueError(f"unknown request kind '{kind}' (nll, ll)")
