"""Compare several run folders in one table: one column per run, rows = tasks, groups and retention.

Each run is labelled with its job name plus the config values that differ between the runs
(selection method, algorithm, sparsity, ...), so that e.g. three calibration methods read side by
side. The compressed model of each run fills its column; the dense model (from the first run that
has one) is shown once as the reference column.

Run folders and the output file are locations (local paths or URIs, `storage.uri`); a folder is
shown by its location without the URI query (`uri.display`), which may hold keys.
"""
from __future__ import annotations

import json
import os
import posixpath
from html import escape
from typing import Callable

from raycompress.report import plots
from raycompress.report.html import image, page, table
from raycompress.report.markdown import RETENTION_NOTE, error_measure, metric_label
from raycompress.report.report import load_report
from raycompress.report.results import fmt_value, primary
from raycompress.storage import uri

# config keys shown first in run labels when they differ; other differing keys follow, sorted
LABEL_KEYS = ["select.method", "select.multi_source", "select.mix", "select.n_samples", "compress.algorithm",
              "compress.sparsity", "compress.n_m", "compress.quant", "compress.scheme", "compress.smoothquant",
              "compress.kv_cache", "compress.mixcal", "compress.owl"]
IGNORED_PREFIXES = ("name", "base_dir", "ray.", "evaluate.")
MAX_LABEL_KEYS = 4


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path not in LABEL_KEYS:
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _short(value) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={_short(v)}" for k, v in value.items() if v is not None) or "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_short(v) for v in value) + "]"
    return str(value)


def run_labels(configs: list[dict], dirs: list[str | os.PathLike]) -> list[str]:
    """Job name + `key=value` for the config values that differ between runs; folder name if still ambiguous."""
    flat = [_flatten(c) for c in configs]
    keys = {k for f in flat for k in f if not k.startswith(IGNORED_PREFIXES)}
    differing = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]
    differing.sort(key=lambda k: (LABEL_KEYS.index(k) if k in LABEL_KEYS else len(LABEL_KEYS), k))
    labels = []
    for cfg, f, d in zip(configs, flat, dirs):
        parts = [f"{k.split('.', 1)[-1]}={_short(f[k])}" for k in differing[:MAX_LABEL_KEYS] if f.get(k) is not None]
        labels.append(str(cfg.get("name") or uri.name(d)) + (f" ({', '.join(parts)})" if parts else ""))
    if len(set(labels)) < len(labels):
        labels = [f"{lab} [{uri.name(d)}]" for lab, d in zip(labels, dirs)]
    return labels


def _compressed_label(models: dict) -> str | None:
    if "compressed" in models:
        return "compressed"
    return next((lab for lab in reversed(list(models)) if lab != "dense"), None)


def _cell(entry: dict | None, metric: str) -> str:
    return fmt_value(*primary(entry, metric)[1:3]) if entry else "–"


