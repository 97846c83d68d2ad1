"""The sweep report: sweep.json / sweep.md / sweep.html from the points' run folders.

One row per point (its variants, seeds, mean ± sd over seeds of every task's primary metric, of
retention per domain tag and of the domain / general perplexity), the Pareto chart of general
against domain retention with seed error bars, which points are dominated, and in words which
differences exceed the seed noise (`report.sweep_stats`).
"""
from __future__ import annotations

import json
import logging
from html import escape

from raycompress.report import plots
from raycompress.report import sweep_stats as stats
from raycompress.report.html import image, page, table
from raycompress.report.results import fmt_value
from raycompress.storage import uri

log = logging.getLogger(__name__)


def collect(points, out: str, domain: str | None) -> tuple[dict[str, list[dict]], list[str]]:
    """({label: [run figures per finished seed]}, [folders without results])."""
    runs: dict[str, list[dict]] = {}
    missing = []
    for p in points:
        path = uri.join(out, p.folder, "evaluate", "results.json")
        try:
            raw = json.loads(uri.read_text(path))
            manifest = json.loads(uri.read_text(uri.join(out, p.folder, "select", "manifest.json")))
            runs.setdefault(p.label, []).append({"seed": p.seed, "calibration": manifest.get("calibration_sha256"),
                                                 **stats.run_figures(raw, domain)})
        except (FileNotFoundError, KeyError, ValueError) as exc:
            log.warning("sweep report: %s has no usable results (%s)", p.folder, exc)
            missing.append(p.folder)
    return runs, missing


def build(sweep, points, out: str, errors: dict, seconds: float, at_once: int) -> dict:
    """The sweep report as a dict (what sweep.json holds)."""
    runs, missing = collect(points, out, sweep.domain)
    aggs = {label: stats.aggregate(r) for label, r in runs.items()}
    domain = sweep.domain or next((r[0]["domain"] for r in runs.values() if r and r[0]["domain"]), None)
    y_tag = domain or "general"  # no domain tag: the front is over general retention alone
    xy = {lab: (a["retention"].get("general", {}).get("mean"), a["retention"].get(y_tag, {}).get("mean"))
          for lab, a in aggs.items()}
    dominated = stats.pareto({k: v for k, v in xy.items() if None not in v})
    variants = {p.label: p.variants for p in points}
    return {
        "sweep": sweep.name, "domain": domain, "seconds": round(seconds, 1), "points_at_once": at_once,
        "seeds": sorted({p.seed for p in points}), "runs": len(points), "errors": errors, "missing": missing,
        "points": {lab: {"variants": variants[lab], **a, "dominated_by": dominated.get(lab),
                         "seeds": [r["seed"] for r in runs[lab]],
                         "distinct_calibrations": len({r["calibration"] for r in runs[lab]})} for lab, a in aggs.items()},
        "seed_noise": {"domain_ppl": stats.seed_noise(aggs, "domain_ppl"),
                       "general_ppl": stats.seed_noise(aggs, "general_ppl")},
        "verdicts": {tag: stats.verdicts(aggs, tag) for tag in ("general", domain) if tag},
        "config": sweep.model_dump(mode="json"),
    }


def _ms(f: dict | None) -> str:
    if not f or f.get("mean") is None:
        return "–"
    return fmt_value(f["mean"], f.get("sd"))


def rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """The points table: header and rows (mean ± sd over seeds)."""
    pts = report["points"]
    tasks = sorted({t for p in pts.values() for t in p["tasks"]})
    tags = sorted({d for p in pts.values() for d in p["retention"]}, key=lambda d: (d != "general", d))
    header = ["point", "seeds", *tasks, *[f"retention {d}" for d in tags], "Pareto"]
    out = []
    order = sorted(pts, key=lambda k: -(pts[k]["retention"].get(report["domain"] or "", {}).get("mean") or 0))
    for lab in order:
        p = pts[lab]
        dom = p.get("dominated_by")
        out.append([lab, str(p["n"]), *[_ms(p["tasks"].get(t)) for t in tasks],
                    *[_ms(p["retention"].get(d)) for d in tags],
                    "front" if dom == [] else f"dominated by {', '.join(dom[:3])}" if dom else "–"])
    return header, out


