"""Reports of one job folder: build `report.json` and write it with `report.md` and `report.html`.

`build_report` reads what the stages wrote (evaluate/results.json, compress/compression.json,
select/manifest.json + calibration.parquet, state.json) and the job config saved in the folder
(`job.json` / `job.yaml`, else the config recorded in an earlier report.json); the renderers in
`markdown.py` and `html.py` only format that dict.

A run folder is a location: a local path or a URI (s3://, gs://, hdfs://, file://); every file is
read and written through `storage.uri`, so `raycompress report s3://bucket/run` works from any
machine that can reach the bucket. A `Path` is accepted wherever a location is.
"""
from __future__ import annotations

import json
import logging
import os

from raycompress.report.calibration import calibration_summary
from raycompress.report.results import comparisons, normalize_results
from raycompress.storage import uri

log = logging.getLogger(__name__)

JOB_FILES = ("job.json", "job.yaml", "job.yml")


def _load(location: str) -> dict:
    """The JSON object at `location`, {} when there is no file (raises ValueError if it is not JSON)."""
    return json.loads(uri.read_text(location)) if uri.is_file(location) else {}


def load_run_config(out_dir: str | os.PathLike) -> dict:
    """The job config of a run folder as a plain dict ({} when none was saved).

    Looks for job.json, job.yaml / job.yml, then the `config` of an existing report.json.

    Raises:
        ValueError: the file found is not valid JSON / YAML.
    """
    import yaml

    for name in JOB_FILES:
        location = uri.join(out_dir, name)
        if uri.is_file(location):
            text = uri.read_text(location)
            return (json.loads(text) if name.endswith(".json") else yaml.safe_load(text)) or {}
    return _load(uri.join(out_dir, "report.json")).get("config") or {}


def layer_summary(modules: list[dict]) -> list[dict]:
    """Per decoder layer: mean sparsity over its modules and each module's sparsity and rel_error.
    A mixture of experts' routed-expert linears (records with "expert") are summarised per role,
    e.g. "mlp.experts.*.down": the means over the layer's experts."""
    layers: dict[int, dict] = {}
    for m in modules:
        lay = layers.setdefault(int(m["layer"]), {"layer": int(m["layer"]), "modules": {}, "_n": {}})
        name = m["module"]
        if m.get("expert") is not None:
            head, _, role = name.rpartition(".")
            name = f"{head.rpartition('.')[0]}.*.{role}"
        cur, n = lay["modules"].get(name), lay["_n"].get(name, 0)
        new = {"sparsity": m.get("sparsity"), "rel_error": m.get("rel_error")}
        lay["modules"][name] = new if cur is None else {k: _mean(cur[k], new[k], n) for k in new}
        lay["_n"][name] = n + 1
    for lay in layers.values():
        del lay["_n"]
        vals = [v["sparsity"] for v in lay["modules"].values() if v["sparsity"] is not None]
        lay["sparsity"] = sum(vals) / len(vals) if vals else 0.0
    return [layers[k] for k in sorted(layers)]


def _mean(acc: float | None, x: float | None, n: int) -> float | None:
    """Running mean of n values `acc` with one more value `x` (None values are skipped)."""
    if x is None or acc is None:
        return acc if x is None else x
    return (acc * n + x) / (n + 1)


def fallback_lines(experts: dict) -> list[str]:
    """One line on the routed tokens per expert, then one per expert that fell back, with why."""
    tokens = [t for row in experts.get("tokens") or [] for t in row]
    head = (f"Mixture of experts: {len(tokens)} (layer, expert) pairs, routed calibration tokens per expert "
            f"min {min(tokens)}, max {max(tokens)}; {len(experts.get('fallbacks') or [])} fell back.") if tokens else ""
    return ([head] if head else []) + [
        f"Layer {f['layer']} expert {f['expert']}: {_routed(experts, f)} routed tokens, solved with "
        f"{f.get('method')} ({f.get('reason')})." for f in experts.get("fallbacks") or []]


def _routed(experts: dict, f: dict) -> int:
    return experts["tokens"][experts["layers"].index(f["layer"])][f["expert"]]


