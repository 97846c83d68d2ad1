"""report.html: one self-contained page (inline CSS, plots as base64 PNG) from a job's report dict.

Opens from disk with no server: no scripts, no external links. Sections: tasks and groups tables
(dense, compressed and, after a train stage, recovered; delta and standard error), retention per
domain, per-layer sparsity and `rel_error` (labelled with what it measures for the algorithm,
`report.REL_ERROR_MEASURES`), the train stage's figures,
calibration composition, stage times, the job config.
"""
from __future__ import annotations

import json
from html import escape

from raycompress.report import plots
from raycompress.report.markdown import NO_RESULTS, RETENTION_NOTE, error_measure, na, result_rows, training_text
from raycompress.report.report import fallback_lines

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 0; background: #f6f7f9;
       color: #1d232b; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 26px; margin: 8px 0 4px; } h2 { font-size: 19px; margin: 30px 0 8px; border-bottom: 1px solid #d5d9e0;
     padding-bottom: 4px; }
.meta { color: #566070; font-size: 14px; margin-bottom: 10px; }
.note { color: #566070; font-size: 13px; margin: 6px 0 10px; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 14px 0; }
.card { background: #fff; border: 1px solid #dde1e7; border-radius: 6px; padding: 8px 14px; min-width: 120px; }
.card b { display: block; font-size: 18px; } .card span { color: #566070; font-size: 12px; }
table { border-collapse: collapse; background: #fff; font-size: 13px; margin: 6px 0 12px; }
th, td { border: 1px solid #dde1e7; padding: 4px 9px; text-align: right; white-space: nowrap; }
th { background: #eef1f5; } td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #fafbfc; }
img { max-width: 100%; background: #fff; border: 1px solid #dde1e7; border-radius: 4px; margin: 6px 0; }
.figs { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
pre { background: #fff; border: 1px solid #dde1e7; padding: 10px; font-size: 12px; overflow-x: auto; }
.concepts { margin: 4px 0; } .concepts b { font-size: 13px; margin-right: 4px; }
.concepts span { display: inline-block; background: #e8eef7; border-radius: 4px; padding: 2px 7px; margin: 2px;
                 font-size: 13px; }
"""


def table(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table of text cells (escaped)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def image(png_b64: str | None, alt: str) -> str:
    """An <img> with the PNG inline, or a note when there was nothing to draw."""
    if png_b64 is None:
        return f'<p class="note">{escape(alt)}: no data.</p>'
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{png_b64}">'


def page(title: str, body: str) -> str:
    """A whole HTML document around `body`."""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body><main>{body}</main></body></html>")


def _cards(report: dict) -> str:
    cfg, comp, cal = report.get("config") or {}, report.get("compression") or {}, report.get("calibration") or {}
    items = [("model", cfg.get("model")), ("algorithm", comp.get("algorithm")),
             ("mean sparsity", None if comp.get("mean_sparsity") is None else f"{comp['mean_sparsity']:.3f}"),
             ("calibration", f"{cal.get('method')} · {cal.get('sequences', 0)} seq")]
    for label, c in (report.get("comparisons") or {}).items():
        for domain, d in c["domains"].items():
            items.append((f"{label} retention · {domain}", f"{d['retention']:.3f}"))
    cards = "".join(f"<div class=card><b>{escape(str(v))}</b><span>{escape(k)}</span></div>"
                    for k, v in items if v is not None)
    return f"<div class=cards>{cards}</div>"


def _results_section(report: dict) -> str:
    if not report["models"]:
        return f"<h2>Tasks</h2><p class=note>{NO_RESULTS}</p>"
    html = "<h2>Tasks</h2><p class=note>Primary metric ± standard error; ↑ higher is better, ↓ lower is better.</p>"
    html += table(*result_rows(report, "tasks"))
    if any(m["groups"] for m in report["models"].values()):
        html += "<h2>Groups</h2>" + table(*result_rows(report, "groups"))
    return html


def _retention_section(report: dict) -> str:
    comps = report.get("comparisons") or {}
    html = "<h2>General vs domain retention</h2>"
    if not comps:
        why = NO_RESULTS if not report["models"] else "No dense model in this run: nothing to compare with."
        return html + f"<p class=note>{why}</p>"
    html += f"<p class=note>{escape(RETENTION_NOTE)}</p><div class=figs>"
    html += image(plots.retention_chart({lab: c["domains"] for lab, c in comps.items()}), "retention per domain")
    for label, c in comps.items():
        tasks = {t: {**v, "domain": d} for d, dom in c["domains"].items() for t, v in dom["tasks"].items()}
        html += image(plots.task_retention_chart(tasks), f"retention per task ({label})")
    return html + "</div>"


def _compression_section(comp: dict) -> str:
    html = "<h2>Compression per layer</h2>"
    if not comp.get("algorithm"):
        return html + "<p class=note>No compress/compression.json in this run.</p>"
    text = f"{comp['algorithm']}: {comp['modules']} modules, mean sparsity {comp['mean_sparsity']:.4f}"
    measure = error_measure(comp)
    if measure is not None:
        text += f", mean {measure['name']} {comp['mean_rel_error']:.4f}. {measure['name'].capitalize()} = " \
                f"{measure['definition']}"
    html += f"<p class=note>{escape(text)}.</p>"
    if comp.get("serving"):
        html += f"<p class=note>{escape(comp['serving'])}</p>"
    label = f"{measure['name']} ({measure['unit']})" if measure else None
    html += image(plots.layer_chart(comp.get("layers") or [], label),
                  f"per-layer sparsity and {measure['name'] if measure else 'error'}")
    experts = comp.get("experts")
    if experts:
        html += image(plots.expert_tokens_chart(experts), "routed calibration tokens per layer x expert")
        html += "".join(f"<p class=note>{escape(line)}</p>" for line in fallback_lines(experts))
    return html


def _calibration_section(cal: dict) -> str:
    html = (f"<h2>Calibration set</h2><p class=note>Method {escape(str(cal.get('method')))}, "
            f"{cal.get('sequences', 0)} sequences; manifest sha256 {escape(str(cal.get('manifest_sha256')))}.</p>")
    rows = []
    for src, s in (cal.get("sources") or {}).items():
        skipped = ", ".join(f"{r}: {n}" for r, n in sorted((cal.get("skipped") or {}).get(src, {}).items())) or "none"
        mean_docs = sum(s["docs_per_sequence"]) / len(s["docs_per_sequence"]) if s["docs_per_sequence"] else None
        rows.append([src, s["sequences"], na(s.get("quota")), na(s.get("usable_documents")), s["tokens"],
                     na(s.get("median_length")), "–" if mean_docs is None else f"{mean_docs:.2f}", skipped])
    html += table(["source", "sequences", "quota", "usable docs", "tokens", "median length", "docs / sequence",
                   "skipped"], rows)
    html += image(plots.calibration_chart(cal.get("sources") or {}), "calibration composition")
    concepts = cal.get("top_concepts") or {}
    html += f"<h3>Top concepts</h3><p class=note>{escape(concepts.get('note', ''))}</p>"
    html += _concept_spans("all sources", concepts.get("items", []))
    for src, items in (concepts.get("by_source") or {}).items():
        html += _concept_spans(src, items)
    return html


def _concept_spans(title: str, items: list[dict]) -> str:
    spans = "".join(f"<span>{escape(c['text'])} <small>{c['count']}</small></span>" for c in items)
    return f"<div class=concepts><b>{escape(title)}:</b> {spans}</div>" if items else ""


def _stages_section(stages: dict) -> str:
    rows = [[name, f"{st.get('wall_s', 0):.1f}", f"{st.get('peak_rss_mb', 0):.0f}"] for name, st in stages.items()]
    return "<h2>Stages</h2>" + table(["stage", "wall s", "peak RSS MiB"], rows)


def render_html(report: dict) -> str:
    """The whole report.html page of one job."""
    body = (f"<h1>raycompress report: {escape(str(report['job']))}</h1>"
            f"<div class=meta>run folder {escape(str(report.get('run_dir', '')))}</div>" + _cards(report)
            + _results_section(report) + _retention_section(report)
            + _compression_section(report.get("compression") or {})
            + (f"<h2>Recovery (train)</h2><p class=note>{escape(training_text(report['training']))}</p>"
               if report.get("training") else "")
            + _calibration_section(report.get("calibration") or {}) + _stages_section(report.get("stages") or {})
            + "<h2>Job config</h2><details><summary>show</summary><pre>"
            + escape(json.dumps(report.get("config") or {}, indent=2)) + "</pre></details>")
    return page(f"raycompress report: {report['job']}", body)
