"""Benchmark of quantization formats: raycompress vs llm-compressor 0.14 `oneshot`, scheme by
scheme, on SmolLM2-135M-Instruct with the same calibration token ids; prints ONE JSON line.

    make model && make peer-env
    .venv/bin/python jobs/benchmarks/formats.py [--schemes W4A16-GPTQ,FP8] [--output DIR]
        [--eval-tokens 8192] [--alpha 0.5] [--n-grid 20] [--smoke]

Steps: one select stage of the default job (`jobs/smollm2-biomed-sparsegpt50.yaml`: ZipCal,
64 x 512 tokens, 3:1 biomedical:general; reused when OUT/select-run holds it), then per scheme
`raycompress compress` (a subprocess) and `_peer_formats.py` in `.venv-peer` on that calibration
Parquet, then both checkpoints scored by OUR evaluator in this process (`evaluate_in_process`:
word perplexity on WikiText-2 and the biomedical abstracts, each capped at --eval-tokens) and
checked (`_format_checks.py`). Schemes (ours | peer):

    W4A16-GPTQ   gptq, scheme W4A16                 | GPTQModifier W4A16
    W4A16-AWQ    awq, scheme W4A16, awq.n_grid      | AWQModifier(duo_scaling=False) + QuantizationModifier W4A16
    W8A8-INT8    gptq, W8A8-INT8, smoothquant.alpha | SmoothQuantModifier(alpha) + GPTQModifier W8A8
    FP8          rtn, FP8                           | QuantizationModifier FP8
    FP8_DYNAMIC  rtn, FP8_DYNAMIC                   | QuantizationModifier FP8_DYNAMIC
    NVFP4        rtn, NVFP4                         | QuantizationModifier NVFP4
    FP8-KV       gptq, W4A16, kv_cache fp8          | GPTQModifier W4A16 + kv_cache_scheme FP8

Per scheme: ppl_ours / ppl_peer ({task: word perplexity}), ppl_ratio (the worse task's ours/peer),
seconds_ours (Σ of compression.json's seconds_per_layer: the layer pipeline, actor start-up and
model skeleton load excluded), seconds_peer (`oneshot` only, model load and save excluded),
wall_ratio (ours / peer), process walls of both, bytes_on_disk and bits_per_weight of both,
loads_in_transformers of both, and eval_matches_stock: the evaluator's logits on a fixed prompt
equal (≤ 1e-4) the stock transformers forward (compressed-tensors' fake-quantized modules), the
evaluator's model loaded by `raycompress.models.load.load_causal_lm`; null with a "why" when the
stock load or forward fails.
A failed run of one side is reported under the scheme's "errors"; nothing is invented.
Results also go to OUT/formats.json. --smoke: the smoke job's random tiny Llama, random-id
calibration (4 x 32), W8A8-INT8 and FP8_DYNAMIC (per-channel: the tiny widths do not divide
into groups of 128), 256 eval tokens; peer fields are null with a reason without `.venv-peer`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "jobs" / "benchmarks"))
from _common import emit, job_mapping, offline, smoke_job, work_folder, write_job  # noqa: E402
from _synthetic import log_tail  # noqa: E402
from peer_llmcompressor import run_measured  # noqa: E402

OURS = {
    "W4A16-GPTQ": {"algorithm": "gptq", "scheme": "W4A16"},
    "W4A16-AWQ": {"algorithm": "awq", "scheme": "W4A16"},
    "W8A8-INT8": {"algorithm": "gptq", "scheme": "W8A8-INT8"},
    "FP8": {"algorithm": "rtn", "scheme": "FP8"},
    "FP8_DYNAMIC": {"algorithm": "rtn", "scheme": "FP8_DYNAMIC"},
    "NVFP4": {"algorithm": "rtn", "scheme": "NVFP4"},
    "FP8-KV": {"algorithm": "gptq", "scheme": "W4A16", "kv_cache": {"type": "fp8"}},
}
SMOKE_SCHEMES = "W8A8-INT8,FP8_DYNAMIC"
PPL_TASKS = ("wikitext2", "biomed_abstracts")
PROMPT = ("Atrial fibrillation is the most common sustained arrhythmia; anticoagulation with warfarin or a "
          "direct oral anticoagulant reduces the risk of stroke in patients with additional risk factors.")


W4 = ("W4A16-GPTQ", "W4A16-AWQ", "FP8-KV")  # the schemes with W4A16 weights


def compress_section(name: str, base: dict, args) -> dict:
    """Our job's `compress:` mapping for scheme `name`, keeping the base job's damping and block size.

    The W4A16 schemes use the preset when --w4-group is 128 (its group size), else the same weights
    through `quant` (int4, symmetric, --w4-group columns per scale, static activation order as the
    peer's GPTQ default) where the config takes `quant` with that algorithm.

    Raises:
        ValueError: the config cannot express W4A16 with --w4-group for this algorithm (the message
            says which field is refused).
    """
    from pydantic import ValidationError

    from raycompress.config import CompressConfig

    sec = {**OURS[name], **{k: base[k] for k in ("damping", "block_size") if k in base}}
    if name == "W4A16-AWQ":
        sec["awq"] = {"n_grid": args.n_grid}
    if name == "W8A8-INT8":
        sec["smoothquant"] = {"alpha": args.alpha}
    if name in W4 and args.w4_group != 128:
        sec.pop("scheme")
        sec["quant"] = {"bits": 4, "group_size": args.w4_group, "act_order": sec["algorithm"] == "gptq"}
    try:
        CompressConfig.model_validate(sec)
    except ValidationError as exc:
        raise ValueError(f"W4A16 with groups of {args.w4_group} (the preset's 128 does not divide this model's "
                         f"widths) is not expressible for {name}: {exc.errors()[0]['msg']}") from exc
    return sec


def job_raw(args) -> dict:
    """The job mapping every run uses: the default (or smoke) job, evaluation = the two perplexity tasks."""
    if args.smoke:
        raw = smoke_job(n_samples=4, seq_len=32, eval_tokens=args.eval_tokens)
        length = {"max_length": 32}
    else:
        raw = job_mapping(args.job)
        raw["select"].update({k: v for k, v in (("n_samples", args.n_samples), ("seq_len", args.seq_len)) if v})
        length = {}
    raw["evaluate"] = {"tasks": [{"name": t, "max_tokens": args.eval_tokens, **length} for t in PPL_TASKS],
                       "include_dense": False}
    return raw


def calibration(args, raw: dict, job_file: Path) -> Path:
    """OUT/select-NxL/select (calibration.parquet + manifest.json): a select run of the job, reused
    when present; --smoke: random ids in the model's vocabulary (no select run)."""
    select_dir = args.output / f"select-{raw['select']['n_samples']}x{raw['select']['seq_len']}" / "select"
    if args.smoke:
        from compression import smoke_select

        smoke_select(raw, select_dir)
    elif not (select_dir / "calibration.parquet").exists():
        cli = str(Path(sys.executable).parent / "raycompress")
        run_measured([cli, "select", str(job_file), "--output", str(select_dir.parent)], args.output / "select.log")
    return select_dir


def run_ours(args, name: str, raw: dict, select_dir: Path) -> dict:
    """Our compress run for `name`: {"dir", "process_wall_s", "seconds", "peak_rss_mb"}."""
    from compression import compress_run

    sec = compress_section(name, raw["compress"], args)
    out = args.output / f"ours-{name}"
    wall, rss, rec = compress_run(args.cli, {**raw, "compress": sec}, select_dir, out)
    spl = rec.get("seconds_per_layer")
    return {"dir": out / "compress" / "model", "process_wall_s": wall, "peak_rss_mb": rss,
            "seconds": sum(spl) if spl else None, "compress": sec}


def run_peer(args, name: str, model_dir: Path, select_dir: Path) -> dict:
    """The peer's run for `name` in .venv-peer: {"dir", "process_wall_s", "seconds", "peak_rss_mb", "recipe"};
    with --reuse-peer, an earlier run's record (OUT/peer-NAME.json, written after its checkpoint) instead."""
    out, record = args.output / f"peer-{name}", args.output / f"peer-{name}.json"
    if args.reuse_peer and record.is_file() and (out / "config.json").is_file():
        return {**json.loads(record.read_text()), "dir": out, "reused": True}
    cmd = ["timeout", "-k", "10", str(args.timeout), str(args.peer_python), str(ROOT / "jobs/benchmarks/_peer_formats.py"), "--model", str(model_dir),
           "--calibration", str(select_dir / "calibration.parquet"), "--format", name, "--alpha", str(args.alpha),
           "--n-grid", str(args.n_grid), "--w4-group", str(args.w4_group), "--output", str(out)]
    text, wall, rss = run_measured(cmd, args.output / f"peer-{name}.log")
    rec = json.loads(text.strip().splitlines()[-1])
    res = {"process_wall_s": wall, "peak_rss_mb": max(rss, rec["peak_rss_mb"]), "seconds": rec["wall_s"],
           "recipe": rec["recipe"]}
    record.write_text(json.dumps(res))
    return {**res, "dir": out}


def evaluator_loader():
    """(load(folder, dtype), its name): the evaluator's loader, `raycompress.models.load.load_causal_lm`."""
    from raycompress.models.load import load_causal_lm

    return load_causal_lm, "raycompress.models.load.load_causal_lm"


def word_ppl(job, folder: Path, tokenizer, loader) -> dict:
    """{task: word perplexity} of `folder` on the job's perplexity tasks, scored in this process."""
    import torch

    from raycompress.evaluation.local import evaluate_in_process
    from raycompress.evaluation.taskfiles import resolve_tasks

    tasks = [t for t in resolve_tasks(job) if t.kind == "perplexity"]
    rec = evaluate_in_process(loader(folder, torch.float32), tokenizer, tasks, job.resolve, job.evaluate.batch_tokens)
    return {name: round(r["metrics"]["word_perplexity"], 4) for name, r in rec["tasks"].items()}


def measure(folder: Path, ctx: dict) -> dict:
    """Perplexities and checkpoint checks of one compressed folder."""
    from _format_checks import bits_per_weight, disk_bytes, stock_and_evaluator

    loader = ctx["loader"][0]
    checks = stock_and_evaluator(folder, loader, ctx["ids"])
    return {"ppl": word_ppl(ctx["job"], folder, ctx["tokenizer"], loader), "bytes": disk_bytes(folder),
            "bits": round(bits_per_weight(folder, ctx["dense"]), 4), "checks": checks}


def measure_cached(run: dict, ctx: dict, eval_tokens: int) -> dict:
    """`measure` of a run's checkpoint; a reused peer run's earlier measurement (DIR.measure.json)
    when it was taken with the same evaluator loader and eval tokens."""
    cache = run["dir"].with_suffix(".measure.json")
    key = {"loader": ctx["loader"][1], "eval_tokens": eval_tokens}
    if run.get("reused") and cache.is_file():
        old = json.loads(cache.read_text())
        if old.get("key") == key:
            return old["measure"]
    m = measure(run["dir"], ctx)
    cache.write_text(json.dumps({"key": key, "measure": m}))
    return m


def _pair(ours: dict | None, peer: dict | None, key: str):
    return {"ours": None if ours is None else ours[key], "peer": None if peer is None else peer[key]}


def _ratio(a, b, digits: int = 4):
    return None if a is None or b is None or not b else round(a / b, digits)


def _eval_match(m: dict | None, loader_name: str) -> dict:
    """eval_matches_stock of one checkpoint: null with "why" when either forward could not run."""
    if m is None:
        return {"value": None, "why": "no checkpoint"}
    c = m["checks"]
    base = {"logits_max_abs_diff": c["logits_max_abs_diff"], "loader": loader_name}
    if c["logits_equal"] is None:
        return {"value": None, "why": c.get("why"), **base}
    return {"value": c["logits_equal"], **base}


def scheme_record(name: str, runs: dict, meas: dict, errors: list[str], loader_name: str, peer_why: str | None) -> dict:
    """The JSON record of one scheme from its runs and measurements (either side may be None)."""
    o, p = runs.get("ours"), runs.get("peer")
    mo, mp = meas.get("ours"), meas.get("peer")
    ppl_o, ppl_p = (mo or {}).get("ppl"), (mp or {}).get("ppl")
    ratios = [ppl_o[t] / ppl_p[t] for t in ppl_o] if ppl_o and ppl_p else []
    rec = {
        "ppl_ours": ppl_o, "ppl_peer": ppl_p, "ppl_ratio": round(max(ratios), 4) if ratios else None,
        "seconds_ours": None if o is None else round(o["seconds"], 2) if o["seconds"] is not None else None,
        "seconds_peer": None if p is None else round(p["seconds"], 2),
        "process_wall_s": {k: None if r is None else round(r["process_wall_s"], 1) for k, r in (("ours", o), ("peer", p))},
        "peak_rss_mb": {k: None if r is None else round(r["peak_rss_mb"]) for k, r in (("ours", o), ("peer", p))},
        "bytes_on_disk": _pair(mo, mp, "bytes"), "bits_per_weight": _pair(mo, mp, "bits"),
        "loads_in_transformers": {k: None if m is None else m["checks"]["loads_in_transformers"]
                                  for k, m in (("ours", mo), ("peer", mp))},
        "eval_matches_stock": {"ours": _eval_match(mo, loader_name), "peer": _eval_match(mp, loader_name)},
        "ours_compress": None if o is None else o["compress"], "peer_recipe": None if p is None else p["recipe"],
        "peer_reused": bool(p and p.get("reused")),
    }
    rec["wall_ratio"] = _ratio(o and o["seconds"], p and p["seconds"], 3)
    bad = {k: m["checks"] for k, m in (("ours", mo), ("peer", mp)) if m and not m["checks"]["loads_in_transformers"]}
    if bad:
        rec["loading_problems"] = {k: {kk: v for kk, v in c.items() if kk in ("error", "loading_info")} for k, c in bad.items()}
    if peer_why:
        rec["peer_skipped"] = peer_why
    if errors:
        rec["errors"] = errors
    return rec


def one_scheme(args, name: str, raw: dict, select_dir: Path, ctx: dict) -> dict:
    """Run both sides for `name`, measure each checkpoint; a failure is recorded, not raised."""
    runs, meas, errors = {}, {}, []
    sides = [("ours", lambda: run_ours(args, name, raw, select_dir))] if "ours" in args.sides else []
    if ctx["peer_why"] is None and "peer" in args.sides:
        sides.append(("peer", lambda: run_peer(args, name, ctx["model_dir"], select_dir)))
    for side, run in sides:
        try:
            runs[side] = run()
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            log = args.output / (f"ours-{name}/log.txt" if side == "ours" else f"peer-{name}.log")
            errors.append(f"{side} compress: {str(exc)[:300]}\n{log_tail(log, 4)}")
            continue
        try:
            meas[side] = measure_cached(runs[side], ctx, args.eval_tokens)
        except Exception as exc:  # noqa: BLE001 - one checkpoint's failure must not hide the others
            errors.append(f"{side} measure: {type(exc).__name__}: {str(exc)[:600]}")
    return scheme_record(name, runs, meas, errors, ctx["loader"][1], ctx["peer_why"])


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", type=Path, default=ROOT / "jobs/smollm2-biomed-sparsegpt50.yaml")
    ap.add_argument("--output", type=Path, default=None, help="work folder (default: a new temporary folder)")
    ap.add_argument("--schemes", default=",".join(OURS), help=f"comma list of {', '.join(OURS)}")
    ap.add_argument("--eval-tokens", type=int, default=8192, help="tokens scored per perplexity task")
    ap.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant α (W8A8-INT8, both sides)")
    ap.add_argument("--n-grid", type=int, default=20, help="AWQ grid points (W4A16-AWQ, both sides)")
    ap.add_argument("--w4-group", type=int, default=64,
                    help="columns per scale of the W4A16 schemes, both sides (the preset's 128 does not divide "
                    "SmolLM2-135M's width 576: 128 uses the preset by name)")
    ap.add_argument("--n-samples", type=int, default=None, help="calibration sequences (default: the job's, 64)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per calibration sequence (default: the job's, 512)")
    ap.add_argument("--sides", default="ours,peer", help="which sides run: ours, peer or both")
    ap.add_argument("--timeout", type=int, default=1500, help="seconds one peer run may take (then exit 124)")
    ap.add_argument("--reuse-peer", action="store_true",
                    help="reuse peer checkpoints of an earlier run in --output (same calibration and flags)")
    ap.add_argument("--peer-python", type=Path, default=ROOT / ".venv-peer/bin/python")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, 2 schemes (the test suite runs it)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.eval_tokens = min(a.eval_tokens, 256)
        if a.schemes == ",".join(OURS):
            a.schemes = SMOKE_SCHEMES
    a.schemes = a.schemes.split(",")
    unknown = [s for s in a.schemes if s not in OURS]
    if unknown:
        ap.error(f"--schemes: unknown {unknown}; choose from {', '.join(OURS)}")
    return a


def main(argv: list[str] | None = None) -> int:
    """Select once, run and measure every scheme, print and write the JSON."""
    args = _args(argv)
    offline()
    from transformers import AutoTokenizer

    from _format_checks import prompt_ids
    from raycompress.config import JobConfig
    from raycompress.models.fetch import resolve_model

    t0 = time.perf_counter()
    args.output = work_folder(args.output, "bench-formats")
    args.cli = str(Path(sys.executable).parent / "raycompress")
    raw = job_raw(args)
    job_file = write_job(args.output / "job.yaml", raw)
    job = JobConfig.model_validate(raw)
    model_dir = Path(resolve_model(job.model, job.base_dir, job.storage.cache_dir).local())
    select_dir = calibration(args, raw, job_file)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    peer_why = None if args.peer_python.exists() else f"{args.peer_python} missing: llm-compressor runs there (make peer-env)"
    ctx = {"job": job, "tokenizer": tokenizer, "dense": model_dir, "model_dir": model_dir, "peer_why": peer_why,
           "loader": evaluator_loader(), "ids": prompt_ids(tokenizer, PROMPT, 32 if args.smoke else 64)}
    result = {"model": job.model, "sides": args.sides, "calibration": {"n": job.select.n_samples, "seq_len": job.select.seq_len,
                                                  "parquet": str(select_dir / "calibration.parquet")},
              "eval_tokens_per_task": args.eval_tokens, "w4a16_group_size": args.w4_group, "evaluator_loader": ctx["loader"][1],
              "seconds_measure": {"ours": "sum of compression.json seconds_per_layer (actor start-up and model "
                                  "skeleton load excluded)", "peer": "oneshot() wall (model load and save excluded)"},
              "schemes": {}}
    for name in args.schemes:  # the file is rewritten after each scheme, so a cut-short run leaves its part
        result["schemes"][name] = one_scheme(args, name, raw, select_dir, ctx)
        (args.output / "formats.json").write_text(json.dumps({**result, "partial": True}, indent=2))
    from _format_checks import bits_per_weight, disk_bytes

    result["dense"] = {"ppl": word_ppl(job, model_dir, tokenizer, ctx["loader"][0]), "bytes_on_disk": disk_bytes(model_dir),
                       "bits_per_weight": round(bits_per_weight(model_dir, model_dir), 4)}
    result.update(work=str(args.output), total_wall_s=round(time.perf_counter() - t0, 1), smoke=args.smoke, partial=False)
    (args.output / "formats.json").write_text(json.dumps(result, indent=2))
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
