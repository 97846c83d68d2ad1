"""Log-likelihood scoring on a causal LM: request encoding, rolling windows, batched scoring.

Every evaluation request is a (context ids, continuation ids) pair; the score is the summed
log-probability of the continuation given the context, and whether it is the greedy one — the
`loglikelihood` request of lm-evaluation-harness. Perplexity documents become such pairs through
`rolling_windows`, so one scorer serves both task kinds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Request = tuple[list[int], list[int]]  # (context token ids, continuation token ids)

# Config attributes that change logits after the output head; models that have one are scored
# through their full forward pass rather than the head applied to the scored positions only.
_POST_HEAD_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
_SEQLEN_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx")  # lm-eval's order


def prefix_token(tokenizer) -> int:
    """The token that conditions a document's first token: BOS, else EOS (lm-eval's `prefix_token_id`)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def model_max_length(config, tokenizer=None, default: int = 2048) -> int:
    """A model's context length: the first of n_positions / max_position_embeddings / n_ctx on its
    (text) config, else the tokenizer's `model_max_length` unless unset, else `default` (tokens)."""
    for cfg in (getattr(config, "text_config", None), config):
        for attr in _SEQLEN_ATTRS:
            if cfg is not None and isinstance(getattr(cfg, attr, None), int):
                return int(getattr(cfg, attr))
    tok_max = getattr(tokenizer, "model_max_length", None)
    return int(tok_max) if isinstance(tok_max, int) and tok_max < 10**9 else default


def encode_pair(tokenizer, context: str, continuation: str, prefix: int) -> Request:
    """Token ids of (context, continuation) the way lm-eval's HF backend splits them.

    Trailing whitespace of the context moves to the continuation; the continuation's ids are those
    of `context + continuation` after the context's ids; an empty context becomes `[prefix]`.
    """
    if not context:
        return [prefix], tokenizer(continuation, add_special_tokens=False)["input_ids"]
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


def rolling_windows(tokens: list[int], prefix: int, max_length: int, stride: int | None = None) -> list[Request]:
    """Disjoint (context, continuation) windows that together predict every token of `tokens`.

    The first window predicts tokens[:max_length] after `[prefix]`; each later one predicts the
    next `stride` tokens (default `max_length`) conditioned on as many preceding tokens as fit in
    `max_length` inputs. With stride = max_length this is lm-eval's `get_rolling_token_windows(...,
    context_len=1)` followed by `make_disjoint_window`.

    Raises:
        ValueError: stride outside [1, max_length].
    """
    stride = stride or max_length
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    out: list[Request] = [([prefix], tokens[:first])]
    done = first
    while done < len(tokens):
        end = min(len(tokens), done + stride)
        out.append((tokens[max(0, end - max_length - 1) : done], tokens[done:end]))
        done = end
    return out


def model_input(req: Request, max_len: int) -> tuple[int, ...]:
    """The ids the model sees for a request: (context + continuation) minus its last token, cut on
    the left to `max_len` (lm-eval truncates the same way)."""
    ctx, cont = req
    return tuple((ctx + cont)[-(max_len + 1) :][:-1])


def _head_split(model):
    """(body, head) when logits are exactly head(body(ids).last_hidden_state), else None."""
    cfg = getattr(model, "config", None)
    if any(getattr(cfg, a, None) not in (None, 1.0) for a in _POST_HEAD_ATTRS):
        return None
    body, head = getattr(model, "base_model", None), model.get_output_embeddings()
    if body is None or body is model or head is None:
        return None
    return body, head


def _scored_logits_fn(model, batch: torch.Tensor, spans: list[tuple[int, int]]):
    """One forward pass over batch (b, T); returns f(a, b) -> float32 logits (b - a, vocab) of the
    scored positions a..b-1, counted along the concatenation of the rows' spans[r] = (start, stop).

    With a plain output head the head is applied to those positions only, chunk by chunk (a
    49k-vocab head on every position dominates the cost of short answers and the memory of long
    windows); otherwise the full forward's logits are sliced.
    """
    split = _head_split(model)
    if split is None:
        logits = model(input_ids=batch).logits  # (b, T, vocab)
        flat = torch.cat([logits[r, a:b] for r, (a, b) in enumerate(spans)])
        return lambda a, b: flat[a:b].float()
    body, head = split
    hidden = body(input_ids=batch).last_hidden_state  # (b, T, d)
    flat = torch.cat([hidden[r, a:b] for r, (a, b) in enumerate(spans)])  # (n, d)
    return lambda a, b: head(flat[a:b]).float()


