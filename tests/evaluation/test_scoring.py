"""evaluation.scoring: lm-eval pair encoding, batched log-likelihoods, window NLL."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from raycompress.evaluation.scoring import encode_pair, loglikelihoods, window_nll

TOKENIZER_DIR = Path.home() / ".cache/raycompress/models/smollm2-135m-instruct"


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


class CharTok:
    """A character-level tokenizer: ids are code points."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_encode_pair_moves_trailing_space_char_tokenizer():
    ctx, cont = encode_pair(CharTok(), "Answer: ", "yes")
    assert ctx == [ord(c) for c in "Answer:"]
    assert cont == [ord(c) for c in " yes"]
    ctx, cont = encode_pair(CharTok(), "", "ab")
    assert ctx == [0] and cont == [ord("a"), ord("b")]


@pytest.mark.skipif(not (TOKENIZER_DIR / "tokenizer.json").is_file(), reason="SmolLM2 tokenizer not cached")
def test_encode_pair_real_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    ctx, cont = encode_pair(tok, "Question: Is it?\nAnswer: ", "yes")
    assert ctx == tok("Question: Is it?\nAnswer:", add_special_tokens=False)["input_ids"]
    assert tok.decode(cont) == " yes"
    assert ctx + cont == tok("Question: Is it?\nAnswer: yes", add_special_tokens=False)["input_ids"]
    # without trailing space the continuation keeps its own leading space
    ctx2, cont2 = encode_pair(tok, "Question: Is it?\nAnswer:", " yes")
    assert (ctx2, cont2) == (ctx, cont)


@torch.no_grad()
def _hand_ll(model, ctx, cont, max_len=10_000):
    full = (ctx + cont)[-(max_len + 1):]
    inp = torch.tensor([full[:-1]])
    logp = F.log_softmax(model(input_ids=inp).logits.float()[0], -1)
    n = len(cont)
    rows = logp[len(full) - 1 - n : len(full) - 1]
    tgt = torch.tensor(full[-n:])
    return float(rows.gather(1, tgt[:, None]).sum()), bool((rows.argmax(-1) == tgt).all())


def _requests():
    g = torch.Generator().manual_seed(1)
    reqs = []
    for lc, ln in [(3, 1), (9, 2), (5, 3), (12, 1), (1, 4), (7, 2)]:
        reqs.append((torch.randint(1, 64, (lc,), generator=g).tolist(), torch.randint(1, 64, (ln,), generator=g).tolist()))
    return reqs


def test_loglikelihood_single_matches_hand(model):
    ctx, cont = [5, 9, 2, 7], [11, 3]
    (ll, greedy), = loglikelihoods(model, [(ctx, cont)], max_len=64)
    ref_ll, ref_greedy = _hand_ll(model, ctx, cont)
    assert ll == pytest.approx(ref_ll, abs=1e-4)
    assert greedy == ref_greedy
    assert ll < 0


def test_loglikelihood_greedy_flag(model):
    ctx = [5, 9, 2, 7]
    with torch.no_grad():
        nxt = int(model(input_ids=torch.tensor([ctx])).logits[0, -1].argmax())
    other = (nxt + 1) % 64
    (_, g1), (_, g2) = loglikelihoods(model, [(ctx, [nxt]), (ctx, [other])], max_len=64)
    assert g1 is True and g2 is False


def test_loglikelihood_batched_equals_one_by_one(model):
    reqs = _requests()
    batched = loglikelihoods(model, reqs, max_len=64, batch_tokens=20)  # several padded batches
    single = [loglikelihoods(model, [r], max_len=64)[0] for r in reqs]
    for (a, ga), (b, gb), r in zip(batched, single, reqs):
        assert a == pytest.approx(b, abs=1e-4)
        assert ga == gb
        assert a == pytest.approx(_hand_ll(model, *r)[0], abs=1e-4)


def test_loglikelihood_dedup(model):
    ctx = [4, 8, 15, 16]
    reqs = [(ctx, [23]), (ctx, [42]), (ctx, [23]), ([1, 2], [3]), (ctx, [7])]
    out = loglikelihoods(model, reqs, max_len=64, batch_tokens=8)
    for (ll, _), r in zip(out, reqs):
        assert ll == pytest.approx(_hand_ll(model, *r)[0], abs=1e-4)
    assert out[0] == out[2]
    assert out[0][0] != out[1][0]


def test_loglikelihood_left_truncation(model):
    ctx, cont = list(range(1, 11)), [20, 21]
    (ll, _), = loglikelihoods(model, [(ctx, cont)], max_len=5)
    assert ll == pytest.approx(_hand_ll(model, ctx, cont, max_len=5)[0], abs=1e-4)
    assert ll != pytest.approx(_hand_ll(model, ctx, cont)[0], abs=1e-4)


def test_window_nll_equals_hf_loss(model):
    g = torch.Generator().manual_seed(2)
    windows = [torch.randint(0, 64, (10,), generator=g).tolist() for _ in range(3)] + [[5, 6, 7, 8]] + [[9]]
    nll, count = window_nll(model, windows, batch_tokens=20)
    assert count == 3 * 9 + 3
    ref = 0.0
    with torch.no_grad():
        for w in windows[:4]:
            t = torch.tensor([w])
            ref += float(model(input_ids=t, labels=t).loss) * (len(w) - 1)
    assert nll == pytest.approx(ref, abs=1e-3, rel=1e-5)
