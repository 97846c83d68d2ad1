"""models.load.load_causal_lm (the eval pool's and the benchmarks' loader): a GPTQ checkpoint
(compressed-tensors pack-quantized, ours or llm-compressor's) is scored dequantized. Loaded as is, transformers keeps its linears packed until the top-level
model's first forward, which the scorer (decoder body and head run apart) never calls: the
benchmark's perplexity step failed with "'Linear' object has no attribute 'weight'"."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "jobs" / "benchmarks"))


@pytest.fixture(scope="module")
def gptq_dir(tiny_llama_dir, tmp_path_factory):
    from raycompress.config import CompressConfig
    from raycompress.engine.pipeline import LocalBackend, compress_layers
    from raycompress.engine.worker import LayerWorker
    from raycompress.models.weights import OffloadedModel

    out = tmp_path_factory.mktemp("gptq")
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = CompressConfig(algorithm="gptq", quant={"bits": 4, "group_size": 32})
    compress_layers(LocalBackend([LayerWorker(str(tiny_llama_dir), ids)]), OffloadedModel(tiny_llama_dir), cfg, out, "fp")
    return out / "model"


@torch.no_grad()
def test_gptq_checkpoint_is_scored_dequantized(gptq_dir):
    from peer_llmcompressor import load_dense
    from transformers import AutoModelForCausalLM

    from raycompress.evaluation.scoring import loglikelihoods

    model = load_dense(gptq_dir)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m.weight, torch.Tensor) and m.weight.dtype == torch.float32 for m in linears)
    requests = [((1, 2, 3), (4, 5)), ((7,), (8, 9, 10))]
    scored = loglikelihoods(model, requests, 64)  # body and head apart, as the benchmark's perplexity does
    # the same numbers as compressed-tensors' own unpacking on a whole-model forward
    packed = AutoModelForCausalLM.from_pretrained(gptq_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5], [7, 8, 9, 10, 0]])
    torch.testing.assert_close(model(ids).logits, packed(ids).logits, rtol=0, atol=1e-5)
    logp = torch.log_softmax(packed(ids).logits.double(), -1)
    assert scored[0][0] == pytest.approx(float(logp[0, 2, 4] + logp[0, 3, 5]), abs=1e-4)


def test_a_dense_checkpoint_loads_unchanged(tiny_llama_dir):
    from peer_llmcompressor import load_dense
    from transformers import AutoModelForCausalLM

    ours, plain = load_dense(tiny_llama_dir), AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    for (name, a), (_, b) in zip(ours.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name


@torch.no_grad()
def test_the_eval_actor_scores_a_gptq_checkpoint(gptq_dir):
    """The eval pool's actor (run here without Ray) loads the quantized checkpoint and scores it."""
    from raycompress.distributed.evaluate import EvalActor
    from raycompress.models.fetch import ModelRef

    actor = EvalActor(ModelRef(str(gptq_dir)), 1, "float32", None)
    results, seconds = actor.score(0, [((1, 2, 3), (4, 5))], 64, 256)
    assert len(results) == 1 and results[0][0] < 0 and seconds >= 0
