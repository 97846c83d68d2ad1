"""Hostile checkpoints: each refused with one CheckpointError naming the file (and tensor), before Ray
starts where headers and config tell (preflight), else where the weights are loaded anyway; nothing
from the model folder runs; the fingerprint covers weight contents."""
from __future__ import annotations

import ast
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from raycompress.config import JobConfig
from raycompress.distributed.plan import PreflightError, preflight
from raycompress.models.arch import UnsupportedArchitectureError
from raycompress.models.fetch import ModelRef
from raycompress.models.validate import CheckpointError, check_safetensors_header, read_header
from raycompress.models.weights import OffloadedModel

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "data" / "corpora" / "biomed_pubmedqa_pool.jsonl"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _job(model: Path) -> JobConfig:
    return JobConfig.model_validate({
        "model": str(model), "base_dir": ".", "select": {"sources": {"a": {"path": str(CORPUS)}}, "seq_len": 64},
        "compress": {"algorithm": "sparsegpt", "sparsity": 0.5}, "evaluate": {"tasks": []}})


def _preflight_refuses(model: Path, match: str) -> PreflightError:
    import ray

    was_up = ray.is_initialized()
    with pytest.raises(PreflightError, match=match) as ei:
        preflight(_job(model), ModelRef(str(model)))
    assert ray.is_initialized() == was_up
    assert isinstance(ei.value.__cause__, CheckpointError)
    return ei.value


def _shard_of(model: Path, tensor: str) -> Path:
    return model / json.loads((model / "model.safetensors.index.json").read_text())["weight_map"][tensor]


# -- 1. a missing shard ---------------------------------------------------------------------------
def test_missing_shard_is_named_with_the_index_in_preflight(tmp_path, tiny_llama_dir):
    model = _copy(tiny_llama_dir, tmp_path / "m")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.1.mlp.down_proj.weight"] = "model-00009-of-00009.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    err = _preflight_refuses(model, r"model: .*model.safetensors.index.json names model-00009-of-00009.safetensors "
                                    r"\(for 1 tensors, .*model.layers.1.mlp.down_proj.weight.*no such file")
    assert str(model) in str(err)


def test_index_sending_a_tensor_to_a_file_without_it_is_refused(tmp_path, tiny_llama_dir):
    model = _copy(tiny_llama_dir, tmp_path / "m")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    other = _shard_of(model, "model.embed_tokens.weight").name
    name = next(k for k, f in index["weight_map"].items() if f != other)
    index["weight_map"][name] = other
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    _preflight_refuses(model, rf"{other}: model.safetensors.index.json puts tensor '{name}'")


# -- 2. truncated files and lying headers ---------------------------------------------------------
H = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
     "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]}, "__metadata__": {"format": "pt"}}


def _entry(name, **kw):
    return {**H, name: {**H[name], **kw}}


@pytest.mark.parametrize("header,size,match", [
    (H, 8 + 100 + 28, r"x.safetensors: tensor 'b' has data_offsets \[24, 32\] but the file holds only 28 bytes "
                      r"of tensor data .*truncated"),
    (_entry("b", data_offsets=[24, 4000]), 8 + 100 + 32, r"tensor 'b' is BF16 \[4\], 8 bytes, but its data_offsets "
                                                         r"\[24, 4000\] span 3976 bytes"),
    (_entry("b", data_offsets=[16, 24]), 8 + 100 + 24, r"tensor 'b' data_offsets \[16, 24\] overlap tensor 'a'"),
    (_entry("b", data_offsets=[32, 40]), 8 + 100 + 40, r"bytes \[24, 32\) before tensor 'b' belong to no tensor"),
    (_entry("a", shape=[3, 3]), 8 + 100 + 32, r"tensor 'a' is F32 \[3, 3\], 36 bytes, but its data_offsets"),
    (_entry("a", dtype="F99"), 8 + 100 + 32, r"tensor 'a': unknown dtype 'F99'"),
    (_entry("a", shape=[-2, 3]), 8 + 100 + 32, r"tensor 'a': shape \[-2, 3\] is not a list of sizes"),
    (H, 8 + 100 + 40, r"the header describes 32 bytes of tensor data but the file holds 40"),
    (H, 50, r"header length 100 is larger than the file \(50 bytes\)"),
])
def test_header_checks_name_file_and_tensor(header, size, match):
    with pytest.raises(CheckpointError, match=match):
        check_safetensors_header(header, size, "x.safetensors", 100)


def test_a_good_header_passes():
    check_safetensors_header(H, 8 + 100 + 32, "x.safetensors", 100)


def test_truncated_shard_is_refused_in_preflight(tmp_path, tiny_llama_dir):
    model = _copy(tiny_llama_dir, tmp_path / "m")
    f = _shard_of(model, "model.layers.1.mlp.up_proj.weight")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _preflight_refuses(model, rf"model: {f}: tensor '.*' has data_offsets .* but the file holds only .*truncated")


