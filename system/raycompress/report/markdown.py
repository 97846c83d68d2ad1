"""report.md: the report dict of one job as Markdown tables (tasks, groups, retention, stages, calibration)."""
from __future__ import annotations

from raycompress.report.report import fallback_lines, rel_error_measure
from raycompress.report.results import fmt_value, primary, reference_label

RETENTION_NOTE = ("Retention: the compressed metric relative to the dense one, oriented so that 1.0 = no loss "
                  "(compressed / dense for accuracy, dense / compressed for perplexity). A domain's retention "
                  "is the mean over its ungrouped tasks and task groups (a group such as MMLU counts once). "
                  "Standard errors of deltas and retention treat the two models as independent samples.")


NO_RESULTS = "No evaluation results in this run (evaluate/results.json is missing): run the evaluate stage."


def na(value) -> str:
    """A table cell: '–' for a missing value, integers without a decimal point."""
    if value is None:
        return "–"
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def metric_label(entry: dict) -> str:
    name, _, _, hib = primary(entry)
    return f"{name} {'↑' if hib else '↓'}"


def result_rows(report: dict, part: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the tasks or groups table: value ± stderr per model, delta and retention per compressed model."""
    models, comps = report["models"], report.get("comparisons") or {}
    labels = list(models)
    ref = reference_label(models)
    names = list(dict.fromkeys(n for lab in labels for n in models[lab][part]))
    header = [part[:-1], "domain", "metric", "n" if part == "tasks" else "members"] + labels
    for lab in comps:
        header += [f"Δ {lab} − {ref}", f"retention {lab}"]
    rows = []
    for name in names:
        first = next(models[lab][part][name] for lab in labels if name in models[lab][part])
        size = first.get("n") if part == "tasks" else len(first.get("members") or [])
        row = [name, str(first.get("domain", "")), metric_label(first), na(size)]
        for lab in labels:
            entry = models[lab][part].get(name)
            row.append(fmt_value(*primary(entry, primary(first)[0])[1:3]) if entry else "–")
        for lab, comp in comps.items():
            c = comp[part].get(name, {})
            row += [fmt_value(c.get("delta"), c.get("delta_stderr"), signed=True),
                    fmt_value(c.get("retention"), c.get("retention_stderr"))]
        rows.append(row)
    return header, rows


def _retention_lines(report: dict) -> list[str]:
    comps = report.get("comparisons") or {}
    if not comps:
        return [] if not report["models"] else ["", "No dense model in this run: no deltas or retention."]
    domains = list(dict.fromkeys(d for c in comps.values() for d in c["domains"]))
    rows = [[d] + [fmt_value(c["domains"].get(d, {}).get("retention"), c["domains"].get(d, {}).get("stderr"))
                   for c in comps.values()] for d in domains]
    return ["", "## Retention per domain", "", RETENTION_NOTE, ""] + _table(["domain"] + list(comps), rows)


def _stage_lines(stages: dict) -> list[str]:
    rows = [[name, f"{st.get('wall_s', 0):.1f}", f"{st.get('peak_rss_mb', 0):.0f}"] for name, st in stages.items()]
    return ["", "## Stages", ""] + _table(["stage", "wall s", "peak RSS MiB"], rows)


def _compression_lines(c: dict) -> list[str]:
    if not c.get("algorithm"):
        return []
    text = f"Compression: {c['algorithm']}, {c['modules']} modules, mean sparsity {c['mean_sparsity']:.4f}"
    measure = error_measure(c)
    serving = (["", c["serving"]] if c.get("serving") else []) + \
        (["", *fallback_lines(c["experts"])] if c.get("experts") else [])
    if measure is None:
        return ["", "## Compression", "", text] + serving
    text += f", mean {measure['name']} {c['mean_rel_error']:.4f}"
    return ["", "## Compression", "", text, "", f"{measure['name'].capitalize()} = {measure['definition']}."] + serving


def training_text(t: dict) -> str:
    """One paragraph on the train stage (`train/summary.json`): what was trained, how long, and the
    sparsity before and after (equal with a fixed mask; GMP raises it to its final sparsity)."""
    if not t:
        return ""
    start = "the dense model" if t.get("init") == "dense" else "the compressed checkpoint"
    gmp = t.get("gmp")
    how = (f"gradual magnitude pruning {gmp['s_i'] if gmp['s_i'] is not None else 'from the start'} -> {gmp['s_f']} "
           f"({gmp['scope']}, every {gmp['dt']} steps from step {gmp['t0']}, {gmp['n']} times)") if gmp else "its mask fixed"
    return (f"The recovered model: {start} trained with {how}, {t['strategy']} on {t['num_workers']} workers, "
            f"{t['steps']} steps, {t['tokens']} tokens, {t['seconds']:.0f} s, final loss {t['final_loss']:.4f}; "
            f"sparsity of the target linears {t['sparsity_start']:.4f} before and {t['sparsity']:.4f} after.")


def error_measure(comp: dict) -> dict | None:
    """What the compression summary's `mean_rel_error` measures ({"name", "unit", "definition"}),
    None when there is no error; a report.json written before the measure was recorded gets it
    from its algorithm."""
    if comp.get("mean_rel_error") is None:
        return None
    return comp.get("rel_error_measure") or rel_error_measure(comp.get("algorithm"))


def calibration_lines(cal: dict) -> list[str]:
    """Per source: sequences chosen, usable documents, tokens, skipped records by reason; top concepts."""
    rows = []
    for src, s in (cal.get("sources") or {}).items():
        skipped = ", ".join(f"{r}: {n}" for r, n in sorted((cal.get("skipped") or {}).get(src, {}).items())) or "none"
        rows.append([src, str(s["sequences"]), na(s.get("usable_documents")), str(s["tokens"]),
                     na(s.get("median_length")), skipped])
    lines = ["", "## Calibration set", "", f"Method {cal.get('method')}, {cal.get('sequences', 0)} sequences, "
             f"manifest sha256 {cal.get('manifest_sha256')}.", ""]
    lines += _table(["source", "sequences", "usable docs", "tokens", "median length", "skipped (reason: count)"], rows)
    concepts = cal.get("top_concepts") or {}
    if concepts.get("items"):
        lines += ["", "Top concepts: " + ", ".join(f"{c['text']} ({c['count']})" for c in concepts["items"])]
    elif concepts.get("note"):
        lines += ["", f"Top concepts: none ({concepts['note']})."]
    return lines + [""]


def render_markdown(report: dict) -> str:
    """The whole report.md text."""
    lines = [f"# raycompress report: {report['job']}", "", "↑ higher is better, ↓ lower is better; values are "
             "primary metric ± standard error.", "", "## Tasks", ""]
    lines += _table(*result_rows(report, "tasks")) if report["models"] else [NO_RESULTS]
    if any(m["groups"] for m in report["models"].values()):
        lines += ["", "## Groups", ""] + _table(*result_rows(report, "groups"))
    lines += _retention_lines(report) + _stage_lines(report.get("stages") or {})
    lines += _compression_lines(report.get("compression") or {})
    if report.get("training"):
        lines += ["", "## Recovery (train)", "", training_text(report["training"])]
    lines += calibration_lines(report.get("calibration") or {})
    return "\n".join(lines)
