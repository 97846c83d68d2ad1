"""Benchmark of the select stage; prints ONE JSON line.

    .venv/bin/python jobs/benchmarks/selection.py [--small-mb 20] [--skip-perplexity] [--gb 0] [--output DIR] [--smoke]

The work folder is --output (finished runs there are reused), else a new temporary folder.
--smoke: the smoke job's tiny Llama tokenizer, one ZipCal run of 4 x 32 tokens on the real pool and
two-round coverage at k = 4 on its first 256 documents; the perplexity baseline and synthetic pools are reported as skipped.

- zipcal_docs_per_s, perplexity_docs_per_s, zipcal_speedup: both methods on the same real pool
  (data/corpora/biomed_pubmedqa_pool.jsonl), 2 select actors; docs/s = usable documents / stage
  wall seconds (Ray start-up excluded, as recorded in state.json).
- zipcal_docs_per_s_large: ZipCal on a synthetic pool made by resampling the real paragraphs.
- scaling_2_vs_1_cpu: ZipCal throughput on the 10x pool with a 2-CPU Ray and 2 actors over a
  1-CPU Ray and 1 actor.
- peak_rss_mb_small / _large: peak RSS of the whole process tree (driver, Ray, actors) during the
  select stage on the synthetic pool and on one 10x larger.
- two_round_coverage_ratio: concepts covered by sharded two-round greedy over those covered by
  single-process greedy on the same windows (real biomed + general pools, shards of 256
  documents, k = 16 and 64; the lower of the two).
- gb_pool (with --gb N): select on an N-GB synthetic pool, its wall seconds and peak RSS.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "jobs" / "benchmarks"))
from _common import emit, offline, skipped, smoke_job, work_folder  # noqa: E402

MODEL = "smollm2-135m-instruct"
REAL = [ROOT / "data/corpora/biomed_pubmedqa_pool.jsonl", ROOT / "data/corpora/general_state_union.jsonl"]


def synth_pool(out_dir: Path, megabytes: float, files: int = 16, seed: int = 0) -> Path:
    """JSONL files of documents made by resampling real paragraphs (sentences), ~`megabytes` MB."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / "DONE").exists():
        return out_dir
    rng = random.Random(seed)
    sents = [s.strip() + "." for p in REAL for line in p.read_text().split("\n") if line.strip()
             for s in json.loads(line)["text"].split(". ") if s.strip()]
    target, written, i = megabytes * 1e6, 0, 0
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(open(out_dir / f"part-{j:03d}.jsonl", "w")) for j in range(files)]
        while written < target:
            doc = " ".join(rng.choice(sents) for _ in range(rng.randint(5, 15)))
            line = json.dumps({"id": f"s{i}", "text": doc}) + "\n"
            handles[i % files].write(line)
            written += len(line)
            i += 1
    (out_dir / "DONE").write_text(str(i))
    return out_dir


