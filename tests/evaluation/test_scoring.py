"""evaluation.scoring: lm-eval pair encoding, rolling windows, batched log-likelihoods on a tiny model."""
import math

import pytest
import torch
import torch.nn.functional as F

from raycompress.evaluation.scoring import encode_pair, loglikelihoods, model_max_length, rolling_windows


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
    ctx, cont = encode_pair(CharTok(), "Answer: ", "yes", prefix=1)
    assert ctx == [ord(c) for c in "Answer:"]
    assert cont == [ord(c) for c in " yes"]
    ctx, cont = encode_pair(CharTok(), "", "ab", prefix=1)
    assert ctx == [1] and cont == [ord("a"), ord("b")]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE tokenizer trained here (SmolLM2's kind: GPT-2 byte-level pre-tokenizer, a
    word's leading space inside its token), on text where " yes" and " no" are whole tokens."""
    import random

    from conftest import random_doc, write_tokenizer
    from tokenizers import decoders
    from transformers import AutoTokenizer

    path, rng = tmp_path_factory.mktemp("bpe"), random.Random(0)
    qa = [f"Question: Is it {w}?\nAnswer: {a}" for w in ("cell", "gene", "dose") for a in ("yes", "no")] * 20
    write_tokenizer(path, qa + [random_doc(rng, 40) for _ in range(40)], vocab_size=400)
    tok = AutoTokenizer.from_pretrained(path)
    tok.backend_tokenizer.decoder = decoders.ByteLevel()  # as SmolLM2's: "Ġyes" decodes to " yes"
    return tok


def test_encode_pair_byte_level_bpe(bpe):
    tok = bpe
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert len(ids(" yes")) == 1 and ids("Answer: ") != ids("Answer:")  # what makes the split matter
    ctx, cont = encode_pair(tok, "Question: Is it?\nAnswer: ", "yes", tok.bos_token_id)
    assert ctx == ids("Question: Is it?\nAnswer:")
    assert tok.decode(cont) == " yes" and cont == ids(" yes")
    assert ctx + cont == ids("Question: Is it?\nAnswer: yes")
    assert ids("Question: Is it?\nAnswer: ") + ids("yes") != ctx + cont  # a naive split scores other tokens
    # without trailing space the continuation keeps its own leading space
    ctx2, cont2 = encode_pair(tok, "Question: Is it?\nAnswer:", " yes", tok.bos_token_id)
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


def test_uniform_model_hand_computed():
    """All weights zero -> every logit 0 -> log p = -ln(vocab) per token; the argmax is token 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    out = loglikelihoods(m, [([3, 4], [5, 6, 7]), ([9], [0]), ([2], [0, 1])], max_len=32)
    assert out[0][0] == pytest.approx(-3 * math.log(50), abs=1e-5) and out[0][1] is False
    assert out[1] == (pytest.approx(-math.log(50), abs=1e-5), True)
    assert out[2][1] is False


def test_long_continuations_and_small_head_chunks(model):
    reqs = _requests() + [([1], list(range(2, 40)))]
    a = loglikelihoods(model, reqs, max_len=64, batch_tokens=30, head_chunk=5)
    b = loglikelihoods(model, reqs, max_len=64, batch_tokens=4096)
    for (x, gx), (y, gy), r in zip(a, b, reqs):
        assert x == pytest.approx(y, abs=1e-4) and gx == gy
        assert x == pytest.approx(_hand_ll(model, *r)[0], abs=1e-4)


def test_rolling_windows_cover_every_token_once():
    toks = list(range(3, 40))
    for max_len, stride in [(8, None), (8, 3), (50, None), (1, None)]:
        wins = rolling_windows(toks, 1, max_len, stride)
        assert [t for _, cont in wins for t in cont] == toks
        assert wins[0][0] == [1]
        for ctx, cont in wins:
            assert len(ctx) + len(cont) <= max_len + 1  # the model sees at most max_len tokens
            assert ctx == ([1] if ctx == [1] else toks[toks.index(cont[0]) - len(ctx) : toks.index(cont[0])])
    assert [len(c) for _, c in rolling_windows(toks, 1, 8, None)] == [8, 8, 8, 8, 5]
    assert rolling_windows([], 1, 8) == []
    with pytest.raises(ValueError, match="stride"):
        rolling_windows(toks, 1, 8, 9)


def test_rolling_perplexity_equals_hf_loss_on_one_window(model):
    """A document that fits one window: the summed log-likelihood is HF's loss on [prefix] + doc."""
    doc = torch.randint(1, 64, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    (ll, _), = loglikelihoods(model, rolling_windows(doc, 1, 64), max_len=64)
    with torch.no_grad():
        t = torch.tensor([[1] + doc])
        ref = float(model(input_ids=t, labels=t).loss) * len(doc)
    assert -ll == pytest.approx(ref, rel=1e-5)


def test_model_max_length_order():
    from types import SimpleNamespace

    assert model_max_length(SimpleNamespace(max_position_embeddings=128, n_positions=64)) == 64
    assert model_max_length(SimpleNamespace(), SimpleNamespace(model_max_length=512)) == 512
    assert model_max_length(SimpleNamespace(), SimpleNamespace(model_max_length=10**30)) == 2048
