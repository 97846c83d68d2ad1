"""Statistics reduced to their owner: each partial sent once (bytes equal the analytic minimum),
bit-identical statistics and checkpoints whatever the number of workers with float64
accumulation, whole micro-batches per shard, and the checkpoint's dtype kept (bf16 in, bf16 out)."""
import json

import pytest
import torch
from safetensors import safe_open

from raycompress.config import CompressConfig
from raycompress.engine.budget import layer_floors
from raycompress.engine.pipeline import LocalBackend, Plan, compress_layers
from raycompress.engine.transfer import shard_rows
from raycompress.engine.worker import LayerWorker
from raycompress.models.weights import OffloadedModel


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 256, (11, 16), generator=torch.Generator().manual_seed(3))  # 3 micro-batches of 4 (last 3)


def _run(model_dir, ids, out, cfg, k):
    workers = [LayerWorker(str(model_dir), ids[s], micro_batch=cfg.micro_batch, rank=r,
                           hessian_dtype=getattr(torch, cfg.hessian_dtype))
               for r, s in enumerate(shard_rows(ids.shape[0], k, cfg.micro_batch))]
    compress_layers(LocalBackend(workers), OffloadedModel(model_dir), cfg, out, "fp")
    return workers


def _tensors(out):
    res = {}
    for p in sorted((out / "model").glob("model-*.safetensors")):
        with safe_open(str(p), "pt") as f:
            res.update({k: f.get_tensor(k) for k in f.keys()})
    return res


def test_shard_rows_whole_micro_batches():
    assert shard_rows(11, 2, 4) == [slice(0, 8), slice(8, 11)]
    assert shard_rows(11, 3, 4) == [slice(0, 4), slice(4, 8), slice(8, 11)]
    assert shard_rows(4, 3, 4) == [slice(0, 4), slice(4, 4), slice(4, 4)]
    assert all(s.start % 4 == 0 for s in shard_rows(100, 7, 4))


def test_float64_statistics_make_any_worker_count_bit_identical(tiny_llama_dir, calib, tmp_path):
    cfg = CompressConfig(algorithm="sparsegpt", hessian_dtype="float64")
    ref = None
    for k in (1, 2, 3):
        _run(tiny_llama_dir, calib, tmp_path / f"k{k}", cfg, k)
        t = _tensors(tmp_path / f"k{k}")
        if ref is None:
            ref = t
        assert t.keys() == ref.keys() and all(torch.equal(t[n], ref[n]) for n in t), k


def test_float32_statistics_agree_to_rounding(tiny_llama_dir, calib, tmp_path):
    cfg = CompressConfig(algorithm="sparsegpt")
    _run(tiny_llama_dir, calib, tmp_path / "a", cfg, 1)
    _run(tiny_llama_dir, calib, tmp_path / "b", cfg, 3)
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    for n in a:  # float32 rounding of the sums moves a few near-tie mask entries, no more
        differ = float((~torch.isclose(a[n], b[n], rtol=1e-3, atol=1e-4)).float().mean())
        assert differ < 0.02, (n, differ)


@pytest.mark.parametrize("algorithm,extra", [("sparsegpt", {}), ("gptq", {"quant": {"bits": 4, "group_size": 32}}),
                                             ("wanda", {})])
def test_bytes_moved_equal_the_analytic_minimum(tiny_llama_dir, calib, tmp_path, algorithm, extra):
    cfg = CompressConfig(algorithm=algorithm, **extra)
    k = 3
    workers = _run(tiny_llama_dir, calib, tmp_path, cfg, k)
    model = OffloadedModel(tiny_llama_dir)
    rows = [s.stop - s.start for s in shard_rows(calib.shape[0], k, cfg.micro_batch)]
    floor = layer_floors(model, cfg, Plan(model, cfg, k), rows, calib.shape[1], cfg.micro_batch, 0)
    for layer in range(model.num_layers):
        moved = sum(w.report()["bytes_in"].get(layer, 0) for w in workers)
        assert moved == floor["bytes_moved_per_layer"]


def test_bf16_checkpoint_stays_bf16(tmp_path, calib):
    """A bf16 model is loaded, computed and written in bf16 (no float32 doubling of the output)."""
    from conftest import make_tiny_llama

    make_tiny_llama(tmp_path / "fp32").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = OffloadedModel(tmp_path / "bf16")
    assert model.dtype == torch.bfloat16
    for cfg in (CompressConfig(algorithm="sparsegpt"), CompressConfig(algorithm="gptq", quant={"bits": 4, "group_size": 32})):
        out = tmp_path / cfg.algorithm
        workers = _run(tmp_path / "bf16", calib, out, cfg, 2)
        assert workers[0].hidden.dtype == torch.bfloat16
        floats = {n: t.dtype for n, t in _tensors(out).items() if t.is_floating_point()}
        assert set(floats.values()) == {torch.bfloat16}, floats
        manifest = json.loads((out / "model" / "manifest.sha256.json").read_text())
        assert len(manifest["files"]) >= 3


def test_shipped_tensors_cross_the_object_store_zero_copy(ray_local):
    """Statistics and bf16 weights are stored as NumPy buffers: reading them maps the object
    store's memory instead of unpickling a private copy (private RSS grows by far less than the
    64 MB read)."""
    import ray

    from raycompress.engine.memory import PeakMemory
    from raycompress.engine.stats import InputStats
    from raycompress.engine.transfer import Shipped

    st = InputStats("hessian", 4096, value=torch.randn(4096, 4096), tokens=10)  # 64 MB
    w = torch.randn(32, 64).to(torch.bfloat16)
    ref = ray.put({"stats": st, "w": Shipped(w)})
    before = PeakMemory.private()
    got = ray.get(ref)
    assert torch.equal(got["stats"].value, st.value) and got["stats"].tokens == 10
    assert got["w"].dtype == torch.bfloat16 and torch.equal(got["w"], w)
    assert PeakMemory.private() - before < 16e6


def test_shipped_tensors_keep_8_bit_float_dtypes():
    """NVFP4's float8 weight scales cross the object store as uint8 bits (NumPy has no float8)."""
    import pickle

    from raycompress.engine.transfer import Shipped

    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.float32):
        t = torch.randn(4, 3).to(dtype)
        back = pickle.loads(pickle.dumps(Shipped(t)))
        assert back.dtype == dtype and torch.equal(back.view(torch.uint8), t.view(torch.uint8))
