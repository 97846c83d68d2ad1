"""Benchmark of the compression engine; prints ONE JSON line.

    make model && make peer-env   # from a fresh clone: .venv with the default model, and .venv-peer
    .venv/bin/python jobs/benchmarks/compression.py [--parts peer,depth,scale] [--output DIR] [--smoke]

The work folder is --output (anywhere), else a new temporary folder. The job file is read with
the project's loader, so its relative paths resolve against its own folder wherever its copies
are written. --smoke: `jobs/smoke.yaml`'s random tiny Llama, 4 x 32 calibration tokens of random
ids (`_synthetic.write_select_dir`, no select run), one point (the scale part with 1 actor); depth
and peer are reported as skipped.

- peer: ours vs llm-compressor `oneshot` (in `.venv-peer`, `make peer-env`) on SmolLM2 with the
  same calibration set, for Wanda 50%, SparseGPT 50% and GPTQ int4 group 64 (symmetric, static
  activation order): wall_ratio and peak_rss_ratio (ours / peer, whole process trees) and
  perplexity of both on the job's perplexity tasks, scored in this process
  (`peer_llmcompressor.perplexities`; both GPTQ checkpoints are compressed-tensors pack-quantized
  and are dequantized as they load, `peer_llmcompressor.load_dense`).
- depth: peak RSS of our compress stage on random Llama configs of SmolLM2's width with 4 and 32
  decoder layers (same calibration ids), and their ratio.
- scale: compress wall time with 1 and 2 actors, and the share of actor time spent in statistics,
  solve, propagation and I/O, plus the driver-side remainder (transfer and scheduling).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "jobs" / "benchmarks"))
from _common import claim, emit, job_mapping, offline, skipped, smoke_job, work_folder, write_job  # noqa: E402
from peer_llmcompressor import perplexities, run_measured  # noqa: E402

ALGOS = {
    "wanda": ({"algorithm": "wanda", "sparsity": 0.5}, "wanda"),
    "sparsegpt": ({"algorithm": "sparsegpt", "sparsity": 0.5}, "sparsegpt"),
    "gptq_w4g64": ({"algorithm": "gptq", "quant": {"bits": 4, "group_size": 64, "act_order": True}}, "gptq_w4g64"),
}


def compress_run(cli: str, raw: dict, select_dir: Path, out: Path) -> tuple[float, float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(select_dir, claim(out) / "select")
    write_job(out / "job.yaml", raw)  # raw carries the job file's base_dir
    _, wall, rss = run_measured([cli, "compress", str(out / "job.yaml"), "--output", str(out)], out / "log.txt")
    return wall, rss, json.loads((out / "compress" / "compression.json").read_text())


def peer_part(args, job, raw, cli, model_dir, select_dir) -> dict:
    calib = select_dir / "calibration.parquet"
    out = {}
    for name in args.algorithms.split(","):
        ours_cfg, peer_name = ALGOS[name]
        wall, rss, _ = compress_run(cli, {**raw, "compress": ours_cfg}, select_dir, args.output / f"ours-{name}")
        peer_dir = args.output / f"peer-{name}"
        txt, pwall, prss = run_measured([str(args.peer_python), str(ROOT / "jobs/benchmarks/_peer_oneshot.py"), "--model", str(model_dir),
                                         "--calibration", str(calib), "--algorithm", peer_name, "--output", str(peer_dir)],
                                        args.output / f"peer-{name}.log")
        po, pp = perplexities(job, args.output / f"ours-{name}" / "compress" / "model"), perplexities(job, peer_dir)
        out[name] = {"ours": {"wall_s": round(wall, 1), "peak_rss_mb": round(rss), "perplexity": po},
                     "peer": {"wall_s": round(pwall, 1), "peak_rss_mb": round(prss), "perplexity": pp,
                              "oneshot_wall_s": round(json.loads(txt.strip().splitlines()[-1])["wall_s"], 1)},
                     "wall_ratio": round(wall / pwall, 3), "peak_rss_ratio": round(rss / prss, 3),
                     "ppl_ratio": {t: round(po[t] / pp[t], 4) for t in po}}
    return out


def depth_part(args, raw, cli, select_dir) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    res = {}
    for layers in (4, 32):
        mdir = args.output / f"llama-{layers}l"
        if not (mdir / "config.json").exists():
            cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                              num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
            cfg.architectures = ["LlamaForCausalLM"]
            LlamaForCausalLM(cfg).save_pretrained(mdir, max_shard_size="200MB")
        r = {**raw, "model": str(mdir), "compress": {"algorithm": "sparsegpt", "sparsity": 0.5}}
        wall, rss, _ = compress_run(cli, r, select_dir, args.output / f"depth-{layers}")
        res[f"layers_{layers}"] = {"wall_s": round(wall, 1), "peak_rss_mb": round(rss)}
    res["peak_rss_ratio_32_vs_4"] = round(res["layers_32"]["peak_rss_mb"] / res["layers_4"]["peak_rss_mb"], 3)
    return res


def scale_part(args, raw, cli, select_dir, actors: tuple[int, ...] = (1, 2)) -> dict:
    res = {}
    for k in actors:
        r = {**raw, "compress": {"algorithm": "sparsegpt", "sparsity": 0.5},
             "ray": {**raw.get("ray", {}), "compress_actors": k, "cpus_per_actor": 2 // k, "num_cpus": 2}}
        wall, rss, comp = compress_run(cli, r, select_dir, args.output / f"scale-{k}")
        stage = json.loads((args.output / f"scale-{k}" / "state.json").read_text())["stages"]["compress"]["wall_s"]
        t = comp["actor_timings_s"]
        busy = {key: sum(a.get(key, 0.0) for a in t) / k for key in ("stats", "solve", "propagate", "io")}
        other = max(0.0, stage - sum(busy.values()))
        res[f"actors_{k}"] = {"stage_wall_s": stage, "process_wall_s": round(wall, 1),
                              "share": {key: round(v / stage, 3) for key, v in {**busy, "transfer_and_scheduling": other}.items()}}
    res["speedup_2_vs_1"] = (round(res["actors_1"]["stage_wall_s"] / res["actors_2"]["stage_wall_s"], 3)
                             if {"actors_1", "actors_2"} <= set(res) else None)
    return res


def smoke_select(raw: dict, select_dir: Path) -> None:
    """--smoke: a calibration set of random token ids in the model's vocabulary instead of a select run."""
    from _common import absolute_paths
    from _synthetic import write_select_dir

    config = Path(absolute_paths(raw)["model"].removeprefix("random:")) / "config.json"
    vocab = json.loads(config.read_text())["vocab_size"]
    write_select_dir(select_dir, raw["select"]["n_samples"], raw["select"]["seq_len"], vocab)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", type=Path, default=ROOT / "jobs/smollm2-biomed-sparsegpt50.yaml")
    ap.add_argument("--output", type=Path, default=None, help="work folder (default: a new temporary folder)")
    ap.add_argument("--parts", default="peer,depth,scale")
    ap.add_argument("--algorithms", default="wanda,sparsegpt,gptq_w4g64")
    ap.add_argument("--peer-python", type=Path, default=ROOT / ".venv-peer/bin/python")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, one point (the test suite runs it)")
    args = ap.parse_args()
    parts = {"scale"} if args.smoke else set(args.parts.split(","))
    if "peer" in parts and not args.peer_python.exists():
        raise SystemExit(f"{args.peer_python} missing: run `make peer-env` first (or --parts depth,scale)")
    offline()
    from raycompress.config import JobConfig
    from raycompress.models.fetch import resolve_model

    args.output = work_folder(args.output, "bench-compress")
    raw = smoke_job() if args.smoke else job_mapping(args.job)
    job_file = write_job(args.output / "job.yaml", raw)
    job = JobConfig.model_validate(raw)
    cli = str(Path(sys.executable).parent / "raycompress")
    base = args.output / "select-run"
    if args.smoke:
        smoke_select(raw, base / "select")
    elif not (base / "select" / "calibration.parquet").exists():
        run_measured([cli, "select", str(job_file), "--output", str(base)], args.output / "select.log")
    result: dict = {"model": job.model, "calibration": {"n": job.select.n_samples, "seq_len": job.select.seq_len},
                    "work": str(args.output)}
    if "peer" in parts:
        model_dir = resolve_model(job.model, job.base_dir, job.storage.cache_dir).local()
        result["peer"] = peer_part(args, job, raw, cli, model_dir, base / "select")
    if "depth" in parts:
        result["depth"] = depth_part(args, raw, cli, base / "select")
    if "scale" in parts:
        result["scale"] = scale_part(args, raw, cli, base / "select", (1,) if args.smoke else (1, 2))
    if args.smoke:
        result.update(smoke=True, peer=skipped("--smoke: one point only"), depth=skipped("--smoke: one point only"))
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