def run_select(name: str, path: str, method: str, cpus: int, out: Path, n: int = 64, shard_docs: int = 4096,
               model: str = MODEL, seq_len: int = 512) -> dict:
    job = {"name": name, "model": model,
           "select": {"method": method, "n_samples": n, "seq_len": seq_len, "shard_docs": shard_docs,
                      "sources": {"pool": {"path": path}}},
           "compress": {}, "evaluate": {"tasks": []},
           "ray": {"num_cpus": cpus, "select_actors": cpus, "cpus_per_actor": 1}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "job.yaml").write_text(yaml.safe_dump(job))
    if not (out / "run/state.json").exists():  # finished runs are reused (the benchmark resumes)
        with open(out / "log.txt", "w") as log:
            subprocess.run([str(Path(sys.executable).parent / "raycompress"), "select", str(out / "job.yaml"),
                            "--output", str(out / "run")], check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
    stage = json.loads((out / "run/state.json").read_text())["stages"]["select"]
    manifest = json.loads((out / "run/select/manifest.json").read_text())
    docs = sum(manifest["usable_documents"].values())
    return {"docs": docs, "wall_s": stage["wall_s"], "docs_per_s": docs / stage["wall_s"], "peak_rss_mb": stage["peak_rss_mb"]}


def coverage_ratio(model_dir: Path, k: int = 64, shard_docs: int = 256, seq_len: int = 512,
                   max_docs: int | None = None) -> dict:
    """Two-round vs single-process ZipCal coverage on the same windows (no Ray)."""
    from raycompress.registry import SELECTORS
    from raycompress.selection.base import SelectContext
    from raycompress.selection.shard import ShardSelector
    from raycompress.selection.zipcal import coverage

    ctx = SelectContext(seed=0)
    sel = ShardSelector(str(model_dir), seq_len, "zipcal", k, ctx)
    docs = [(i, str(i), json.loads(line)["text"]) for p in REAL for i, line in enumerate(p.read_text().split("\n")) if line.strip()]
    docs = docs[:max_docs]  # --smoke: the first documents only
    shards = [docs[i : i + shard_docs] for i in range(0, len(docs), shard_docs)]
    windows = [w for j, s in enumerate(shards) for w in sel.windows(s, "pool", "p", j)]
    method = SELECTORS.get("zipcal")
    single = method.merge(list(windows), k, ctx)
    winners = []
    for j in range(len(shards)):
        part = [w for w in windows if w.uid.startswith(f"p:{j}:")]
        winners += method.local(part, k, ctx, f"p:{j}")
    two = method.merge(winners, k, ctx)
    c1, c2 = coverage([w.concepts for w in single], list(range(k))), coverage([w.concepts for w in two], list(range(k)))
    return {"windows": len(windows), "shards": len(shards), "single_coverage": c1, "two_round_coverage": c2, "ratio": c2 / c1}


def smoke(work: Path) -> dict:
    """--smoke: one ZipCal run and the two-round coverage at k = 4 on the smoke job's tokenizer."""
    job = smoke_job()
    model = f"random:{(Path(job['base_dir']) / job['model'].removeprefix('random:')).resolve()}"
    z = run_select("zipcal-real", str(REAL[0]), "zipcal", 2, work / "zipcal-real", n=4, shard_docs=128,
                   model=model, seq_len=32)
    cov = coverage_ratio(Path(model.removeprefix("random:")), k=4, shard_docs=64, seq_len=32, max_docs=256)
    return {"smoke": True, "zipcal_docs_per_s": round(z["docs_per_s"], 2), "two_round": {"k4": cov},
            "two_round_coverage_ratio": round(cov["ratio"], 4),
            "perplexity": skipped("--smoke: one point only"), "synthetic": skipped("--smoke: one point only")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", type=Path, default=None, help="work folder (default: a new temporary folder)")
    ap.add_argument("--small-mb", type=float, default=20.0)
    ap.add_argument("--skip-perplexity", action="store_true")
    ap.add_argument("--gb", type=float, default=0.0, help="also select on a synthetic pool of this many GB")
    ap.add_argument("--smoke", action="store_true", help="tiny tokenizer, one run (the test suite runs it)")
    args = ap.parse_args()
    offline()
    o = work_folder(args.output, "bench-select")
    if args.smoke:
        emit({**smoke(o), "work": str(o)})
        return 0
    from raycompress.models.fetch import resolve_model

    model_dir = resolve_model(MODEL).local()
    res: dict = {}
    real = str(REAL[0])
    # the real pool is one file: shards of 128 documents give both actors work
    z = run_select("zipcal-real", real, "zipcal", 2, o / "zipcal-real", n=48, shard_docs=128)
    res["zipcal_docs_per_s"] = round(z["docs_per_s"], 2)
    if not args.skip_perplexity:  # the model-scored baseline, on the same real pool
        p = run_select("ppl-real", real, "perplexity", 2, o / "ppl-real", n=48, shard_docs=128)
        res["perplexity_docs_per_s"] = round(p["docs_per_s"], 3)
        res["zipcal_speedup"] = round(z["docs_per_s"] / p["docs_per_s"], 1)
    small = synth_pool(o / "pool-small", args.small_mb)
    large = synth_pool(o / "pool-large", args.small_mb * 10, seed=1)
    s2 = run_select("small-2cpu", str(small / "*.jsonl"), "zipcal", 2, o / "small-2cpu")
    lg = run_select("large-2cpu", str(large / "*.jsonl"), "zipcal", 2, o / "large-2cpu")
    l1 = run_select("large-1cpu", str(large / "*.jsonl"), "zipcal", 1, o / "large-1cpu")
    res.update({
        "zipcal_docs_per_s_synthetic_large": round(lg["docs_per_s"], 1),
        "synthetic_docs_small": s2["docs"], "synthetic_docs_large": lg["docs"],
        "scaling_2_vs_1_cpu": round(lg["docs_per_s"] / l1["docs_per_s"], 3),
        "peak_rss_mb_small": s2["peak_rss_mb"], "peak_rss_mb_large": lg["peak_rss_mb"],
        "peak_rss_ratio_large_vs_small": round(lg["peak_rss_mb"] / s2["peak_rss_mb"], 3),
        "wall_s_small": s2["wall_s"], "wall_s_large": lg["wall_s"],
    })
    res["two_round"] = {f"k{k}": coverage_ratio(model_dir, k=k) for k in (16, 64)}
    res["two_round_coverage_ratio"] = round(min(r["ratio"] for r in res["two_round"].values()), 4)
    if args.gb:
        g = synth_pool(o / f"pool-{args.gb}gb", args.gb * 1000, files=64, seed=2)
        r = run_select("gb", str(g / "*.jsonl"), "zipcal", 2, o / "gb-run")
        res["gb_pool"] = {"gb": args.gb, **r}
    emit(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
