"""Mixture-of-experts benchmark: our compress stage on MoE layer shapes; prints ONE JSON line.

    .venv/bin/python jobs/benchmarks/moe.py [--workdir DIR] [--shapes qwen3-235b-a22b,mixtral-8x22b]
        [--scale 8] [--actors 1,2] [--samples 8 --seq-len 128] [--cpus 2] [--smoke]

For each MoE shape (`SHAPES`: Qwen3-235B-A22B: hidden 4096, 128 experts of intermediate 1536, 8
active; Mixtral-8x22B: hidden 6144, 8 experts of intermediate 16384, 2 active) a synthetic 1-layer
bf16 checkpoint is written (random N(0, 0.02²) weights, experts stored fused as the live module
holds them, which `models.weights` loads as it loads per-expert tensors), with every width divided
by `--scale` (expert count and top-k kept; `--scale 1` is the real layer, about 5 GB of expert
weights and 10 GB of float32 expert Hessians for Qwen3-235B, 21 GB / 14 GB for Mixtral-8x22B: more
than this machine holds). `raycompress compress` then runs GPTQ W4 (group 128, or the largest
power of two ≤ 128 dividing the widths) with 1 and 2 Ray actors sharing `--cpus` cores, and the
pipeline's own measurements are read from OUT/compress/compression.json (`scale.summarise_run`).

Figures (per shape): rss_ratio = max over actors and runs of peak private RSS / analytic RSS
(`engine.budget`, MoE terms included); bytes_ratio = measured / analytic bytes moved per layer
(2-actor runs); seconds_per_layer (1 actor); scaling_2_vs_1 = seconds_per_layer(1) /
seconds_per_layer(2); tokens_per_expert_min over the layer's experts and the experts that fell back.
identical_across_actors: a tiny Qwen3-MoE and a tiny Qwen2-MoE (shared expert) compressed
in-process (`LocalBackend`) with GPTQ int4 and float64 statistics by 1, 2 and 3 workers give
byte-identical shards (true/false).
Aims: rss_ratio <= 1.2, bytes_ratio <= 1.1, identical_across_actors true.
--smoke: one tiny Qwen3-MoE shape (hidden 64, 8 experts of 32, top-2), 1 actor, 4 x 16 tokens, and
the identity check. The routing-aware selection figures of issue 22 (`routing_aware`, `zipcal`,
`random`) are not measured here (selection is another helper's part).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "jobs" / "benchmarks"))
sys.path.insert(0, str(ROOT))
from _common import emit, work_folder  # noqa: E402
from _synthetic import MissingKey, job_dict, run_compress, write_select_dir  # noqa: E402

SHAPES = {
    "qwen3-235b-a22b": dict(arch="Qwen3MoeForCausalLM", hidden=4096, experts=128, inter=1536, top_k=8, heads=64,
                            kv_heads=4, head_dim=128),
    "mixtral-8x22b": dict(arch="MixtralForCausalLM", hidden=6144, experts=8, inter=16384, top_k=2, heads=48,
                          kv_heads=8, head_dim=128),
}
SMOKE_SHAPE = dict(arch="Qwen3MoeForCausalLM", hidden=64, experts=8, inter=32, top_k=2, heads=4, kv_heads=2, head_dim=16)
AIMS = {"rss_ratio": ("<=", 1.2), "bytes_ratio": ("<=", 1.1)}


def scaled(shape: dict, s: int) -> dict:
    """`shape` with hidden, intermediate and head_dim divided by s (experts, top-k, heads kept)."""
    return {**shape, "hidden": shape["hidden"] // s, "inter": shape["inter"] // s, "head_dim": shape["head_dim"] // s}


def moe_config(shape: dict, vocab: int = 512):
    """A transformers config of one decoder layer of `shape`."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=shape["hidden"], num_hidden_layers=1, num_attention_heads=shape["heads"],
                  num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"], max_position_embeddings=4096,
                  num_experts_per_tok=shape["top_k"], torch_dtype="bfloat16", tie_word_embeddings=False)
    if shape["arch"] == "MixtralForCausalLM":
        cfg = tf.MixtralConfig(intermediate_size=shape["inter"], num_local_experts=shape["experts"], **common)
    else:
        cfg = tf.Qwen3MoeConfig(moe_intermediate_size=shape["inter"], intermediate_size=shape["inter"],
                                num_experts=shape["experts"], **common)
    cfg.architectures = [shape["arch"]]
    return cfg


