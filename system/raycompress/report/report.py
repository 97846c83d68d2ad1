"""Write `report.json` (every metric per model, stage wall seconds and peak memory, calibration
manifest hash, config) and `report.md` (a side-by-side table) from a job folder."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from raycompress.config import JobConfig
from raycompress.models.checkpoint import write_atomic_text


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def build_report(job: JobConfig, out_dir: Path) -> dict:
    results = _load(out_dir / "evaluate" / "results.json")
    manifest_path = out_dir / "select" / "manifest.json"
    compression = _load(out_dir / "compress" / "compression.json")
    mods = compression.get("modules", [])
    errs = [m["rel_error"] for m in mods if m.get("rel_error") is not None]
    return {
        "job": job.name,
        "models": results,
        "stages": _load(out_dir / "state.json").get("stages", {}),
        "calibration": {
            "manifest_sha256": hashlib.sha256(manifest_path.read_bytes()).hexdigest() if manifest_path.is_file() else None,
            "method": _load(manifest_path).get("method"),
            "quotas": _load(manifest_path).get("quotas"),
            "usable_documents": _load(manifest_path).get("usable_documents"),
            "skipped": _load(manifest_path).get("skipped"),
        },
        "compression": {
            "algorithm": compression.get("algorithm"),
            "mean_sparsity": sum(m["sparsity"] for m in mods) / len(mods) if mods else None,
            "mean_rel_error": sum(errs) / len(errs) if errs else None,
            "modules": len(mods),
        },
        "config": job.model_dump(mode="json"),
    }


def _fmt(task: dict) -> str:
    if "perplexity" in task:
        return f"{task['perplexity']:.3f}"
    return f"{task['acc']:.4f} ± {task['acc_stderr']:.4f} / {task['acc_norm']:.4f}"


def render_markdown(report: dict) -> str:
    models = report["models"]
    labels = list(models)
    tasks = [t for t in (models[labels[0]] if labels else {}) if not t.startswith("_")]
    lines = [f"# raycompress report: {report['job']}", "",
             "Perplexity: lower is better. Multiple choice: acc ± stderr / acc_norm.", "",
             "| task | domain | metric | " + " | ".join(labels) + (" | delta |" if len(labels) == 2 else " |"),
             "|---|---|---|" + "---|" * len(labels) + ("---|" if len(labels) == 2 else "")]
    for t in tasks:
        cells = [_fmt(models[l][t]) for l in labels]
        metric = "perplexity" if "perplexity" in models[labels[0]][t] else "acc / acc_norm"
        row = f"| {t} | {models[labels[0]][t]['domain']} | {metric} | " + " | ".join(cells) + " |"
        if len(labels) == 2:
            key = "perplexity" if metric == "perplexity" else "acc"
            row += f" {models[labels[1]][t][key] - models[labels[0]][t][key]:+.4f} |"
        lines.append(row)
    lines += ["", "| stage | wall s | peak RSS MiB |", "|---|---|---|"]
    for name, st in report["stages"].items():
        lines.append(f"| {name} | {st['wall_s']:.1f} | {st['peak_rss_mb']:.0f} |")
    c = report["compression"]
    if c["algorithm"]:
        lines += ["", f"Compression: {c['algorithm']}, {c['modules']} modules, mean sparsity {c['mean_sparsity']:.4f}"
                  + (f", mean relative reconstruction error {c['mean_rel_error']:.4f}" if c["mean_rel_error"] is not None else "")]
    lines += _calibration_lines(report["calibration"])
    return "\n".join(lines)


def _calibration_lines(cal: dict) -> list[str]:
    """Per source: sequences chosen, usable documents, and skipped records by reason (all files)."""
    lines = ["", f"Calibration set ({cal.get('method')}), manifest sha256 {cal['manifest_sha256']}:", "",
             "| source | sequences | usable docs | skipped (reason: count) |", "|---|---|---|---|"]
    for src, n in (cal.get("quotas") or {}).items():
        reasons: dict[str, int] = {}
        for per_file in (cal.get("skipped") or {}).get(src, {}).values():
            for reason, count in per_file.items():
                reasons[reason] = reasons.get(reason, 0) + count
        skipped = ", ".join(f"{r}: {c}" for r, c in sorted(reasons.items())) or "none"
        lines.append(f"| {src} | {n} | {(cal.get('usable_documents') or {}).get(src, '?')} | {skipped} |")
    return lines + [""]


def write_report(job: JobConfig, out_dir: Path) -> list[str]:
    report = build_report(job, out_dir)
    write_atomic_text(out_dir / "report.json", json.dumps(report, indent=2))
    write_atomic_text(out_dir / "report.md", render_markdown(report))
    return ["report.json", "report.md"]
