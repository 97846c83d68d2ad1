"""Cus-Prun through the layer pipeline (LocalBackend): a smaller dense checkpoint that stock
transformers loads, per-dimension statistics, identical results for 1 vs 2 workers and on resume."""
import json

import pytest
import torch
from safetensors.torch import load_file

from raycompress.config import CompressConfig
from raycompress.engine.pipeline import LocalBackend, compress_layers
from raycompress.engine.subsets import row_subsets
from raycompress.engine.transfer import shard_calibration
from raycompress.engine.worker import LayerWorker
from raycompress.models.checkpoint import shard_name
from raycompress.models.weights import OffloadedModel

SOURCES = ["general", "biomed", "biomed", "qa"]
DIMS = {"language": ["general", "biomed"], "domain": ["biomed"], "task": ["qa"]}


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))


def _cfg(sparsity=0.5, micro_batch=4, **extra):
    return CompressConfig(algorithm="cus_prun", sparsity=sparsity, micro_batch=micro_batch,
                          cus_prun={"dimensions": DIMS, **extra})


def _run(model_dir, ids, out_dir, cfg, k=1):
    """k workers holding the compress stage's shards and subset masks (`shard_calibration`)."""
    shards = shard_calibration(ids.shape[0], k, cfg.micro_batch, row_subsets(cfg, SOURCES))
    assert len(shards) == k, "fewer micro-batches than workers: the test would not run k workers"
    workers = [LayerWorker(str(model_dir), ids[s.rows], micro_batch=cfg.micro_batch, subsets=s.subsets) for s in shards]
    return compress_layers(LocalBackend(workers), OffloadedModel(model_dir), cfg, out_dir, "fp")


def _shards(path):
    return {p.name: load_file(p) for p in sorted(path.glob("model-*.safetensors"))}


def test_pruned_checkpoint_is_smaller_and_loads(tiny_llama_dir, calib, tmp_path):
    from transformers import AutoModelForCausalLM

    records = _run(tiny_llama_dir, calib, tmp_path / "a", _cfg(0.5))
    out = tmp_path / "a" / "model"
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 64
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.model.layers[1].mlp.down_proj.weight.shape == (64, 64)
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (64, 64)
    assert torch.isfinite(model(input_ids=calib).logits).all()
    assert [(r["layer"], r["module"], r["neurons_kept"]) for r in records] == [(0, "mlp", 64), (1, "mlp", 64)]
    assert all(set(r["impact_removed"]) == set(DIMS) and 0 < r["rel_error"] < 0.5 for r in records)


def test_kept_neurons_follow_the_relevance_of_each_dimension(tiny_llama_dir, calib, tmp_path):
    """Layer 0 keeps exactly the neurons ranked highest by max-over-dimensions relevance of the
    dense layer's statistics, and the pruned rows are those rows of the dense weights."""
    from raycompress.algorithms.cus_prun import kept_count, neuron_impact, relevance, select_neurons

    cfg = _cfg(0.25)
    _run(tiny_llama_dir, calib, tmp_path / "b", cfg)
    w = LayerWorker(str(tiny_llama_dir), calib, subsets=row_subsets(cfg, SOURCES))
    w.begin_layer(0)
    w.accumulate({"mlp.down_proj": ("sqnorm", ["mlp.down_proj"])}, True)
    stats = w.stats
    down = w.layer.mlp.down_proj.weight.data
    impacts = {d: neuron_impact(stats[f"mlp.down_proj@{d}"].value / stats[f"mlp.down_proj@{d}"].tokens, down) for d in DIMS}
    keep = select_neurons(relevance(impacts), kept_count(128, 0.25, 8))
    shard = load_file(tmp_path / "b" / "model" / shard_name(0, 3))
    torch.testing.assert_close(shard["model.layers.0.mlp.up_proj.weight"], w.layer.mlp.up_proj.weight.data[keep])
    torch.testing.assert_close(shard["model.layers.0.mlp.down_proj.weight"], down[:, keep])


def test_two_workers_and_resume_give_identical_checkpoints(tiny_llama_dir, calib, tmp_path):
    cfg = _cfg(0.5, micro_batch=2)  # two micro-batches of 2 rows: one per worker when k = 2
    _run(tiny_llama_dir, calib, tmp_path / "one", cfg, k=1)
    _run(tiny_llama_dir, calib, tmp_path / "two", cfg, k=2)
    ref = _shards(tmp_path / "one" / "model")
    two = _shards(tmp_path / "two" / "model")
    assert ref.keys() == two.keys() and all(torch.equal(ref[f][t], two[f][t]) for f in ref for t in ref[f])
    # resume: forget layer 1, rerun; layer 0 is replayed from its (shrunk) shard
    work = tmp_path / "one"
    progress = json.loads((work / "progress.json").read_text())
    progress["done"] = [0]
    progress["records"].pop("1")
    (work / "progress.json").write_text(json.dumps(progress))
    (work / "model" / shard_name(1, 3)).unlink()
    _run(tiny_llama_dir, calib, work, cfg, k=1)
    again = _shards(work / "model")
    assert all(torch.equal(ref[f][t], again[f][t]) for f in ref for t in ref[f])


def test_per_layer_counts_pad_to_the_widest_layer(tiny_llama_dir, calib, tmp_path):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="per_layer_counts"):
        _cfg([0.25, 0.5])
    records = _run(tiny_llama_dir, calib, tmp_path / "p", _cfg([0.25, 0.5], per_layer_counts=True))
    config = json.loads((tmp_path / "p" / "model" / "config.json").read_text())
    assert config["intermediate_size"] == 96 and config["raycompress_ffn_neurons_kept"] == [96, 64]
    assert [r["neurons_kept"] for r in records] == [96, 64]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "p" / "model", dtype=torch.float32)
    down = model.model.layers[1].mlp.down_proj.weight
    assert down.shape == (64, 96) and torch.count_nonzero(down[:, 64:]) == 0


def test_config_errors():
    with pytest.raises(ValueError, match="needs a 'cus_prun' section"):
        CompressConfig(algorithm="cus_prun", sparsity=0.5)
    with pytest.raises(ValueError, match="quant, mixcal, owl and n_m"):
        CompressConfig(algorithm="cus_prun", sparsity=0.5, n_m=[2, 4], cus_prun={"dimensions": DIMS})
    with pytest.raises(ValueError, match="name no sources"):
        _cfg(0.5, dimensions={"task": []})
    with pytest.raises(ValueError, match="dimensions.task: no calibration sequence"):
        row_subsets(_cfg(0.5), ["general", "biomed"])
