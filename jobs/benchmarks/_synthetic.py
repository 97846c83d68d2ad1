"""Synthetic Llama checkpoints and job folders for the scale benchmarks (no download, no select stage).

- `write_checkpoint(dir, shape)`: a Hugging Face `LlamaForCausalLM` folder (config.json, one bf16
  safetensors shard per decoder layer plus one for embed / norm / lm_head, and
  model.safetensors.index.json) with random weights, N(0, 0.02²) (norm weights 1.0), generated
  layer by layer from a seeded `torch.Generator` so that peak memory is about one layer.
  Default shapes are Llama-3-70B's layer shapes with a small vocabulary and few layers.
- `write_calibration(path, n, seq, vocab)`: Parquet with one column `input_ids` (list<int32>),
  n rows of seq seeded random ids in [0, vocab).
- `write_select_dir(dir, ...)`: what `raycompress compress` reads from OUT/select
  (calibration.parquet and manifest.json with its `calibration_sha256`), so that the compress
  stage runs without a select stage.
- `job_dict(...)`, `prepare_job(...)` and `run_compress(cli, out, select_dir, job)`: one
  compress run in a fresh output folder; `require(record, keys, path)` checks compression.json.

No tokenizer is written: our engine needs none, and `_peer_oneshot.py` runs llm-compressor on the
pre-tokenized Parquet with a stand-in processor when the folder has no tokenizer.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

MARKER = "synthetic.json"  # written last: its presence means the folder is complete


@dataclass(frozen=True)
class LlamaShape:
    """Llama shapes; defaults are one Llama-3-70B layer (hidden 8192, 64 / 8 heads, FFN 28672)."""

    hidden: int = 8192
    heads: int = 64
    kv_heads: int = 8
    ffn: int = 28672
    layers: int = 2
    vocab: int = 4096
    max_positions: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0

    @property
    def head_dim(self) -> int:
        """Width of one attention head (hidden / heads)."""
        return self.hidden // self.heads

    def layer_params(self) -> int:
        """Weights of one decoder layer (the seven linears plus two norms)."""
        kv = self.kv_heads * self.head_dim
        return 2 * self.hidden * self.hidden + 2 * kv * self.hidden + 3 * self.ffn * self.hidden + 2 * self.hidden


def llama_config(shape: LlamaShape) -> dict:
    """config.json for `shape` (LlamaForCausalLM, bf16, untied embeddings).

    Raises:
        ValueError: hidden is not a multiple of heads, or heads not a multiple of kv_heads.
    """
    if shape.hidden % shape.heads or shape.heads % shape.kv_heads:
        raise ValueError(f"need hidden % heads == 0 and heads % kv_heads == 0, got hidden={shape.hidden} "
                         f"heads={shape.heads} kv_heads={shape.kv_heads}")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": shape.hidden, "intermediate_size": shape.ffn, "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads, "head_dim": shape.head_dim,
        "vocab_size": shape.vocab, "max_position_embeddings": shape.max_positions,
        "rms_norm_eps": shape.rms_norm_eps, "rope_theta": shape.rope_theta, "rope_scaling": None,
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "initializer_range": 0.02, "pretraining_tp": 1, "tie_word_embeddings": False, "use_cache": True,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
    }


def _normal(gen: torch.Generator, rows: int, cols: int, std: float) -> torch.Tensor:
    """(rows, cols) bf16 N(0, std²), drawn in float32 slabs of ≤ 2**26 values to bound the temporary."""
    out = torch.empty(rows, cols, dtype=torch.bfloat16)
    step = max(1, (1 << 26) // cols)
    for r in range(0, rows, step):
        n = min(step, rows - r)
        out[r : r + n] = torch.randn(n, cols, generator=gen).mul_(std)  # copy_ casts to bf16
    return out


def _layer_tensors(shape: LlamaShape, i: int, gen: torch.Generator, std: float) -> dict[str, torch.Tensor]:
    """Weights of decoder layer i, named as in transformers' LlamaForCausalLM; W: (d_out, d_in)."""
    h, kv, f = shape.hidden, shape.kv_heads * shape.head_dim, shape.ffn
    p = f"model.layers.{i}."
    dims = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
    t = {f"{p}{name}.weight": _normal(gen, *d, std) for name, d in dims.items()}
    t[f"{p}input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    t[f"{p}post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    return t


def _matches(model_dir: Path, meta: dict) -> bool:
    """True when `model_dir` is a finished synthetic checkpoint made from `meta`."""
    marker = model_dir / MARKER
    return marker.is_file() and json.loads(marker.read_text()) == meta


def write_checkpoint(model_dir: Path, shape: LlamaShape = LlamaShape(), seed: int = 0, std: float = 0.02) -> Path:
    """Write (or reuse, when `synthetic.json` records the same shape, seed and std) a random
    bf16 Llama checkpoint at `model_dir`; returns `model_dir`.

    Shards: model-00000-of-0000N.safetensors holds embed_tokens, model.norm and lm_head; shard
    i+1 holds decoder layer i. Peak memory: one layer in bf16, a float32 slab of ≤ 256 MiB,
    and safetensors' write buffer (up to one more layer): about 4 GB at Llama-3-70B widths.
    """
    from safetensors.torch import save_file

    config = llama_config(shape)
    meta = {"shape": asdict(shape), "seed": seed, "std": std, "config": config}
    if _matches(model_dir, meta):
        return model_dir
    shutil.rmtree(model_dir, ignore_errors=True)
    model_dir.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    n = shape.layers + 1
    names = [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(n)]
    weight_map: dict[str, str] = {}
    total = 0
    outer = {"model.embed_tokens.weight": _normal(gen, shape.vocab, shape.hidden, std),
             "model.norm.weight": torch.ones(shape.hidden, dtype=torch.bfloat16),
             "lm_head.weight": _normal(gen, shape.vocab, shape.hidden, std)}
    for k in range(n):
        tensors = outer if k == 0 else _layer_tensors(shape, k - 1, gen, std)
        save_file(tensors, str(model_dir / names[k]), metadata={"format": "pt"})
        weight_map.update({key: names[k] for key in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    outer = None
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    (model_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (model_dir / MARKER).write_text(json.dumps(meta, indent=2))
    return model_dir


def write_calibration(path: Path, n: int, seq_len: int, vocab: int, seed: int = 0) -> Path:
    """Parquet at `path`: column `input_ids` list<int32>, n rows × seq_len ids uniform in [0, vocab)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq_len), generator=gen, dtype=torch.int64).to(torch.int32)
    table = pa.table({"input_ids": pa.array(ids.tolist(), type=pa.list_(pa.int32()))})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def _sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_select_dir(select_dir: Path, n: int, seq_len: int, vocab: int, seed: int = 0) -> Path:
    """OUT/select as the compress stage reads it: calibration.parquet and manifest.json.

    The compress stage needs only `calibration_sha256` from the manifest (for its resume
    fingerprint); the other fields mirror what `raycompress select` writes. Returns `select_dir`.
    """
    calib = write_calibration(select_dir / "calibration.parquet", n, seq_len, vocab, seed)
    digest = _sha256(calib)
    manifest = {"fingerprint": digest, "method": "synthetic", "method_source": "uniform random token ids",
                "inputs": [], "config": {"n": n, "seq_len": seq_len, "vocab": vocab}, "seed": seed,
                "quotas": {"synthetic": n}, "usable_documents": {}, "skipped": {},
                "selected": [{"source": "synthetic", "uid": str(i), "doc_id": str(i), "score": 0.0} for i in range(n)],
                "calibration_sha256": digest}
    (select_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return select_dir


def job_dict(model_dir: Path, select_dir: Path, n: int, seq_len: int, compress: dict, ray: dict) -> dict:
    """A job YAML mapping for `raycompress compress`: `model` is the synthetic folder; the select
    section only has to validate (the stage is never run); no evaluation tasks."""
    return {"name": "synthetic-scale", "model": str(model_dir),
            "select": {"method": "random", "n_samples": n, "seq_len": seq_len,
                       "sources": {"synthetic": {"path": str(select_dir / "calibration.parquet")}}},
            "compress": compress, "evaluate": {"tasks": [], "include_dense": False}, "ray": ray,
            "base_dir": str(select_dir.parent)}


def prepare_job(out: Path, select_dir: Path, job: dict) -> Path:
    """A fresh output folder `out` with select/ copied in and job.yaml written; returns job.yaml.
    The folder is emptied first: `raycompress` skips stages that `state.json` records as done."""
    import yaml

    from _common import claim

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(select_dir, claim(out) / "select")
    (out / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    return out / "job.yaml"


class MissingKey(KeyError):
    """compression.json lacks a measurement the benchmark needs."""

    def __str__(self) -> str:
        """The message itself (KeyError would quote it)."""
        return str(self.args[0])


def require(record: dict, keys: tuple[str, ...], path: Path) -> dict:
    """`record` if it has every key in `keys`.

    Raises:
        MissingKey: naming the first missing key and the file.
    """
    for key in keys:
        if key not in record:
            raise MissingKey(f"{path} has no key '{key}' (the compress stage does not record it yet); "
                             f"keys present: {sorted(record)}")
    return record


def log_tail(log: Path, lines: int = 8) -> str:
    """The last `lines` non-empty lines of a log file (for error reports in the JSON)."""
    if not log.is_file():
        return f"(no log at {log})"
    text = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return "\n".join(text[-lines:])


def run_compress(cli: str, out: Path, select_dir: Path, job: dict,
                 timeout_s: float | None = None) -> tuple[dict, float, float]:
    """Run `cli compress job.yaml --output out` as its own process tree (stderr -> out.log beside it).

    `timeout_s` wraps the command in coreutils `timeout` (TERM, then KILL 10 s later; exit 124).
    Returns:
        (compression.json, process wall seconds, peak summed RSS of the process tree in MiB).
    Raises:
        RuntimeError: the command failed or timed out; the message carries the log's last lines.
    """
    from peer_llmcompressor import run_measured

    job_file = prepare_job(out, select_dir, job)
    log = out.parent / f"{out.name}.log"
    cmd = [cli, "compress", str(job_file), "--output", str(out)]
    if timeout_s:
        cmd = ["timeout", "-k", "10", str(int(timeout_s)), *cmd]
    try:
        _, wall, rss = run_measured(cmd, log)
    except RuntimeError as exc:
        note = f" (timed out after {timeout_s:g} s)" if timeout_s and "exit code 124" in str(exc) else ""
        raise RuntimeError(f"{exc}{note}\n{log_tail(log)}") from exc
    return json.loads((out / "compress" / "compression.json").read_text()), wall, rss
