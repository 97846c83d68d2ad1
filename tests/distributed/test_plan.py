"""distributed.plan: the dry-run plan of a 70B-class job from a header-only checkpoint (the real
shapes; sparse files, no weights written), the fit check against a cluster's nodes, and
`raycompress run --dry-run` on the smoke job."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from raycompress.config import JobConfig
from raycompress.distributed.plan import GIB, build_plan, check_fits, format_plan
from raycompress.models.fetch import ModelRef

REPO = Path(__file__).resolve().parents[2]
H, FFN, HEADS, KV, LAYERS, VOCAB = 8192, 28672, 64, 8, 80, 128256  # Llama-3-70B


def _header_only(path: Path, tensors: dict[str, list[int]]) -> None:
    """A safetensors file whose header describes bf16 `tensors` and whose data is a hole."""
    header, off = {}, 0
    for name, shape in tensors.items():
        n = 2 * int(torch_prod(shape))
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + off)
    if os.stat(path).st_blocks * 512 > 2**20:
        pytest.skip("this filesystem has no sparse files")


def torch_prod(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@pytest.fixture(scope="module")
def llama70b(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("llama70b")
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": FFN,
           "num_attention_heads": HEADS, "num_key_value_heads": KV, "num_hidden_layers": LAYERS, "vocab_size": VOCAB,
           "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16"}
    (d / "config.json").write_text(json.dumps(cfg))
    kv, weight_map = KV * H // HEADS, {}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t = {p + "self_attn.q_proj.weight": [H, H], p + "self_attn.k_proj.weight": [kv, H],
             p + "self_attn.v_proj.weight": [kv, H], p + "self_attn.o_proj.weight": [H, H],
             p + "mlp.gate_proj.weight": [FFN, H], p + "mlp.up_proj.weight": [FFN, H],
             p + "mlp.down_proj.weight": [H, FFN], p + "input_layernorm.weight": [H],
             p + "post_attention_layernorm.weight": [H]}
        _header_only(d / f"layer-{i:02d}.safetensors", t)
        weight_map.update({k: f"layer-{i:02d}.safetensors" for k in t})
    rest = {"model.embed_tokens.weight": [VOCAB, H], "model.norm.weight": [H], "lm_head.weight": [VOCAB, H]}
    _header_only(d / "rest.safetensors", rest)
    weight_map.update({k: "rest.safetensors" for k in rest})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def _job(model: Path, **ray) -> JobConfig:
    return JobConfig.model_validate({
        "model": str(model), "base_dir": str(REPO / "jobs"),
        "select": {"sources": {"bio": {"path": "../data/corpora/biomed_pubmedqa_pool.jsonl"}}, "n_samples": 128, "seq_len": 2048},
        "compress": {"algorithm": "sparsegpt", "sparsity": 0.5}, "evaluate": {"tasks": ["piqa"]},
        "ray": {"compress_actors": 8, "eval_actors": 8, "cpus_per_actor": 8, **ray}})


def test_plan_of_a_70b_job_fits_two_8_gpu_nodes(llama70b):
    plan = build_plan(_job(llama70b), ModelRef(str(llama70b)), cluster_gpus=16)
    m = plan["model"]
    assert m["decoder_layers"] == 80 and m["dtype"] == "bfloat16"
    assert abs(m["parameters"] - 70.55e9) < 0.01e9
    assert m["bytes_on_storage"] == sum(p.stat().st_size for p in llama70b.glob("*.safetensors"))
    comp = plan["stages"][1]
    assert comp["gpus_per_actor"] == 1.0 and comp["rows_per_actor"] == [16] * 8
    layer_bytes = (2 * H * H + 2 * KV * H // HEADS * H + 3 * FFN * H) * 2
    floor = comp["memory_floor_gib_per_actor"]
    # the floor holds at least the layer's bf16 weights and the FFN down projection's fp32 Hessian,
    # and fits an 80 GB H100
    assert all(layer_bytes / GIB + FFN**2 * 4 / GIB <= f < 80e9 / GIB for f in floor), floor
    node = {"CPU": 192.0, "GPU": 8.0, "memory": 2e12}
    assert check_fits(plan, [node, node]) == []
    text = format_plan(plan, [])
    assert "80 decoder layers" in text and "the cluster can give every stage" in text


def test_fit_check_names_what_the_cluster_lacks(llama70b):
    plan = build_plan(_job(llama70b, gpus_per_actor=0, compress_actors=2, cpus_per_actor=1, eval_actors=3),
                      ModelRef(str(llama70b)), cluster_gpus=0)
    problems = check_fits(plan, [{"CPU": 2.0, "memory": 4 * GIB}])
    assert any(p.startswith("compress: an actor needs at least") and "4.00 GiB" in p for p in problems), problems
    assert any(p.startswith("evaluate: 3 actors x 1.0 CPU = 3 CPU, the cluster has 2") for p in problems), problems
    assert "cannot run: compress" in format_plan(plan, problems)


def test_cli_dry_run_on_the_smoke_job(ray_local, tmp_path, capsys, monkeypatch):
    from raycompress.cli import main

    monkeypatch.setenv("RAYCOMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["run", str(REPO / "jobs" / "smoke.yaml"), "--output", str(tmp_path / "o"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 decoder layers" in out and "compress: algorithm=sparsegpt" in out
    assert not (tmp_path / "o").exists()  # nothing ran
    raw = yaml.safe_load((REPO / "jobs" / "smoke.yaml").read_text())
    raw["ray"]["eval_actors"] = 5
    (REPO_JOB := tmp_path / "big.yaml").write_text(yaml.safe_dump(raw).replace("../data", str(REPO / "data"))
                                                   .replace("random:models", f"random:{REPO}/jobs/models"))
    assert main(["run", str(REPO_JOB), "--output", str(tmp_path / "o"), "--dry-run"]) == 2
    assert "cannot run: evaluate: 5 actors" in capsys.readouterr().out


def _train_job(model: Path, **train) -> JobConfig:
    """The 70B job with a train stage: 64 one-GPU Ray Train workers, batch 1, seq 4096."""
    from raycompress.config import TrainConfig

    t = {"steps": 10, "num_workers": 64, "gpus_per_worker": 1.0, "batch_size": 1, "seq_len": 4096, **train}
    return _job(model).model_copy(update={"train": TrainConfig(**t)})


H100_NODE = {"CPU": 192.0, "GPU": 8.0, "memory": 2e12}


def test_plan_sizes_the_train_stage_and_zero3_fits_eight_8_gpu_nodes(llama70b):
    job = _train_job(llama70b, strategy="deepspeed", zero_stage=3, activation_checkpointing=True)
    plan = build_plan(job, ModelRef(str(llama70b)), cluster_gpus=64)
    assert [st["stage"] for st in plan["stages"]] == ["select", "compress", "train", "evaluate", "report"]
    tr = plan["stages"][2]
    assert (tr["strategy"], tr["zero_stage"], tr["offload"], tr["num_workers"]) == ("deepspeed", 3, False, 64)
    assert (tr["cpus_per_worker"], tr["gpus_per_worker"]) == (1.0, 1.0)
    gib = tr["memory_gib_per_worker"]
    assert tr["memory_estimate"]["n_params"] == plan["model"]["parameters"]  # the skeleton's count
    assert abs(gib["optimizer"] - 12 * 70_553_706_496 / 64 / GIB) < 0.01 and gib["device_total"] < 80e9 / GIB
    assert check_fits(plan, [H100_NODE] * 8) == []
    # a GPU smaller than the estimate, as the node reports it, is refused
    small = check_fits(plan, [{**H100_NODE, "accelerator_memory_bytes": 24 * GIB}] * 8)
    assert len(small) == 1 and small[0].startswith("train: ") and "the GPU has 24.0 GiB" in small[0], small
    text = format_plan(plan, [])
    assert "train: strategy=deepspeed, zero_stage=3" in text and "memory_estimate" not in text


def test_fit_check_refuses_ddp_training_of_a_70b_and_names_the_strategy(llama70b):
    plan = build_plan(_train_job(llama70b), ModelRef(str(llama70b)), cluster_gpus=64)
    tr = plan["stages"][2]
    assert tr["zero_stage"] is None and tr["memory_gib_per_worker"]["device_total"] > 1000
    problems = check_fits(plan, [H100_NODE] * 8)
    assert len(problems) == 1 and "GiB per GPU needed with ddp, the GPU has 80.0 GiB" in problems[0], problems
    assert "use train.strategy: deepspeed, train.zero_stage: 3, train.activation_checkpointing: true" in problems[0]
    assert f"cannot run: {problems[0]}" in format_plan(plan, problems)
    # too few CPUs and GPUs for the workers: named with the train fields
    few = check_fits(plan, [H100_NODE] * 2)
    assert any(p.startswith("train: 64 workers x 1 GPU = 64 GPU, the cluster has 16") for p in few), few


def test_fit_check_of_cpu_train_workers_uses_node_memory(llama70b):
    plan = build_plan(_train_job(llama70b, gpus_per_worker=0.0, num_workers=4, cpus_per_worker=8.0, seq_len=16),
                      ModelRef(str(llama70b)), cluster_gpus=0)
    problems = check_fits(plan, [{"CPU": 16.0, "memory": 64 * GIB}])
    assert any(p.startswith("train: 4 workers x 8.0 CPU = 32 CPU, the cluster has 16 (lower train.num_workers "
                            "or train.cpus_per_worker)") for p in problems), problems
    assert any(p.startswith("train: ") and "per CPU worker needed with ddp, the largest node has 64.0 GiB" in p
               and "no strategy fits" in p for p in problems), problems


def test_plan_shards_calibration_as_compress_does(llama70b):
    """The plan's compress actors and rows are `shard_calibration`'s: whole micro-batches (4 rows),
    no idle actor (128 rows = 32 micro-batches, so 50 actors asked are 32)."""
    import torch

    from raycompress.engine.transfer import shard_calibration

    plan = build_plan(_job(llama70b, compress_actors=50), ModelRef(str(llama70b)), cluster_gpus=64)
    comp = plan["stages"][1]
    assert comp["actors"] == 32 and comp["rows_per_actor"] == [4] * 32
    mask = torch.tensor([True, False] * 5 + [True])  # 11 rows
    shards = shard_calibration(11, 5, 4, {"d": mask})
    assert [(s.rows.start, s.rows.stop, s.n) for s in shards] == [(0, 4, 4), (4, 8, 4), (8, 11, 3)]
    assert torch.equal(torch.cat([s.subsets["d"] for s in shards]), mask)
    assert [s.n for s in shard_calibration(11, 1, 4)] == [11]
    with pytest.raises(ValueError, match=r"subset masks of lengths \{'d': 10\} over 11 calibration rows"):
        shard_calibration(11, 2, 4, {"d": mask[:10]})


def _tiny_job(model: Path, paths: dict[str, Path], **select) -> JobConfig:
    return JobConfig.model_validate({
        "model": str(model), "base_dir": ".", "select": {"sources": {n: {"path": str(p)} for n, p in paths.items()},
                                                        **select},
        "compress": {"algorithm": "sparsegpt", "sparsity": 0.5}, "evaluate": {"tasks": []},
        "ray": {"cpus_per_actor": 1}})


def _jsonl(path: Path, texts: list[str], ascii_only: bool = True) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=ascii_only) + "\n" for t in texts), encoding="utf-8")
    return path


def test_preflight_refuses_seq_len_beyond_the_models_positions(tiny_llama_dir, tmp_path):
    from raycompress.distributed.plan import PreflightError, preflight

    corpus = _jsonl(tmp_path / "a.jsonl", ["word " * 400])
    preflight(_tiny_job(tiny_llama_dir, {"a": corpus}, seq_len=256, n_samples=2), ModelRef(str(tiny_llama_dir)))
    with pytest.raises(PreflightError, match=r"^select.seq_len: 257 tokens is more than the model's "
                                             r"max_position_embeddings 256 \(its config.json\); use at most 256$"):
        preflight(_tiny_job(tiny_llama_dir, {"a": corpus}, seq_len=257, n_samples=2), ModelRef(str(tiny_llama_dir)))


def test_preflight_refuses_more_tokens_than_the_corpora_hold(tiny_llama_dir, tmp_path):
    import gzip

    from raycompress.distributed.plan import PreflightError, corpus_token_bound, preflight

    paths = {"a": _jsonl(tmp_path / "a.jsonl", ["alpha beta"] * 20), "b": _jsonl(tmp_path / "b.jsonl", ["gamma"] * 9)}
    size = sum(p.stat().st_size for p in paths.values())
    bound = size + 2 * 2
    fits = _tiny_job(tiny_llama_dir, paths, seq_len=16, n_samples=bound // 16)
    assert corpus_token_bound(fits, {n: [str(p)] for n, p in paths.items()}) == bound
    preflight(fits, ModelRef(str(tiny_llama_dir)))
    n = bound // 16 + 1
    with pytest.raises(PreflightError, match=rf"^select.n_samples x select.seq_len: {n} x 16 = {n * 16} tokens, but the 2 "
                                             rf"corpus files of select.sources \({size} bytes\) hold at most {bound} tokens"):
        preflight(_tiny_job(tiny_llama_dir, paths, seq_len=16, n_samples=n), ModelRef(str(tiny_llama_dir)))
    # a compressed file's size bounds nothing: no refusal from sizes (select counts what is there)
    gz = tmp_path / "c.jsonl.gz"
    gz.write_bytes(gzip.compress(paths["a"].read_bytes()))
    preflight(_tiny_job(tiny_llama_dir, {**paths, "c": gz}, seq_len=16, n_samples=10**9), ModelRef(str(tiny_llama_dir)))


def test_the_corpus_bound_holds_for_a_real_tokenizer(tiny_lm_dir, tmp_path):
    """Packed tokens (`data.tokenize.pack`: each document's tokens and a separator) never exceed
    `corpus_token_bound`, for one-character, multi-byte and escaped documents."""
    from transformers import AutoTokenizer

    from raycompress.distributed.plan import corpus_token_bound

    texts = ["a", "é", "日本語", "🙂", " ", "cell protein gene", "x" * 50, '"quoted"\n\\'] * 3
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    packed = sum(len(ids) + 1 for ids in tok(texts, add_special_tokens=False)["input_ids"])
    for ascii_only in (True, False):
        path = _jsonl(tmp_path / f"{ascii_only}.jsonl", texts, ascii_only)
        job = _tiny_job(tiny_lm_dir, {"a": path})
        assert packed <= corpus_token_bound(job, {"a": [str(path)]}), ascii_only


def test_run_refuses_what_the_cluster_cannot_give(ray_local, tiny_llama_dir, tmp_path, caplog, monkeypatch):
    """`require_resources` (what `run` does once Ray is up): every request the 2-CPU local Ray
    cannot give is named, after `ray.resource_wait_s` with one warning; compress asks for its
    real actor count (64 rows = 16 micro-batches: 16 actors, not the million asked)."""
    from raycompress.distributed import plan as plan_mod
    from raycompress.distributed.plan import PreflightError, require_resources

    job = _tiny_job(tiny_llama_dir, {"a": _jsonl(tmp_path / "a.jsonl", ["word " * 400] * 4)}, seq_len=32, n_samples=64)
    assert require_resources(job, ModelRef(str(tiny_llama_dir)))["stages"][1]["actors"] == 1
    big = job.model_copy(update={"ray": job.ray.model_copy(update={"compress_actors": 1_000_000, "eval_actors": 1_000_000,
                                                                  "resource_wait_s": 0.2})})
    monkeypatch.setattr(plan_mod, "POLL_S", 0.05)
    with caplog.at_level("WARNING", logger=plan_mod.__name__), pytest.raises(PreflightError) as err:
        require_resources(big, ModelRef(str(tiny_llama_dir)))
    msg = str(err.value)
    assert msg.startswith("the Ray cluster cannot give what the job asks (after waiting 0.2 s, ray.resource_wait_s): ")
    assert "compress: 16 actors x 1.0 CPU = 16 CPU, the cluster has 2 (lower ray.compress_actors or ray.cpus_per_actor)" in msg
    assert "evaluate: 1000000 actors x 1.0 CPU = 1e+06 CPU, the cluster has 2" in msg
    assert [r.message.split(";")[0] for r in caplog.records if "waiting up to" in r.message] == \
        ["the Ray cluster cannot give yet: compress: 16 actors x 1.0 CPU = 16 CPU, the cluster has 2 (lower "
         "ray.compress_actors or ray.cpus_per_actor)"]


def test_run_waits_for_nodes_to_join(tiny_llama_dir, tmp_path, monkeypatch, caplog):
    """An autoscaling cluster: short of CPUs at first, then a node joins within ray.resource_wait_s."""
    from raycompress.distributed import plan as plan_mod, resources

    looks = iter([[{"CPU": 1.0, "memory": 64 * GIB}]] * 2 + [[{"CPU": 1.0, "memory": 64 * GIB}, {"CPU": 8.0, "memory": 64 * GIB}]])
    monkeypatch.setattr(resources, "cluster_nodes", lambda: next(looks))
    monkeypatch.setattr(plan_mod, "POLL_S", 0.01)
    job = _tiny_job(tiny_llama_dir, {"a": _jsonl(tmp_path / "a.jsonl", ["word " * 400] * 4)}, seq_len=32, n_samples=8)
    job = job.model_copy(update={"ray": job.ray.model_copy(update={"eval_actors": 4, "resource_wait_s": 600})})
    with caplog.at_level("WARNING", logger=plan_mod.__name__):
        plan = plan_mod.require_resources(job, ModelRef(str(tiny_llama_dir)))
    assert plan["stages"][-2]["actors"] == 4 and next(looks, None) is None  # every look taken, the third fitted
    assert sum("waiting up to" in r.message for r in caplog.records) == 1


def test_cli_run_refuses_an_impossible_request_before_any_stage(ray_local, tmp_path, capsys, monkeypatch):
    from raycompress.cli import main

    monkeypatch.setenv("RAYCOMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    raw = yaml.safe_load((REPO / "jobs" / "smoke.yaml").read_text())
    raw["ray"]["eval_actors"] = 1_000_000
    (job := tmp_path / "big.yaml").write_text(yaml.safe_dump(raw).replace("../data", str(REPO / "data"))
                                              .replace("random:models", f"random:{REPO}/jobs/models"))
    assert main(["run", str(job), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert (f"\nerror: {job}: the Ray cluster cannot give what the job asks (after waiting 0 s, ray.resource_wait_s): "
            "evaluate: 1000000 actors x 1.0 CPU = 1e+06 CPU, the cluster has 2 (lower ray.eval_actors or "
            "ray.cpus_per_actor)\n") in err, err
    assert not (tmp_path / "o" / "select").exists()  # no stage ran


def _scheme_job(model: Path, corpus: Path, **compress) -> JobConfig:
    job = _tiny_job(model, {"a": corpus}, seq_len=16, n_samples=2)
    return job.model_copy(update={"compress": job.compress.model_validate(compress)})


def test_preflight_refuses_a_scheme_the_shapes_or_torch_cannot_take(tiny_llama_dir, tmp_path, monkeypatch):
    """Before Ray: a group size not dividing a target's d_in (W4A16's 128 on hidden 64; NVFP4's 16
    on hidden 40) names the field and the module; a float format on a torch without float8 dtypes
    is refused."""
    import torch

    from raycompress.distributed.plan import PreflightError, preflight
    from tests.conftest import make_tiny_llama

    corpus = _jsonl(tmp_path / "a.jsonl", ["word " * 400])
    ref = ModelRef(str(tiny_llama_dir))
    preflight(_scheme_job(tiny_llama_dir, corpus, algorithm="rtn", scheme="NVFP4"), ref)
    with pytest.raises(PreflightError, match=r"^compress.scheme \(W4A16\): group size 128 does not divide d_in=64 "
                                             r"of module self_attn.q_proj"):
        preflight(_scheme_job(tiny_llama_dir, corpus, algorithm="gptq", scheme="W4A16"), ref)
    odd = tmp_path / "odd"
    make_tiny_llama(odd, hidden=40, inter=80)
    with pytest.raises(PreflightError, match=r"^compress.scheme \(NVFP4\): group size 16 does not divide d_in=40"):
        preflight(_scheme_job(odd, corpus, algorithm="rtn", scheme="NVFP4"), ModelRef(str(odd)))
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(PreflightError, match=r"^compress.scheme \(FP8_DYNAMIC\): needs float8 dtypes"):
        preflight(_scheme_job(tiny_llama_dir, corpus, algorithm="rtn", scheme="FP8_DYNAMIC"), ref)


def test_preflight_refuses_routing_selection_on_a_dense_model(tiny_llama_dir, tmp_path):
    from raycompress.distributed.plan import PreflightError, preflight

    corpus = _jsonl(tmp_path / "a.jsonl", ["word " * 400])
    job = _tiny_job(tiny_llama_dir, {"a": corpus}, seq_len=16, n_samples=2, method="routing")
    with pytest.raises(PreflightError, match=r"^select.method: 'routing' probes the model's expert routers"):
        preflight(job, ModelRef(str(tiny_llama_dir)))
