"""engine.worker.LayerWorker in-process: the meta-device loader and one solve, on a tiny random Llama."""
import pytest
import torch

from raycompress.config import CompressConfig
from raycompress.engine.transfer import unship
from raycompress.engine.worker import LayerWorker

TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def dense(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def test_meta_loader_reproduces_layer0_hidden_states(tiny_llama_dir, dense, calib):
    worker = LayerWorker(str(tiny_llama_dir), calib, micro_batch=3)
    full = dense
    with torch.no_grad():
        ref = full(input_ids=calib, output_hidden_states=True).hidden_states
    torch.testing.assert_close(worker.hidden, ref[0], atol=1e-6, rtol=0)
    worker.begin_layer(0)
    weights = [{"weight": worker.layer.get_submodule(t).weight.data.clone()} for t in TARGETS]
    worker.apply(dict(zip(TARGETS, weights)))
    torch.testing.assert_close(worker.hidden, ref[1], atol=1e-5, rtol=0)
    worker.end_layer()
    worker.begin_layer(1)
    worker.apply()
    # the last hidden_states entry has the final norm applied; compare before it
    torch.testing.assert_close(full.model.norm(worker.hidden), ref[2], atol=1e-5, rtol=0)


def test_worker_solve_records(tiny_llama_dir, calib):
    worker = LayerWorker(str(tiny_llama_dir), calib)
    worker.begin_layer(0)
    assert worker.accumulate({"mlp.gate_proj": ("hessian", ["mlp.up_proj"])}) == {"mlp.gate_proj": 64}
    assert worker.stats["mlp.gate_proj"].value.shape == (64, 64)
    assert worker.stats["mlp.gate_proj"].value.dtype == torch.float32  # compress.hessian_dtype default
    assert set(worker.stats["mlp.gate_proj"].out_sq) == {"mlp.up_proj"}
    solved = worker.solve_group("mlp.gate_proj", ["mlp.up_proj"], CompressConfig(sparsity=0.5), export=True)
    w_new = unship(solved["mlp.up_proj"]["weight"])
    assert float((w_new == 0).float().mean()) == 0.5
    assert worker.layer.mlp.up_proj.weight.data is not None and torch.equal(worker.layer.mlp.up_proj.weight.data, w_new)
    assert "mlp.gate_proj" not in worker.stats  # the Hessian became the factor and is gone
    (info,) = worker.pop_infos()
    assert info["layer"] == 0 and info["module"] == "mlp.up_proj" and 0 < info["rel_error"] < 1
    assert worker.pop_infos() == []


def test_solver_error_names_layer_module_and_damping(tiny_llama_dir, calib):
    from raycompress.engine.worker import SolveError

    worker = LayerWorker(str(tiny_llama_dir), calib)
    worker.begin_layer(1)
    worker.accumulate({"mlp.gate_proj": ("hessian", ["mlp.gate_proj", "mlp.up_proj"])})
    worker.stats["mlp.gate_proj"].value[0, 0] = float("nan")
    with pytest.raises(SolveError, match=r"layer 1 module mlp.gate_proj \(mlp.gate_proj, mlp.up_proj\).*NaN.*damping=0.01"):
        worker.solve_group("mlp.gate_proj", ["mlp.gate_proj", "mlp.up_proj"], CompressConfig(), export=False)


def test_write_layer_hashes_in_memory_and_refuses_nan(tiny_llama_dir, calib, tmp_path):
    from raycompress.storage import uri

    worker = LayerWorker(str(tiny_llama_dir), calib)
    worker.begin_layer(0)
    out = worker.write_layer(str(tmp_path / "s.safetensors"))
    assert out["sha256"] == uri.sha256(tmp_path / "s.safetensors")[0] and out["bytes"] == (tmp_path / "s.safetensors").stat().st_size
    worker.layer.mlp.up_proj.weight.data[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite values in .*model.layers.0.mlp.up_proj.weight"):
        worker.write_layer(str(tmp_path / "bad.safetensors"))
    assert not (tmp_path / "bad.safetensors").exists()
