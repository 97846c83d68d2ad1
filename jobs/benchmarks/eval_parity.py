"""Evaluation parity: our Ray eval pool against lm-evaluation-harness on the same local files.

    .venv/bin/python jobs/benchmarks/eval_parity.py [--piqa 200] [--pubmedqa 100] [--wikitext-docs 3]
        [--mmlu-subject anatomy --mmlu 20] [--output DIR] [--smoke]

Needs lm-eval in `.venv-peer` (infra/install-peer.sh). Both sides score SmolLM2-135M-Instruct
(float32, CPU) on PIQA, PubMedQA and WikiText-2 with the same caps (the first N items or
articles); the WikiText articles are cut from our raw dump by our reader and handed to lm-eval as
a JSONL of pages, so both score the same documents. lm-eval runs its own prompts, rolling windows
and metrics (`_lm_eval_peer.py`); ours runs the shipped task files through `evaluate_models`.
Each task is timed on its own on each side, model loading included. The work folder (the
WikiText pages, lm-eval's log) is --output, else a temporary folder removed at the end.
--smoke: `jobs/smoke.yaml`'s random tiny Llama, 4 PIQA and 4 PubMedQA items, 1 article, 1 actor;
without `.venv-peer` it prints {"skipped": ...} naming what is missing (lm-eval lives there).

Prints ONE JSON line: per task and metric, ours, lm-eval's, the difference (ours - lm-eval) and
the relative difference, and each side's wall seconds; `aims` says whether accuracies agree
within 0.002, perplexities within 0.5 %, and our wall time is below lm-eval's.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "jobs" / "benchmarks"))
from _common import emit, skipped, smoke_job  # noqa: E402
MODEL = Path(os.environ.get("RAYCOMPRESS_CACHE_DIR") or "/tmp/raycompress/cache") / "models" / "smollm2-135m-instruct"  # `make model`
TASK_FILES = {"piqa": "data/eval/general_piqa_valid.jsonl", "pubmedqa": "data/eval/biomed_pubmedqa_test.jsonl"}


def write_pages(n: int, out: Path) -> Path:
    """The first `n` WikiText-2 test articles as lm-eval's wikitext documents ({"page": ...})."""
    from raycompress.evaluation.formats import read_wikitext

    pages = read_wikitext(ROOT / "data/eval/general_wikitext2_raw_test.txt")[:n]
    out.write_text("".join(json.dumps(p) + "\n" for p in pages), encoding="utf-8")
    return out


def run_lm_eval(args, pages: Path, workdir: Path) -> dict:
    cmd = [str(ROOT / args.peer_python), str(ROOT / "jobs/benchmarks/_lm_eval_peer.py"), "--model", str(args.model),
           "--workdir", str(workdir), "--wikitext-pages", str(pages), "--batch-size", str(args.lm_eval_batch_size),
           "--limit", f"piqa={args.piqa}", "--limit", f"pubmedqa={args.pubmedqa}"]
    cmd += [x for task, path in TASK_FILES.items() for x in (f"--{task}", str(ROOT / path))]
    if args.mmlu_subject:
        cmd += ["--mmlu-dir", str(ROOT / "data/eval/mmlu"), "--mmlu-subject", args.mmlu_subject,
                "--limit", f"mmlu_{args.mmlu_subject}={args.mmlu}"]
    with open(workdir / "lm_eval.log", "w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"lm-eval peer failed ({proc.returncode}); see {workdir / 'lm_eval.log'}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_ours(args, pages: Path) -> tuple[dict, float]:
    """Per task: (our task record, wall seconds); and Ray's start-up seconds."""
    import ray

    from raycompress.config import JobConfig
    from raycompress.distributed.evaluate import evaluate_models

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}})
    init_s = time.perf_counter() - t0
    entries = {"piqa": {"name": "piqa", "limit": args.piqa}, "pubmedqa": {"name": "pubmedqa", "limit": args.pubmedqa},
               "wikitext2": {"name": "wikitext2", "path": str(pages), "format": "jsonl"}}
    if args.mmlu_subject:
        entries[f"mmlu_{args.mmlu_subject}"] = {"name": f"mmlu_{args.mmlu_subject}", "limit": args.mmlu}
    out = {}
    for task, entry in entries.items():
        job = JobConfig.model_validate({
            "model": str(args.model), "select": {"sources": {"x": {"path": "unused"}}}, "compress": {},
            "evaluate": {"tasks": [entry], "batch_tokens": args.batch_tokens},
            "ray": {"eval_actors": args.actors, "cpus_per_actor": args.cpus / args.actors},
            "base_dir": str(ROOT / "jobs")})  # where job files live: relative paths as in any job file
        t = time.perf_counter()
        res = evaluate_models(job, {"dense": args.model})["dense"]
        out[task] = (res["tasks"][task], time.perf_counter() - t)
    ray.shutdown()
    return out, init_s


