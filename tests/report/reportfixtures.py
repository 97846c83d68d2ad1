"""Helpers for report tests: run folders written by hand in the shapes the stages write."""
from __future__ import annotations

import json
import random
from pathlib import Path

from conftest import random_doc, write_tokenizer

TASKS = {  # name: (domain, kind, group, primary, dense value, stderr)
    "wikitext2": ("general", "perplexity", None, "word_perplexity", 28.0, None),
    "biomed_abstracts": ("biomed", "perplexity", None, "word_perplexity", 21.0, None),
    "piqa": ("general", "multiple_choice", None, "acc_norm", 0.66, 0.03),
    "mmlu_anatomy": ("biomed", "multiple_choice", "mmlu_biomed", "acc", 0.40, 0.04),
    "mmlu_virology": ("biomed", "multiple_choice", "mmlu_biomed", "acc", 0.35, 0.05),
}


def _task(name: str, loss: float) -> dict:
    domain, kind, group, primary, value, se = TASKS[name]
    lower = kind == "perplexity"
    v = value * (1 + loss) if lower else value * (1 - loss)
    metrics = {primary: v} if lower or primary == "acc" else {primary: v, "acc": v - 0.01}
    stderr = {} if se is None else {m: se for m in metrics}
    return {"domain": domain, "kind": kind, "group": group, "primary": primary,
            "higher_is_better": {m: not lower for m in metrics}, "metrics": metrics, "stderr": stderr, "n": 100}


def results(loss: float) -> dict:
    """New-shape results.json: dense, and compressed losing `loss` (relative) on every task."""
    out = {}
    for label, l in (("dense", 0.0), ("compressed", loss)):
        tasks = {name: _task(name, l) for name in TASKS}
        acc = (tasks["mmlu_anatomy"]["metrics"]["acc"] + tasks["mmlu_virology"]["metrics"]["acc"]) / 2
        out[label] = {"seconds": 12.5, "tasks": tasks, "groups": {
            "mmlu_biomed": {"domain": "biomed", "members": ["mmlu_anatomy", "mmlu_virology"],
                            "metrics": {"acc": acc}, "stderr": {"acc": 0.03}},
            "domain:general": {"domain": "general", "members": ["wikitext2", "piqa"], "stderr": {},
                               "metrics": {"acc_norm": tasks["piqa"]["metrics"]["acc_norm"],
                                           "word_perplexity": tasks["wikitext2"]["metrics"]["word_perplexity"]}}}}
    return out


def _calibration(out: Path, tokenizer_dir: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = random.Random(1)
    rows = []
    for i, src in enumerate(["biomed"] * 6 + ["general"] * 2):
        ids = tok(random_doc(rng, 80))["input_ids"][:48]
        rows.append({"input_ids": ids, "source": src, "doc_id": f"d{i}", "doc_ids": [f"d{i}"] * (1 + i % 3),
                     "uid": f"u{i}", "score": float(i), "n_concepts": len(set(ids))})
    (out / "select").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "select" / "calibration.parquet")
    # the keys the select stage writes (distributed/select.py `_write_outputs`), none it does not
    manifest = {"fingerprint": "f" * 64, "method": "zipcal", "method_source": "ZipCal", "inputs": [],
                "config": {"select": {"method": "zipcal"}}, "seed": 0, "quotas": {"biomed": 6, "general": 2},
                "usable_documents": {"biomed": 50, "general": 9},
                "skipped": {"biomed": {"a.jsonl": {"malformed_json": 2}}}, "file_errors": {"biomed": {}, "general": {}},
                "selected": [], "calibration_sha256": "c" * 64}
    (out / "select" / "manifest.json").write_text(json.dumps(manifest))


def _compression(sparsity: float) -> dict:
    mods = [{"layer": layer, "module": m, "sparsity": sparsity, "rel_error": 0.01 * (layer + 1), "seconds": 0.1,
             "damping": 0.01} for layer in range(3) for m in ("self_attn.q_proj", "mlp.down_proj")]
    return {"algorithm": "sparsegpt", "config": {"algorithm": "sparsegpt", "sparsity": sparsity}, "modules": mods}


def write_run(out: Path, tokenizer_dir: Path, method: str = "zipcal", sparsity: float = 0.5, loss: float = 0.1) -> Path:
    """A finished run folder: job.json, state.json and every stage's outputs."""
    out.mkdir(parents=True)
    config = {"name": "demo", "model": str(tokenizer_dir), "base_dir": "/somewhere",
              "select": {"method": method, "n_samples": 8}, "compress": {"algorithm": "sparsegpt", "sparsity": sparsity},
              "evaluate": {"tasks": []}, "ray": {"num_cpus": 2}}
    (out / "job.json").write_text(json.dumps(config))
    (out / "state.json").write_text(json.dumps({"stages": {"select": {"wall_s": 1.5, "peak_rss_mb": 300.0},
                                                           "compress": {"wall_s": 9.0, "peak_rss_mb": 900.0}}}))
    _calibration(out, tokenizer_dir)
    (out / "compress").mkdir()
    (out / "compress" / "compression.json").write_text(json.dumps(_compression(sparsity)))
    (out / "evaluate").mkdir()
    (out / "evaluate" / "results.json").write_text(json.dumps(results(loss)))
    return out


def tokenizer_dir(path: Path) -> Path:
    """A model folder with a tiny trained byte-level BPE tokenizer (tokenizer.json) and a config.json
    (what `resolve_model` checks), but no weights: all a report needs to decode calibration tokens."""
    rng = random.Random(0)
    write_tokenizer(path, [random_doc(rng, 60) for _ in range(80)])
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


def upload(folder: Path, location: str) -> str:
    """Copy every file under `folder` to the same relative path under `location` (a URI); returns it."""
    from raycompress.storage import uri

    for p in sorted(folder.rglob("*")):
        if p.is_file():
            uri.copy(str(p), uri.join(location, p.relative_to(folder).as_posix()))
    return location
