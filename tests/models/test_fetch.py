"""models.fetch: a model by local folder or URI, read through the node cache; content fingerprints."""
from __future__ import annotations

import shutil

import pytest
import torch

from raycompress.models.fetch import ModelRef, resolve_model
from raycompress.models.weights import OffloadedModel
from raycompress.storage import uri


def _upload(folder, location):
    for p in sorted(folder.iterdir()):
        if p.is_file():
            uri.copy(str(p), uri.join(location, p.name))


@pytest.fixture(scope="module")
def remote_llama(tiny_llama_dir, s3_server):
    loc = s3_server("models/tiny-llama")
    _upload(tiny_llama_dir, loc)
    return loc


def test_remote_model_reads_like_local(tiny_llama_dir, remote_llama, tmp_path):
    local = OffloadedModel(tiny_llama_dir)
    remote = OffloadedModel(ModelRef(remote_llama, str(tmp_path / "cache")))
    assert remote.weight_map == local.weight_map and remote.dtype == local.dtype
    a, b = local.read_tensors(local.layer_prefix(1)), remote.read_tensors(remote.layer_prefix(1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # only the files holding what was read are on this node, besides the metadata
    cached = {p.name for p in (tmp_path / "cache" / "views").rglob("*") if p.is_symlink()}
    needed = {remote.weight_map[k] for k in remote.weight_map if k.startswith(remote.layer_prefix(1) + ".")}
    assert needed <= cached and len(cached) < len(list(tiny_llama_dir.iterdir()))


def test_fingerprint_is_location_free(tiny_llama_dir, remote_llama, tmp_path):
    copy = tmp_path / "elsewhere"
    shutil.copytree(tiny_llama_dir, copy)
    fp = ModelRef(str(tiny_llama_dir)).fingerprint()
    assert ModelRef(str(copy)).fingerprint() == fp
    assert ModelRef(remote_llama, str(tmp_path / "c")).fingerprint() == fp
    cfg = (copy / "config.json").read_text()
    (copy / "config.json").write_text(cfg.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    assert ModelRef(str(copy)).fingerprint() != fp


def test_resolve_model_checks_before_work(tmp_path, tiny_llama_dir, s3_server):
    assert resolve_model(tiny_llama_dir.name, tiny_llama_dir.parent).location == str(tiny_llama_dir)
    with pytest.raises(FileNotFoundError, match="nor a known alias"):
        resolve_model("no-such-model", tmp_path)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_model(s3_server("models/absent"))
    assert resolve_model("smollm2-135m-instruct").is_alias


def test_random_model_is_built_the_same_on_every_node(tmp_path):
    """random:<folder>: the driver carries config + tokenizer in the ModelRef; two nodes (two
    caches) build byte-identical bf16 checkpoints that load with transformers."""
    import pickle

    from pathlib import Path

    from transformers import AutoModelForCausalLM

    folder = Path(__file__).resolve().parents[2] / "jobs" / "models" / "smoke-llama"
    ref = resolve_model("random:smoke-llama", folder.parent, str(tmp_path / "node-a"))
    assert ref.is_alias and {n for n, _ in ref.files} >= {"config.json", "tokenizer.json"}
    other = pickle.loads(pickle.dumps(ref)).__class__(ref.location, str(tmp_path / "node-b"), ref.files)
    a, b = ref.local(), other.local()
    assert a != b and (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert ref.fingerprint() == other.fingerprint()
    assert OffloadedModel(ref).dtype == torch.bfloat16 and OffloadedModel(ref).num_layers == 4
    m = AutoModelForCausalLM.from_pretrained(a, trust_remote_code=False)
    assert m.config.num_hidden_layers == 4


def test_random_model_refuses_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_model("random:nothing", tmp_path)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "config.json").write_text("{}")
    (tmp_path / "w" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="holds weights"):
        resolve_model("random:w", tmp_path)