def comparison_table(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: task / group rows with primary ± stderr per run, then retention per domain."""
    dense_run = next((r for r in runs if "dense" in r["report"]["models"]), None)
    header = ["row", "domain", "metric"] + (["dense"] if dense_run else []) + [r["label"] for r in runs]
    rows = []
    for part in ("tasks", "groups"):
        names = list(dict.fromkeys(n for r in runs for m in r["report"]["models"].values() for n in m[part]))
        for name in names:
            first = next(m[part][name] for r in runs for m in r["report"]["models"].values() if name in m[part])
            metric = primary(first)[0]
            row = [name if part == "tasks" else f"group: {name}", str(first.get("domain", "")), metric_label(first)]
            if dense_run:
                row.append(_cell(dense_run["report"]["models"]["dense"][part].get(name), metric))
            for r in runs:
                comp = _compressed_label(r["report"]["models"])
                row.append(_cell(r["report"]["models"][comp][part].get(name) if comp else None, metric))
            rows.append(row)
    domains = list(dict.fromkeys(d for r in runs for c in (r["report"].get("comparisons") or {}).values()
                                 for d in c["domains"]))
    for domain in domains:
        row = [f"retention: {domain}", domain, "1.0 = no loss"] + (["1.0"] if dense_run else [])
        for r in runs:
            c = (r["report"].get("comparisons") or {}).get(_compressed_label(r["report"]["models"]) or "", {})
            d = c.get("domains", {}).get(domain, {})
            row.append(fmt_value(d.get("retention"), d.get("stderr")))
        rows.append(row)
    return header, rows + _run_rows(runs, bool(dense_run))


# rows describing each run itself: (row name, unit, value from the report dict)
RUN_ROWS = [
    ("compression: mean sparsity", "fraction", lambda rep: (rep.get("compression") or {}).get("mean_sparsity")),
    ("wall time: all stages", "s", lambda rep: sum(st.get("wall_s", 0) for st in (rep.get("stages") or {}).values())
     or None),
]


def _error_rows(runs: list[dict]) -> list[tuple[str, str, Callable[[dict], float | None]]]:
    """One row per kind of `rel_error` among the runs (it measures different things for OBS
    methods and Cus-Prun, `report.REL_ERROR_MEASURES`): each run fills only the row of its own."""
    measures = [error_measure(r["report"].get("compression") or {}) for r in runs]
    rows = []
    for m in list({json.dumps(m, sort_keys=True): m for m in measures if m}.values()):
        rows.append((f"compression: mean {m['name']}", m["unit"],
                     lambda rep, m=m: (rep.get("compression") or {}).get("mean_rel_error")
                     if error_measure(rep.get("compression") or {}) == m else None))
    return rows


def _run_rows(runs: list[dict], with_dense: bool) -> list[list[str]]:
    return [[name, "", unit] + (["–"] if with_dense else []) + [fmt_value(get(r["report"])) for r in runs]
            for name, unit, get in RUN_ROWS[:1] + _error_rows(runs) + RUN_ROWS[1:]]


def load_runs(dirs: list[str | os.PathLike]) -> list[dict]:
    """[{"dir", "label", "report"}] for each run folder (report rebuilt from stage outputs when
    present); "dir" is the location without its URI query.

    Raises:
        FileNotFoundError: a folder has none of the stage outputs nor report.json.
    """
    dirs = [str(d) for d in dirs]
    reports = [load_report(d) for d in dirs]
    labels = run_labels([r.get("config") or {} for r in reports], dirs)
    return [{"dir": uri.display(d), "label": lab, "report": rep} for d, lab, rep in zip(dirs, labels, reports)]


def render_comparison_markdown(runs: list[dict]) -> str:
    """The comparison as Markdown: the table, then which folder each column came from."""
    header, rows = comparison_table(runs)
    lines = [f"# raycompress comparison of {len(runs)} runs", "",
             "Compressed model of each run: primary metric ± standard error (↑ higher / ↓ lower is better). "
             + RETENTION_NOTE, "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "Runs:"] + [f"- {r['label']}: {r['dir']}" for r in runs]
    return "\n".join(lines) + "\n"


def render_comparison_html(runs: list[dict]) -> str:
    """The comparison as one self-contained HTML page: the table and a retention chart per domain and run."""
    series = {}
    for r in runs:
        comp = _compressed_label(r["report"]["models"]) or ""
        domains = ((r["report"].get("comparisons") or {}).get(comp) or {}).get("domains")
        if domains:
            series[r["label"]] = domains
    body = (f"<h1>raycompress comparison of {len(runs)} runs</h1>"
            "<p class=note>Compressed model of each run: primary metric ± standard error "
            f"(↑ higher / ↓ lower is better). {escape(RETENTION_NOTE)}</p>"
            + table(*comparison_table(runs)) + "<h2>Retention per domain</h2>"
            + (image(plots.retention_chart(series), "retention per domain and run") if series
               else "<p class=note>No run has a dense model: no retention.</p>")
            + "<h2>Runs</h2>" + table(["label", "folder"], [[r["label"], r["dir"]] for r in runs]))
    return page("raycompress comparison", body)


# output suffix -> renderer of the comparison
RENDERERS = {".md": render_comparison_markdown, ".html": render_comparison_html}


def _suffix(location: str) -> str:
    return posixpath.splitext(uri.name(location))[1]


def report_runs(dirs: list[str | os.PathLike], output: str | os.PathLike | None = None) -> str:
    """`raycompress report DIR [DIR ...]`: returns the Markdown to print. Folders and `output`
    are locations (local paths or URIs).

    One folder: (re)write its report.json / .md / .html (rebuilt from the stage outputs, or
    re-rendered from report.json when only that is left) and return report.md. Several: the
    comparison table. With `output` (.md or .html) the same report or comparison is also written there.

    Raises:
        ValueError: `output` has a suffix other than .md or .html.
        FileNotFoundError: a folder has none of the stage outputs nor report.json.
        OSError: a report file cannot be written.
    """
    from raycompress.report.report import write_report_files

    output = None if output is None else str(output)
    if output is not None and _suffix(output) not in RENDERERS:
        raise ValueError(f"--output {uri.display(output)}: expected a .md or .html file name")
    dirs = [str(d) for d in dirs]
    if len(dirs) == 1:
        write_report_files(dirs[0], load_report(dirs[0]))
        if output is not None:
            uri.copy(uri.join(dirs[0], "report" + _suffix(output)), output)
        return uri.read_text(uri.join(dirs[0], "report.md"))
    runs = load_runs(dirs)
    if output is not None:
        uri.write_text(output, RENDERERS[_suffix(output)](runs))
    return render_comparison_markdown(runs)