def _input_device(model) -> torch.device:
    """Where input ids go: the first module's device of an accelerate device map ("disk" and
    offloaded modules take CPU inputs), else the device of the model's parameters."""
    placement = getattr(model, "hf_device_map", None)
    if placement:
        first = next(iter(placement.values()))
        return torch.device("cpu" if first in ("cpu", "disk") else (f"cuda:{first}" if isinstance(first, int) else first))
    return next(model.parameters()).device


def _batches(keys: list[tuple[int, ...]], batch_tokens: int) -> list[list[int]]:
    """Indices of `keys` (sorted longest first) grouped so that rows x width <= batch_tokens."""
    order = sorted(range(len(keys)), key=lambda i: (-len(keys[i]), keys[i]))
    out, i = [], 0
    while i < len(order):
        rows = max(1, batch_tokens // max(1, len(keys[order[i]])))
        out.append(order[i : i + rows])
        i += rows
    return out


def _score_positions(logits_fn, n_pos: int, qpos: torch.Tensor, qtgt: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and greedy? for each (position, target) query over `n_pos` scored positions.

    `logits_fn(a, b)` gives the (b - a, vocab) logits of positions a..b-1; they are made `chunk`
    positions at a time, so memory stays O(chunk x vocab). qpos, qtgt: (Q,) long, on the CPU.
    Returns (Q,) float64 log-probabilities and (Q,) bool "target is the argmax", on the CPU.
    """
    logp = torch.empty(len(qpos), dtype=torch.float64)
    greedy = torch.empty(len(qpos), dtype=torch.bool)
    for a in range(0, n_pos, chunk):
        logits = logits_fn(a, min(n_pos, a + chunk))  # (m, vocab), on the head's device
        sel = ((qpos >= a) & (qpos < a + chunk)).nonzero().squeeze(1)
        rows, tgt = (qpos[sel] - a).to(logits.device), qtgt[sel].to(logits.device)
        lse = torch.logsumexp(logits, dim=-1)  # (m,)
        logp[sel] = (logits[rows, tgt] - lse[rows]).double().cpu()
        greedy[sel] = (logits.argmax(-1)[rows] == tgt).cpu()
    return logp, greedy


@torch.no_grad()
def loglikelihoods(model, requests: list[Request], max_len: int, batch_tokens: int = 4096,
                   head_chunk: int = 1024) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context) in nats, greedy?) per request, in input order.

    Requests with the same model input (e.g. the one-token answers " yes"/" no"/" maybe" after one
    prompt) share one row. Rows are sorted longest first and right-padded into batches of at most
    `batch_tokens` tokens; causal attention keeps padding out of the scored positions. The output
    head runs over at most `head_chunk` scored positions at a time (bounds the (n, vocab) logits).
    """
    keys = [model_input(r, max_len) for r in requests]
    by_row: dict[tuple[int, ...], list[int]] = {}
    for i, k in enumerate(keys):
        by_row.setdefault(k, []).append(i)
    rows = list(by_row)
    device = _input_device(model)
    ll, ok = [0.0] * len(requests), [True] * len(requests)
    for idx in _batches(rows, batch_tokens):
        width = len(rows[idx[0]])
        batch = torch.zeros(len(idx), width, dtype=torch.long)
        spans, qpos, qtgt, qreq, base = [], [], [], [], 0
        for r, i in enumerate(idx):
            row = rows[i]
            batch[r, : len(row)] = torch.tensor(row)
            n_row = max(min(len(requests[q][1]), len(row)) for q in by_row[row])
            spans.append((len(row) - n_row, len(row)))
            for q in by_row[row]:
                n = min(len(requests[q][1]), len(row))
                qpos.extend(range(base + n_row - n, base + n_row))
                qtgt.extend(requests[q][1][-n:])
                qreq.extend([q] * n)
            base += n_row
        logits_fn = _scored_logits_fn(model, batch.to(device), spans)
        logp, greedy = _score_positions(logits_fn, base, torch.tensor(qpos), torch.tensor(qtgt), head_chunk)
        for q, lp, g in zip(qreq, logp.tolist(), greedy.tolist()):
            ll[q] += lp
            ok[q] = ok[q] and g
    return list(zip(ll, ok))