def expert_summary(modules: list[dict]) -> dict | None:
    """A mixture of experts' routed tokens per layer x expert (from the gate/up records, which every
    expert has) and every expert that fell back to a data-free method, with why; None without
    expert records (a dense model, or a data-free method that counts no tokens)."""
    recs = [m for m in modules if m.get("expert") is not None and "tokens" in m]
    if not recs:
        return None
    layers = sorted({int(m["layer"]) for m in recs})
    n_exp = 1 + max(int(m["expert"]) for m in recs)
    tokens = [[0] * n_exp for _ in layers]
    fallbacks = {}
    for m in recs:
        tokens[layers.index(int(m["layer"]))][int(m["expert"])] = int(m["tokens"])
        if m.get("fallback"):
            fallbacks[(int(m["layer"]), int(m["expert"]))] = {"layer": int(m["layer"]), "expert": int(m["expert"]),
                                                              **m["fallback"]}
    flat = [t for row in tokens for t in row]
    return {"layers": layers, "tokens": tokens, "tokens_min": min(flat), "tokens_max": max(flat),
            "fallbacks": [fallbacks[k] for k in sorted(fallbacks)]}


# What compression.json's per-module `rel_error` measures, by algorithm (engine/worker.py divides
# the OBS sweep's loss by the outputs' squared norm; engine/solvers.py `_cus_prun` sums impacts).
# Magnitude and Wanda record none.
_OBS_ERROR = {
    "name": "relative reconstruction error", "unit": "‖ΔWX‖²/‖WX‖²",
    "definition": "‖WX − ŴX‖² / ‖WX‖² of each linear on the calibration inputs X, from the OBS sweep's error "
                  "tr(ΔW H_λ ΔWᵀ) with H = XXᵀ damped by compress.damping · mean(diag H) (so at or slightly "
                  "above the undamped value)"}
_CUS_PRUN_SHARE = {
    "name": "pruned share of neuron impact", "unit": "Σ pruned / Σ all impacts",
    "definition": "Cus-Prun, per FFN: the sum over the pruned neurons of the impact E[a_i²]·‖W_down[:, i]‖² "
                  "divided by the sum over all neurons, averaged over the dimensions (a: the down projection's "
                  "input, E: mean over a dimension's calibration tokens). The cross-neuron terms "
                  "E[a_i a_j]·W_down[:, i]ᵀW_down[:, j] are left out, so this is not ‖ΔWX‖²/‖WX‖² of the down "
                  "projection; the two are equal only when different neurons' activations are uncorrelated"}
_RTN_ERROR = {
    "name": "relative reconstruction error", "unit": "‖ΔWX‖²/‖WX‖²",
    "definition": "AWQ then round to nearest: ‖WX − ŴX‖² / ‖WX‖² of each linear on the calibration inputs X "
                  "(tr(ΔW H ΔWᵀ) with the undamped H = XXᵀ, in the smoothed space where AWQ scaled the group)"}
REL_ERROR_MEASURES = {"sparsegpt": _OBS_ERROR, "gptq": _OBS_ERROR, "awq": _RTN_ERROR, "cus_prun": _CUS_PRUN_SHARE}
PRUNED_NOT_SERVED = ("The zeros of a pruned checkpoint are not used by the serving engine: vLLM no longer "
                     "accelerates 2:4 or unstructured sparsity (vllm-project/vllm#36799), so it serves at dense "
                     "memory and speed; a quantized scheme is what makes it smaller and faster.")


def serving_note(recipe: dict | None, mean_sparsity: float | None) -> str:
    """What the checkpoint is to a serving engine: its quantization scheme, and whether its
    sparsity buys anything there (it does not, see `PRUNED_NOT_SERVED`)."""
    recipe = recipe or {}
    parts = []
    if recipe.get("scheme") or recipe.get("quant"):
        scheme = recipe.get("scheme") or f"W{recipe['quant'].get('bits')}A16 (integer, from compress.quant)"
        parts.append(f"Quantization scheme {scheme}" + (", FP8 KV cache" if recipe.get("kv_cache") else "")
                     + (f", SmoothQuant α={recipe['smoothquant'].get('alpha')}" if recipe.get("smoothquant") else "")
                     + ", written as compressed-tensors (loads in transformers and vLLM).")
    if mean_sparsity and mean_sparsity > 0.01 and recipe.get("algorithm") != "cus_prun":
        parts.append(PRUNED_NOT_SERVED)
    return " ".join(parts)


def compression_summary(compression: dict) -> dict:
    """Algorithm, recipe, mean sparsity and `rel_error`, what that error measures for the algorithm
    (`rel_error_measure`: {"name", "unit", "definition"} from `REL_ERROR_MEASURES`, None when no
    module has one), and the per-layer table."""
    mods = compression.get("modules", [])
    errs = [m["rel_error"] for m in mods if m.get("rel_error") is not None]
    return {
        "algorithm": compression.get("algorithm"),
        "recipe": compression.get("config"),
        "mean_sparsity": sum(m["sparsity"] for m in mods) / len(mods) if mods else None,
        "mean_rel_error": sum(errs) / len(errs) if errs else None,
        "rel_error_measure": rel_error_measure(compression.get("algorithm")) if errs else None,
        "modules": len(mods),
        "layers": layer_summary(mods),
        "experts": expert_summary(mods),
        "serving": serving_note(compression.get("config"), sum(m["sparsity"] for m in mods) / len(mods) if mods else None),
    }


