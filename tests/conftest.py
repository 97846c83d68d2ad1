"""Shared fixtures: a tiny random Llama checkpoint on disk, and a local Ray when a test asks."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def make_tiny_llama(path, layers: int = 2, hidden: int = 64, inter: int = 128, vocab: int = 256, seed: int = 0):
    """Save a random LlamaForCausalLM (real architecture, tiny config) and a tokenizer-free folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path, max_shard_size="100KB")
    return model


WORDS = ("cell protein gene tumor patient dose trial therapy blood acid receptor enzyme "
         "nation congress people freedom economy war peace budget tax law family work").split()


def random_doc(rng, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def write_tokenizer(path, texts, vocab_size: int = 300) -> int:
    """Train a tiny byte-level BPE tokenizer on `texts` and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return len(fast)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A tiny random Llama with a real (tiny, trained) tokenizer."""
    import random

    path = tmp_path_factory.mktemp("tiny_lm")
    rng = random.Random(0)
    vocab = write_tokenizer(path, [random_doc(rng, 60) for _ in range(80)])
    make_tiny_llama(path, layers=2, hidden=64, inter=128, vocab=vocab)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_llama(path)
    return path


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server (moto) on 127.0.0.1 with bucket `raycompress-test`; yields a function that makes
    a location in it: ``s3_server("a/b")`` -> ``s3://raycompress-test/a/b?endpoint_override=127.0.0.1:PORT&scheme=http``.

    The endpoint travels in the URI (pyarrow reads AWS_ENDPOINT_URL only when it is first imported);
    dummy credentials are put in the environment, where pyarrow reads them and where Ray nodes
    started later inherit them. No network beyond loopback.
    """
    pytest.importorskip("moto.server")
    import logging

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    query = f"?endpoint_override={host}:{port}&scheme=http"
    pafs.FileSystem.from_uri(f"s3://raycompress-test{query}&allow_bucket_creation=true")[0].create_dir("raycompress-test")
    yield lambda path="": f"s3://raycompress-test/{path.strip('/')}{query}"
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_job_dir(tmp_path_factory):
    """A whole job on a tiny random Llama with a tokenizer trained on the fly: two JSONL sources (one with
    a malformed and an empty line), a perplexity task and the shipped piqa task on small files."""
    import json
    import random

    import yaml

    root = tmp_path_factory.mktemp("job")
    rng = random.Random(0)
    bio = [random_doc(rng, 60) for _ in range(40)]
    gen = [random_doc(rng, 60) for _ in range(40)]
    (root / "bio.jsonl").write_text("\n".join(json.dumps({"id": f"b{i}", "text": t}) for i, t in enumerate(bio))
                                    + "\n{not json\n" + json.dumps({"id": "e", "text": "   "}) + "\n")
    (root / "gen.jsonl").write_text("\n".join(json.dumps({"id": f"g{i}", "text": t}) for i, t in enumerate(gen)) + "\n")
    (root / "eval.jsonl").write_text("\n".join(json.dumps({"text": random_doc(rng, 80)}) for _ in range(6)) + "\n")
    (root / "piqa.jsonl").write_text("\n".join(json.dumps({"goal": random_doc(rng, 8), "sol1": random_doc(rng, 5), "sol2": random_doc(rng, 6),
                                                           "label": i % 2}) for i in range(6)) + "\n")
    model = root / "model"
    vocab = write_tokenizer(model, bio + gen)
    make_tiny_llama(model, layers=2, hidden=64, inter=128, vocab=vocab)
    job = {
        "name": "tiny", "model": str(model),
        "select": {"method": "zipcal", "sources": {"bio": {"path": str(root / "bio.jsonl")}, "gen": {"path": str(root / "gen.jsonl")}},
                   "mix": {"bio": 0.75, "gen": 0.25}, "n_samples": 8, "seq_len": 32, "seed": 0},
        "compress": {"algorithm": "sparsegpt", "sparsity": 0.5},
        "evaluate": {"batch_tokens": 512, "task_dirs": [str(REPO / "jobs" / "tasks")], "tasks": [
            {"name": "ppl", "kind": "perplexity", "path": str(root / "eval.jsonl"), "max_length": 32},
            {"name": "piqa", "path": str(root / "piqa.jsonl")}]},  # the shipped piqa task on this file
        "ray": {"compress_actors": 2, "eval_actors": 2, "cpus_per_actor": 0.5, "torch_threads": 1},
    }
    (root / "job.yaml").write_text(yaml.safe_dump(job))
    return root


@pytest.fixture(scope="session")
def tiny_job_run(tiny_job_dir, ray_local):
    """The tiny job run once, in this process, into tiny_job_dir/out (tests build on it, in any order)."""
    from raycompress.config import load_config
    from raycompress.distributed.orchestrator import ORDER, run_job

    out = tiny_job_dir / "out"
    run_job(load_config(tiny_job_dir / "job.yaml"), out, ORDER, tiny_job_dir / "model")
    return out