def compare(ours: dict, peer: dict) -> dict:
    """Per task: metrics side by side, and each side's wall seconds."""
    table = {}
    for task, (rec, wall) in ours.items():
        theirs = peer[task]
        rows = {}
        for m, v in theirs["metrics"].items():
            if m in rec["metrics"]:
                mine = rec["metrics"][m]
                rows[m] = {"ours": mine, "lm_eval": v, "diff": mine - v, "rel_diff": (mine - v) / v if v else None}
        table[task] = {"n": rec["n"], "lm_eval_n": theirs["n"], "metrics": rows,
                       "ours_s": round(wall, 2), "lm_eval_s": round(theirs["wall_s"], 2)}
    return table


def aims(table: dict) -> dict:
    acc_ok = all(abs(r["diff"]) <= 0.002 for t in table.values() for m, r in t["metrics"].items() if m.startswith("acc"))
    ppl_ok = all(abs(r["rel_diff"]) <= 0.005 for t in table.values() for m, r in t["metrics"].items()
                 if "perplexity" in m or m == "bits_per_byte")
    faster = all(t["ours_s"] < t["lm_eval_s"] for t in table.values())
    return {"acc_within_0.002": acc_ok, "ppl_within_0.5pct": ppl_ok, "ours_faster_every_task": faster}


def smoke_model(args) -> None:
    """--smoke: the smoke job's random tiny Llama (built once in the cache) and the fewest items."""
    from raycompress.models.fetch import resolve_model

    job = smoke_job()
    args.model = Path(resolve_model(job["model"], job["base_dir"]).local())
    args.piqa, args.pubmedqa, args.wikitext_docs, args.actors, args.mmlu_subject = 4, 4, 1, 1, None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--piqa", type=int, default=200, help="PIQA items (first N)")
    ap.add_argument("--pubmedqa", type=int, default=100, help="PubMedQA items (first N)")
    ap.add_argument("--wikitext-docs", type=int, default=3, help="WikiText-2 test articles (first N)")
    ap.add_argument("--mmlu-subject", help="also one MMLU subject, 5-shot (e.g. anatomy); off by default")
    ap.add_argument("--mmlu", type=int, default=20, help="MMLU test questions (first N)")
    ap.add_argument("--actors", type=int, default=2, help="our eval actors")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs for our local Ray")
    ap.add_argument("--batch-tokens", type=int, default=1024, help="our tokens per forward batch")
    ap.add_argument("--lm-eval-batch-size", default="8")
    ap.add_argument("--peer-python", default=".venv-peer/bin/python")
    ap.add_argument("--lm-eval-results", type=Path, help="reuse the lm-eval side saved by an earlier run "
                    "(written there when missing); the caps must match")
    ap.add_argument("--output", type=Path, default=None, help="work folder (default: a temporary folder)")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, a few items (the test suite runs it)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.smoke:
        if not (ROOT / args.peer_python).exists():
            emit(skipped(f"{ROOT / args.peer_python} missing: lm-eval runs there (make peer-env)", smoke=True))
            return 0
        smoke_model(args)
    with tempfile.TemporaryDirectory(prefix="eval-parity-") as tmp:
        if args.output:
            tmp = str(args.output)
            args.output.mkdir(parents=True, exist_ok=True)
        pages = write_pages(args.wikitext_docs, Path(tmp) / "wikitext_pages.jsonl")
        saved = args.lm_eval_results
        peer = json.loads(saved.read_text()) if saved and saved.is_file() else run_lm_eval(args, pages, Path(tmp))
        if saved and not saved.is_file():
            saved.write_text(json.dumps(peer))
        ours, init_s = run_ours(args, pages)
    table = compare(ours, peer)
    caps = {"piqa": args.piqa, "pubmedqa": args.pubmedqa, "wikitext_docs": args.wikitext_docs,
            **({f"mmlu_{args.mmlu_subject}": args.mmlu} if args.mmlu_subject else {})}
    emit({"model": str(args.model), "smoke": args.smoke, "caps": caps,
          "ours": {"actors": args.actors, "cpus": args.cpus, "ray_init_s": round(init_s, 2)},
          "lm_eval": {"batch_size": args.lm_eval_batch_size}, "tasks": table, "aims": aims(table)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