def test_lying_header_and_huge_header_length_are_refused(tmp_path, tiny_llama_dir):
    model = _copy(tiny_llama_dir, tmp_path / "m")
    f = _shard_of(model, "model.layers.0.mlp.up_proj.weight")
    good = read_header(str(f))  # the library's own reader: the header is good so far
    header, data = good.tensors, f.read_bytes()[good.data_start:]
    key = sorted(header)[0]
    header[key]["data_offsets"] = [0, len(data) * 4]
    raw = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    _preflight_refuses(model, rf"{f.name}: tensor '{key}' is F32 .* span {len(data) * 4} bytes")
    f.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    _preflight_refuses(model, rf"{f.name}: header length {10**12} is larger than the file \(10 bytes\)")


def test_truncated_single_file_is_refused_before_safetensors_opens_it(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, architectures=["LlamaForCausalLM"])
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor '.*' has data_offsets"):
        OffloadedModel(tmp_path / "m")


# -- 4. remote code, unknown model types ----------------------------------------------------------
def _edit_config(model: Path, **changes) -> None:
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(changes)
    (model / "config.json").write_text(json.dumps(cfg))


def test_auto_map_is_refused_and_nothing_from_the_folder_runs(tmp_path, tiny_llama_dir):
    model = _copy(tiny_llama_dir, tmp_path / "m")
    marker = tmp_path / "ran"
    _edit_config(model, model_type="evil_llama", architectures=["EvilForCausalLM"],
                 auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"})
    (model / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    err = _preflight_refuses(model, r"model folder .* asks for remote code via auto_map in config.json "
                                    r"\(AutoConfig: evil.EvilConfig, .*raycompress never runs code from a model "
                                    r"folder; supported architectures: \[.*'LlamaForCausalLM'")
    assert "Traceback" not in str(err) and not marker.exists()


def test_auto_map_in_tokenizer_config_is_refused(tmp_path, tiny_llama_dir):
    model = _copy(tiny_llama_dir, tmp_path / "m")
    (model / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.Tok", None]}}))
    with pytest.raises(CheckpointError, match="auto_map in tokenizer_config.json"):
        OffloadedModel(model)


@pytest.mark.parametrize("changes,match", [
    ({"model_type": "mamba", "architectures": ["MambaForCausalLM"]},
     r"model_type 'mamba' is not supported \(supported model types: \['llama', .*supported architectures"),
    ({"model_type": "no_such_type"}, r"model_type 'no_such_type' is not supported"),
    ({"architectures": ["GPT2LMHeadModel"]}, r"architectures \['GPT2LMHeadModel'\] names no supported"),
    ({"model_type": "opt"}, r"model_type 'opt' builds OPTForCausalLM but architectures says \['LlamaForCausalLM'\]"),
])
def test_unsupported_model_is_refused_in_preflight(tmp_path, tiny_llama_dir, changes, match):
    model = _copy(tiny_llama_dir, tmp_path / "m")
    _edit_config(model, **changes)
    err = _preflight_refuses(model, match)
    assert isinstance(err.__cause__, UnsupportedArchitectureError)


def test_config_that_is_not_json_is_refused(tmp_path, tiny_llama_dir):
    model = _copy(tiny_llama_dir, tmp_path / "m")
    (model / "config.json").write_text("{not json")
    _preflight_refuses(model, r"config.json is not JSON")


def test_every_from_pretrained_refuses_remote_code():
    """Every transformers from_pretrained / from_config call in the package passes
    trust_remote_code=False (literally, or in the **kwargs dict built in the same function), so
    transformers raises instead of asking on the terminal."""
    missing = []
    for path in sorted((REPO / "system" / "raycompress").rglob("*.py")):
        src = path.read_text()
        for fn in [n for n in ast.walk(ast.parse(src)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for call in [n for n in ast.walk(fn) if isinstance(n, ast.Call)]:
                if not (isinstance(call.func, ast.Attribute) and call.func.attr in ("from_pretrained", "from_config")):
                    continue
                kw = {k.arg: k.value for k in call.keywords}
                flag = kw.get("trust_remote_code")
                literal = isinstance(flag, ast.Constant) and flag.value is False
                via_dict = None in kw and '"trust_remote_code": False' in ast.get_source_segment(src, fn)
                if not (literal or via_dict):
                    missing.append(f"{path.relative_to(REPO)}:{call.lineno}")
    assert missing == []


# -- 5. pickle-only -------------------------------------------------------------------------------
class _RunsCode:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_pickle_only_checkpoint_is_refused_unopened(tmp_path, tiny_llama_dir):
    model = tmp_path / "m"
    model.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", model / "config.json")
    marker = tmp_path / "unpickled"
    torch.save({"w": _RunsCode(str(marker))}, model / "pytorch_model.bin")
    _preflight_refuses(model, r"weights only as pickle files \['pytorch_model.bin'\]; raycompress reads only "
                              r"safetensors")
    assert not marker.exists()


# -- 3. NaN / Inf weights -------------------------------------------------------------------------
def _poison(model: Path, tensor: str, value: float, n: int = 3) -> Path:
    f = _shard_of(model, tensor)
    tensors = load_file(f)
    tensors[tensor].view(-1)[:n] = value
    save_file(tensors, f, metadata={"format": "pt"})
    return f


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_decoder_weights_are_named_when_the_layer_loads(tmp_path, tiny_llama_dir, calib, value):
    from raycompress.engine.worker import LayerWorker

    model = _copy(tiny_llama_dir, tmp_path / "m")
    f = _poison(model, "model.layers.1.mlp.down_proj.weight", value)
    preflight(_job(model), ModelRef(str(model)))  # headers are fine: found where the weights are loaded
    worker = LayerWorker(str(model), calib)
    worker.begin_layer(0)
    worker.end_layer()
    with pytest.raises(CheckpointError, match=rf"^{f}: tensor 'model.layers.1.mlp.down_proj.weight' holds 3 "
                                              r"non-finite values \(NaN/Inf\) of 8192; the checkpoint is corrupt"):
        worker.begin_layer(1)


def test_nonfinite_weights_stop_compression_with_a_checkpoint_error(tmp_path, tiny_llama_dir, calib):
    """Through the pipeline (LocalBackend, no Ray): the error stays a CheckpointError, not a solver
    failure, and no shard of the poisoned layer is written."""
    from raycompress.config import CompressConfig
    from raycompress.engine.pipeline import LocalBackend, compress_layers
    from raycompress.engine.worker import LayerWorker

    model = _copy(tiny_llama_dir, tmp_path / "m")
    _poison(model, "model.layers.1.self_attn.q_proj.weight", float("nan"), n=5)
    backend = LocalBackend([LayerWorker(str(model), calib)])
    with pytest.raises(CheckpointError, match=r"'model.layers.1.self_attn.q_proj.weight' holds 5 non-finite"):
        compress_layers(backend, OffloadedModel(model), CompressConfig(sparsity=0.5), tmp_path / "out", "fp")
    assert sorted(p.name for p in (tmp_path / "out" / "model").glob("*.safetensors")) == [
        "model-00001-of-00003.safetensors"]


def test_nonfinite_embeddings_are_found_before_any_layer(tmp_path, tiny_llama_dir, calib):
    from raycompress.engine.worker import LayerWorker

    model = _copy(tiny_llama_dir, tmp_path / "m")
    f = _poison(model, "model.embed_tokens.weight", float("nan"), n=7)
    with pytest.raises(CheckpointError, match=rf"{f}: tensor 'model.embed_tokens.weight' holds 7 non-finite"):
        LayerWorker(str(model), calib)
    with pytest.raises(CheckpointError, match="'model.embed_tokens.weight' holds 7 non-finite"):
        OffloadedModel(model).read_outside_layers()


def test_cast_overflow_is_named_as_such(tmp_path, tiny_llama_dir):
    model = _copy(tiny_llama_dir, tmp_path / "m")
    _poison(model, "model.layers.0.mlp.up_proj.weight", 1e10, n=2)
    OffloadedModel(model).load_layer(0)  # finite as stored (float32)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.up_proj.weight' has 2 values beyond the range "
                                              r"of torch.float16 \(stored as torch.float32\)"):
        OffloadedModel(model, dtype=torch.float16).load_layer(0)


# -- 6. the fingerprint covers weight contents ----------------------------------------------------
def test_fingerprint_sees_weights_swapped_at_equal_sizes(tmp_path):
    from conftest import make_tiny_llama

    a, b = tmp_path / "a", tmp_path / "b"
    make_tiny_llama(a, seed=0)
    make_tiny_llama(b, seed=1)
    for p in a.iterdir():  # identical config, index, sizes and headers; only the weights differ
        assert p.stat().st_size == (b / p.name).stat().st_size
        if p.suffix == ".json":
            assert p.read_bytes() == (b / p.name).read_bytes()
    fp = ModelRef(str(a)).fingerprint()
    assert ModelRef(str(b)).fingerprint() != fp
    assert ModelRef(str(_copy(a, tmp_path / "elsewhere" / "a-copy"))).fingerprint() == fp


def test_a_lying_header_changes_the_fingerprint_and_is_refused_by_preflight(tmp_path, tiny_llama_dir):
    """The fingerprint hashes every byte; the header's agreement with the size is preflight's check
    (`OffloadedModel.check_files`), which runs before any digest."""
    from raycompress.models.weights import OffloadedModel

    model = _copy(tiny_llama_dir, tmp_path / "m")
    fp = ModelRef(str(model)).fingerprint()
    f = _shard_of(model, "model.layers.0.mlp.up_proj.weight")
    f.write_bytes(f.read_bytes()[:-4])
    assert ModelRef(str(model)).fingerprint() != fp
    with pytest.raises(CheckpointError, match=f.name):
        OffloadedModel(ModelRef(str(model))).check_files()