def write_moe_checkpoint(model_dir: Path, shape: dict, seed: int = 0, std: float = 0.02) -> Path:
    """A random bf16 checkpoint of `shape` at `model_dir` (names and shapes from transformers' own
    module on the meta device; norms 1.0): shard 0 the embeddings, norm and lm_head, shard 1 the
    layer. Reused when `synthetic.json` records the same shape and seed."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    meta = {"shape": shape, "seed": seed, "std": std}
    marker = model_dir / "synthetic.json"
    if marker.is_file() and json.loads(marker.read_text()) == meta:
        return model_dir
    model_dir.mkdir(parents=True, exist_ok=True)
    cfg = moe_config(shape)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(seed)
    names = ["model-00000-of-00002.safetensors", "model-00001-of-00002.safetensors"]
    weight_map, total = {}, 0
    for k, name in enumerate(names):
        tensors = {}
        for key, p in skeleton.state_dict().items():
            if key.startswith("model.layers.") == (k == 1):
                tensors[key] = (torch.ones(p.shape) if "norm" in key else torch.randn(p.shape, generator=gen) * std).to(torch.bfloat16)
        save_file(tensors, str(model_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * 2 for t in tensors.values())
        del tensors
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                         "weight_map": dict(sorted(weight_map.items()))}))
    cfg.to_json_file(str(model_dir / "config.json"))
    marker.write_text(json.dumps(meta))
    return model_dir


def group_size(shape: dict) -> int:
    """The largest power of two <= 128 dividing every width GPTQ groups (hidden, intermediate, head_dim·heads)."""
    g = math.gcd(shape["hidden"], shape["inter"], shape["head_dim"] * shape["heads"])
    return min(128, g & -g)


def _ray(k: int, cpus: int) -> dict:
    """The job's `ray:` section for k actors sharing `cpus` cores, cpus / k threads each: every actor
    solves its share of a layer's experts at the same time (unlike a dense layer, where one actor
    solves the down projection while the others wait, `scale._ray`)."""
    return {"compress_actors": k, "num_cpus": cpus, "cpus_per_actor": cpus / k, "torch_threads": max(1, cpus // k)}


def run_shape(name: str, shape: dict, a: argparse.Namespace) -> tuple[dict, list[str]]:
    """1- and 2-actor runs of one shape; (figures, errors)."""
    from scale import summarise_run

    model_dir = write_moe_checkpoint(a.workdir / name / "model", shape)
    select_dir = write_select_dir(a.workdir / name / "select", a.samples, a.seq_len, 512)
    compress = {"algorithm": "gptq", "quant": {"bits": 4, "group_size": group_size(shape)}}
    runs, errors = {}, []
    for k in a.actors:
        out = a.workdir / name / f"run-{k}"
        try:
            rec, wall, _ = run_compress(str(ROOT / ".venv" / "bin" / "raycompress"), out, select_dir,
                                        job_dict(model_dir, select_dir, a.samples, a.seq_len, compress, _ray(k, a.cpus)))
            runs[k] = {**summarise_run(rec, out / "compress" / "compression.json"), "process_wall_s": wall}
            experts = [m for m in rec["modules"] if m.get("expert") is not None and m["module"].endswith(".gate")]
            runs[k].update(tokens_per_expert_min=min((m["tokens"] for m in experts), default=None),
                           experts_fell_back=sum("fallback" in m for m in experts))
        except (RuntimeError, MissingKey, ValueError, OSError, KeyError) as exc:
            errors.append(f"{name}, {k} actor(s): {exc}")
    out = {"shape": shape, "group_size": compress["quant"]["group_size"], "runs": {str(k): r for k, r in runs.items()}}
    if runs:
        out["rss_ratio"] = max(r["rss_ratio"] for r in runs.values())
        ratios = [r["bytes_ratio"] for r in runs.values() if "bytes_ratio" in r]
        out["bytes_ratio"] = max(ratios) if ratios else None
        out["seconds_per_layer"] = runs.get(1, next(iter(runs.values())))["seconds_per_layer"]
        out["scaling_2_vs_1"] = runs[1]["seconds_per_layer"] / runs[2]["seconds_per_layer"] if {1, 2} <= set(runs) else None
        out["tokens_per_expert_min"] = min(r["tokens_per_expert_min"] for r in runs.values())
    return out, errors


def identical_across_actors() -> bool:
    """Tiny Qwen3-MoE and Qwen2-MoE, GPTQ int4 (group 8), float64 statistics: 1, 2, 3 in-process
    workers write byte-identical shards."""
    from raycompress.config import CompressConfig
    from raycompress.engine.pipeline import LocalBackend, compress_layers
    from raycompress.engine.transfer import shard_calibration
    from raycompress.engine.worker import LayerWorker
    from raycompress.models.weights import OffloadedModel
    from tests.models.moe_fixtures import make_tiny_moe

    cfg = CompressConfig(algorithm="gptq", quant={"bits": 4, "group_size": 8}, micro_batch=2, hessian_dtype="float64")
    ids = torch.randint(0, 128, (6, 8), generator=torch.Generator().manual_seed(0))
    same = True
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM"):
            make_tiny_moe(Path(tmp) / arch, arch)
            digests = []
            for k in (1, 2, 3):
                ws = [LayerWorker(str(Path(tmp) / arch), ids[s.rows], micro_batch=2, hessian_dtype=torch.float64)
                      for s in shard_calibration(6, k, 2)]
                out = Path(tmp) / f"{arch}-{k}"
                compress_layers(LocalBackend(ws), OffloadedModel(Path(tmp) / arch), cfg, out, "fp")
                digests.append([hashlib.sha256(p.read_bytes()).hexdigest()
                                for p in sorted((out / "model").glob("*.safetensors"))])
            same = same and digests[0] == digests[1] == digests[2]
    return same


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--scale", type=int, default=8, help="divide hidden, intermediate and head_dim by this")
    p.add_argument("--actors", default="1,2")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    a.actors = [int(x) for x in a.actors.split(",")]
    a.shapes = {n: scaled(SHAPES[n], a.scale) for n in a.shapes.split(",")}
    if a.smoke:
        a.shapes, a.actors, a.samples, a.seq_len = {"tiny-qwen3-moe": SMOKE_SHAPE}, [1], 4, 16
    return a


def main(argv: list[str] | None = None) -> int:
    """Build, measure, print one JSON line; exit 1 if any run reported an error."""
    a = _args(argv)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAY_ADDRESS="local")
    a.workdir = work_folder(a.workdir, "moe")
    t0 = time.perf_counter()
    shapes, errors = {}, []
    for name, shape in a.shapes.items():
        shapes[name], errs = run_shape(name, shape, a)
        errors += errs
    result = {"shapes": shapes, "scale": 1 if a.smoke else a.scale, "actors": a.actors,
              "calibration_tokens": a.samples * a.seq_len, "identical_across_actors": identical_across_actors(),
              "aims": {k: {"op": op, "value": v} for k, (op, v) in AIMS.items()}, "errors": errors,
              "smoke": a.smoke, "seconds": time.perf_counter() - t0}
    for key, worst in (("rss_ratio", max), ("bytes_ratio", max), ("seconds_per_layer", max), ("scaling_2_vs_1", min)):
        vals = [s[key] for s in shapes.values() if s.get(key) is not None]
        result[key] = worst(vals) if vals else None  # the worst over shapes; per shape under "shapes"
    emit(result)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
