"""Reports of one job folder: build `report.json` and write it with `report.md` and `report.html`.

`build_report` reads what the stages wrote (evaluate/results.json, compress/compression.json,
select/manifest.json + calibration.parquet, state.json) and the job config saved in the folder
(`job.json` / `job.yaml`, else the config recorded in an earlier report.json); the renderers in
`markdown.py` and `html.py` only format that dict.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from raycompress.models.checkpoint import write_atomic_text
from raycompress.report.calibration import calibration_summary
from raycompress.report.results import comparisons, normalize_results

log = logging.getLogger(__name__)

JOB_FILES = ("job.json", "job.yaml", "job.yml")


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def load_run_config(out_dir: Path) -> dict:
    """The job config of a run folder as a plain dict ({} when none was saved).

    Looks for job.json, job.yaml / job.yml, then the `config` of an existing report.json.
    """
    import yaml

    for name in JOB_FILES:
        path = out_dir / name
        if path.is_file():
            return (json.loads(path.read_text()) if name.endswith(".json") else yaml.safe_load(path.read_text())) or {}
    return _load(out_dir / "report.json").get("config") or {}


def layer_summary(modules: list[dict]) -> list[dict]:
    """Per decoder layer: mean sparsity over its modules and each module's sparsity and rel_error."""
    layers: dict[int, dict] = {}
    for m in modules:
        lay = layers.setdefault(int(m["layer"]), {"layer": int(m["layer"]), "modules": {}})
        lay["modules"][m["module"]] = {"sparsity": m.get("sparsity"), "rel_error": m.get("rel_error")}
    for lay in layers.values():
        vals = [v["sparsity"] for v in lay["modules"].values() if v["sparsity"] is not None]
        lay["sparsity"] = sum(vals) / len(vals) if vals else 0.0
    return [layers[k] for k in sorted(layers)]


def compression_summary(compression: dict) -> dict:
    """Algorithm, recipe, mean sparsity and reconstruction error, and the per-layer table."""
    mods = compression.get("modules", [])
    errs = [m["rel_error"] for m in mods if m.get("rel_error") is not None]
    return {
        "algorithm": compression.get("algorithm"),
        "recipe": compression.get("config"),
        "mean_sparsity": sum(m["sparsity"] for m in mods) / len(mods) if mods else None,
        "mean_rel_error": sum(errs) / len(errs) if errs else None,
        "modules": len(mods),
        "layers": layer_summary(mods),
    }


def build_report(out_dir: Path, config: dict | None = None) -> dict:
    """The report dict of a job folder; `config` defaults to the one saved in the folder.

    Raises:
        ValueError: evaluate/results.json has a task in neither the current nor the old shape.
    """
    out_dir = Path(out_dir)
    config = config if config is not None else load_run_config(out_dir)
    models = normalize_results(_load(out_dir / "evaluate" / "results.json"))
    return {
        "job": config.get("name") or out_dir.name,
        "run_dir": str(out_dir),
        "models": models,
        "comparisons": comparisons(models),
        "stages": _load(out_dir / "state.json").get("stages", {}),
        "calibration": calibration_summary(out_dir, config),
        "compression": compression_summary(_load(out_dir / "compress" / "compression.json")),
        "config": config,
    }


# stage outputs a report can be built from (a run not yet evaluated still shows compression and calibration)
STAGE_OUTPUTS = ("evaluate/results.json", "compress/compression.json", "select/manifest.json")


def load_report(out_dir: Path) -> dict:
    """A run's report: rebuilt from its stage outputs when they are there, else its report.json.

    Raises:
        FileNotFoundError: the folder has none of the stage outputs nor report.json.
    """
    out_dir = Path(out_dir)
    if (out_dir / "report.json").is_file() and not (out_dir / STAGE_OUTPUTS[0]).is_file():
        report = json.loads((out_dir / "report.json").read_text())
        report["models"] = normalize_results(report.get("models") or {})
        report["comparisons"] = comparisons(report["models"])
        return report
    if any((out_dir / p).is_file() for p in STAGE_OUTPUTS):
        return build_report(out_dir)
    raise FileNotFoundError(f"{out_dir}: none of {', '.join(STAGE_OUTPUTS)} nor report.json: not a run folder "
                            "(run `raycompress run JOB.yaml --output DIR` first)")


def write_report_files(out_dir: Path, report: dict) -> list[str]:
    """Write report.json, report.md and report.html of `report` into `out_dir`; returns their names."""
    from raycompress.report.html import render_html
    from raycompress.report.markdown import render_markdown

    write_atomic_text(out_dir / "report.json", json.dumps(report, indent=2))
    write_atomic_text(out_dir / "report.md", render_markdown(report))
    write_atomic_text(out_dir / "report.html", render_html(report))
    log.info("report written to %s (report.json, report.md, report.html)", out_dir)
    return ["report.json", "report.md", "report.html"]


def write_report(job, out_dir: Path) -> list[str]:
    """Build and write the report of `out_dir` (the orchestrator's report stage).

    `job` is the validated JobConfig, or None to use the config saved in the folder.
    """
    out_dir = Path(out_dir)
    return write_report_files(out_dir, build_report(out_dir, job.model_dump(mode="json") if job is not None else None))