def rel_error_measure(algorithm: str | None) -> dict:
    """{"name", "unit", "definition"} of `rel_error` for `algorithm`; for an algorithm not in
    `REL_ERROR_MEASURES` (a plugin), a generic entry that says the measure is not known here."""
    return REL_ERROR_MEASURES.get(algorithm or "", {
        "name": "reported error", "unit": f"as defined by {algorithm}",
        "definition": f"the `rel_error` that algorithm {algorithm!r} records; its measure is not known to the report"})


def build_report(out_dir: str | os.PathLike, config: dict | None = None) -> dict:
    """The report dict of a job folder (a location); `config` defaults to the one saved in it.
    `run_dir` is the location without its URI query (`uri.display`).

    Raises:
        ValueError: evaluate/results.json has a task in neither the current nor the old shape,
            or a stage output is not valid JSON.
    """
    out_dir = str(out_dir)
    config = config if config is not None else load_run_config(out_dir)
    models = normalize_results(_load(uri.join(out_dir, "evaluate", "results.json")))
    return {
        "job": config.get("name") or uri.name(out_dir),
        "run_dir": uri.display(out_dir),
        "models": models,
        "comparisons": comparisons(models),
        "stages": {name: {k: v for k, v in rec.items() if k != "inputs"}  # inputs: the resume check's record
                   for name, rec in _load(uri.join(out_dir, "state.json")).get("stages", {}).items()},
        "calibration": calibration_summary(out_dir, config),
        "compression": compression_summary(_load(uri.join(out_dir, "compress", "compression.json"))),
        "training": _load(uri.join(out_dir, "train", "summary.json")),
        "config": config,
    }


# stage outputs a report can be built from (a run not yet evaluated still shows compression and calibration)
STAGE_OUTPUTS = ("evaluate/results.json", "compress/compression.json", "select/manifest.json")


def load_report(out_dir: str | os.PathLike) -> dict:
    """A run's report: rebuilt from its stage outputs when they are there, else its report.json.

    Raises:
        FileNotFoundError: the folder has none of the stage outputs nor report.json.
        ValueError: a stage output or report.json is not valid JSON.
    """
    out_dir = str(out_dir)
    present = {p for p in ("report.json", *STAGE_OUTPUTS) if uri.is_file(uri.join(out_dir, p))}
    if "report.json" in present and STAGE_OUTPUTS[0] not in present:
        report = json.loads(uri.read_text(uri.join(out_dir, "report.json")))
        report["models"] = normalize_results(report.get("models") or {})
        report["comparisons"] = comparisons(report["models"])
        return report
    if present & set(STAGE_OUTPUTS):
        return build_report(out_dir)
    raise FileNotFoundError(f"{uri.display(out_dir)}: none of {', '.join(STAGE_OUTPUTS)} nor report.json: not a "
                            "run folder (run `raycompress run JOB.yaml --output DIR` first)")


def write_report_files(out_dir: str | os.PathLike, report: dict) -> list[str]:
    """Write report.json, report.md and report.html of `report` into the folder `out_dir` (each
    atomically); returns their names.

    Raises:
        OSError: a file cannot be written (e.g. no permission on the bucket).
    """
    from raycompress.report.html import render_html
    from raycompress.report.markdown import render_markdown

    out_dir = str(out_dir)
    uri.write_text(uri.join(out_dir, "report.json"), json.dumps(report, indent=2))
    uri.write_text(uri.join(out_dir, "report.md"), render_markdown(report))
    uri.write_text(uri.join(out_dir, "report.html"), render_html(report))
    log.info("report written to %s (report.json, report.md, report.html)", uri.display(out_dir))
    return ["report.json", "report.md", "report.html"]


def write_report(job, out: str | os.PathLike) -> list[str]:
    """Build and write the report of the run folder `out` (the orchestrator's report stage).

    `job` is the validated JobConfig, or None to use the config saved in the folder.

    Raises:
        ValueError: a stage output is not valid JSON, or results.json has a task of unknown shape.
        OSError: a report file cannot be written.
    """
    out = str(out)
    return write_report_files(out, build_report(out, job.model_dump(mode="json") if job is not None else None))