def findings(report: dict) -> list[str]:
    """Sentences on seed noise, the best points and what lies within noise of them."""
    lines = []
    sn = {k: v for k, v in report["seed_noise"].items() if v is not None}
    if sn:
        parts = [f"{k.replace('_ppl', '')} perplexity {100 * v:.2f}%" for k, v in sn.items()]
        lines.append(f"Seed noise (relative sd of a point over seeds {report['seeds']}, mean over points): "
                     + ", ".join(parts) + ".")
    else:
        lines.append("One seed per point: no estimate of seed noise; no difference can be called real.")
    same = sorted(k for k, p in report["points"].items() if p["n"] > 1 and p.get("distinct_calibrations") == 1)
    if same:
        lines.append(f"Every seed selected the same calibration set for {', '.join(same)}: their sd over seeds is 0 "
                     "by construction and measures no noise (ZipCal considers every window when select.candidate_pool "
                     "is at least the pool's window count; lower it, or use random selection, to sample).")
    for tag, v in report["verdicts"].items():
        if not v:
            continue
        best = report["points"][v["best"]]["retention"][tag]
        text = f"Best {tag} retention: {v['best']} ({_ms(best)})."
        if v["beaten"]:
            text += f" It is ahead beyond seed noise (> 2 SE) of {len(v['beaten'])}: {', '.join(sorted(v['beaten']))}."
        if v["within"]:
            text += (f" Within seed noise of it (not distinguishable with these seeds): "
                     f"{', '.join(sorted(v['within']))}.")
        lines.append(text)
    front = sorted(k for k, p in report["points"].items() if p.get("dominated_by") == [])
    if front:
        axes = f"general vs {report['domain']} retention" if report["domain"] else "general retention"
        lines.append(f"Pareto front ({axes}, means): {', '.join(front)}.")
    if report["errors"]:
        lines.append(f"Failed: {', '.join(f'{k} ({e})' for k, e in report['errors'].items())}.")
    return lines


def chart(report: dict) -> str | None:
    d = report["domain"] or "general"
    pts = {lab: {"x": p["retention"].get("general", {}).get("mean"), "y": p["retention"].get(d, {}).get("mean"),
                 "x_sd": p["retention"].get("general", {}).get("sd"), "y_sd": p["retention"].get(d, {}).get("sd"),
                 "front": p.get("dominated_by") == []} for lab, p in report["points"].items()}
    return plots.pareto_chart(pts, "general retention (1.0 = dense)", f"{d} retention (1.0 = dense)")


def render_markdown(report: dict) -> str:
    header, body = rows(report)
    lines = [f"# Calibration sweep: {report['sweep']}", "",
             f"{report['runs']} runs, {len(report['points'])} points, seeds {report['seeds']}, "
             f"{report['points_at_once']} at once, {report['seconds']:.0f} s. Values are mean ± sd over seeds.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    lines += ["", *[f"- {s}" for s in findings(report)], ""]
    return "\n".join(lines)


def render_html(report: dict) -> str:
    header, body = rows(report)
    html = (f"<h1>Calibration sweep: {escape(report['sweep'])}</h1><div class=meta>{report['runs']} runs, "
            f"{len(report['points'])} points, seeds {report['seeds']}, {report['points_at_once']} at once, "
            f"{report['seconds']:.0f} s. Values are mean ± sd over seeds.</div>"
            "<h2>Pareto chart</h2><div class=figs>" + image(chart(report), "Pareto chart")
            + "<div>" + "".join(f"<p class=note>{escape(s)}</p>" for s in findings(report)) + "</div></div>"
            + "<h2>Points</h2>" + table(header, body))
    return page(f"raycompress sweep: {report['sweep']}", html)


def write_sweep_report(sweep, points, out: str, errors: dict, seconds: float, at_once: int) -> list[str]:
    """Write sweep.json, sweep.md and sweep.html into `out`; returns their locations."""
    report = build(sweep, points, out, errors, seconds, at_once)
    files = []
    for name, text in (("sweep.json", json.dumps(report, indent=2)), ("sweep.md", render_markdown(report)),
                       ("sweep.html", render_html(report))):
        uri.write_text(uri.join(out, name), text)
        files.append(uri.join(out, name))
    return files
