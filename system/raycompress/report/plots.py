"""Report figures drawn with matplotlib (Agg) and returned as base64 PNG strings for embedding.

Each function takes plain report data (dicts from report.json) and returns the PNG as base64 text
(no file is written), or None when there is nothing to draw.
"""
from __future__ import annotations

import base64
import io

_COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def retention_chart(series: dict[str, dict]) -> str | None:
    """Grouped bars of mean retention per domain, one bar per series (compressed model or run).

    series: {label: {domain: {"retention", "stderr"}}}; a line at 1.0 marks no loss.
    """
    domains = sorted({d for per in series.values() for d in per}, key=lambda d: (d != "general", d))
    if not domains:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(min(10.0, max(4.2, 1.3 * len(domains) * max(1, len(series)) ** 0.5)), 3.6))
    width = 0.8 / len(series)
    for i, (label, per) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(domains))]
        vals = [per.get(d, {}).get("retention") or 0.0 for d in domains]
        errs = [per.get(d, {}).get("stderr") or 0.0 for d in domains]
        low = [min(e, v) for e, v in zip(errs, vals)]
        bars = ax.bar(xs, vals, width, yerr=[low, errs], capsize=3, label=label, color=_COLORS[i % len(_COLORS)])
        ax.bar_label(bars, labels=[f"{v:.3f}" if v else "" for v in vals], label_type="center", color="white",
                     fontsize=8, fontweight="bold")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylabel("retention (1.0 = no loss)")
    top = max([1.0] + [(p.get(d, {}).get("retention") or 0) for p in series.values() for d in domains])
    ax.set_ylim(0, top * 1.15)
    if len(series) > 1:
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    ax.set_title("Mean retention per domain tag", fontsize=10)
    return _png(fig)


def task_retention_chart(tasks: dict[str, dict]) -> str | None:
    """Horizontal bars of retention per task, coloured by domain. tasks: {task: {"retention", "stderr", "domain"}}."""
    rows = [(name, t) for name, t in tasks.items() if t.get("retention") is not None]
    if not rows:
        return None
    plt = _pyplot()
    domains = sorted({t["domain"] for _, t in rows}, key=lambda d: (d != "general", d))
    rows.sort(key=lambda nt: (domains.index(nt[1]["domain"]), nt[0]), reverse=True)
    fig, ax = plt.subplots(figsize=(5.2, 1.2 + 0.3 * len(rows)))
    colors = [_COLORS[domains.index(t["domain"]) % len(_COLORS)] for _, t in rows]
    errs = [t.get("stderr") or 0.0 for _, t in rows]
    low = [min(e, t["retention"]) for e, (_, t) in zip(errs, rows)]  # retention is never below 0
    ax.barh([n for n, _ in rows], [t["retention"] for _, t in rows], xerr=[low, errs], color=colors, capsize=2)
    ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xlabel("retention (1.0 = no loss)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=_COLORS[i % len(_COLORS)]) for i in range(len(domains))]
    ax.legend(handles, domains, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title("Retention per task or task group", fontsize=10)
    return _png(fig)


def layer_chart(layers: list[dict], error_label: str | None = None) -> str | None:
    """Per decoder layer: mean sparsity (bars) and each module's `rel_error` (lines).

    layers: [{"layer", "sparsity", "modules": {module: {"sparsity", "rel_error"}}}] sorted by layer.
    error_label: what rel_error measures (the y axis label; it differs by algorithm, see
        `report.REL_ERROR_MEASURES`); default "error".
    """
    if not layers:
        return None
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10.0, 5.6), sharex=True, layout="constrained")
    xs = [lay["layer"] for lay in layers]
    ax1.bar(xs, [lay["sparsity"] for lay in layers], color=_COLORS[0])
    ax1.set_ylabel("sparsity (mean of modules)")
    ax1.set_ylim(0, max(0.05, max(lay["sparsity"] for lay in layers) * 1.15))
    modules = sorted({m for lay in layers for m in lay["modules"]})
    for i, mod in enumerate(modules):
        pts = [(lay["layer"], lay["modules"][mod].get("rel_error")) for lay in layers if mod in lay["modules"]]
        pts = [(x, y) for x, y in pts if y is not None and y > 0]
        if pts:
            ax2.plot([x for x, _ in pts], [y for _, y in pts], marker=".", label=mod, color=_COLORS[i % len(_COLORS)])
    if ax2.lines:
        ax2.set_yscale("log")
        ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax2.set_ylabel(error_label or "error", fontsize=8)
    ax2.set_xlabel("decoder layer")
    fig.suptitle(f"Per-layer sparsity and {error_label or 'error'}", fontsize=10)
    return _png(fig)


def expert_tokens_chart(experts: dict | None) -> str | None:
    """A mixture of experts' routed calibration tokens as a heat map, decoder layer (rows) x expert
    (columns), log colour scale; experts that fell back to a data-free method are crossed.

    experts: `report.expert_summary` ({"layers", "tokens": [[per expert] per layer], "fallbacks"}).
    """
    if not experts or not experts.get("tokens"):
        return None
    import numpy as np

    plt = _pyplot()
    data = np.asarray(experts["tokens"], dtype=float)
    n_layers, n_exp = data.shape
    fig, ax = plt.subplots(figsize=(min(14.0, 3.0 + 0.12 * n_exp), min(10.0, 1.5 + 0.3 * n_layers)),
                           layout="constrained")
    img = ax.imshow(np.log10(1.0 + data), aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(img, ax=ax, label="log10(1 + routed tokens)")
    rows = {lay: i for i, lay in enumerate(experts["layers"])}
    for fb in experts.get("fallbacks", []):
        ax.plot(fb["expert"], rows[fb["layer"]], marker="x", color="#C44E52", markersize=6)
    ax.set_yticks(range(n_layers), [str(x) for x in experts["layers"]])
    ax.set_xlabel("expert")
    ax.set_ylabel("decoder layer")
    ax.set_title("Routed calibration tokens per expert (x: fell back to a data-free method)", fontsize=10)
    return _png(fig)


def calibration_chart(sources: dict[str, dict]) -> str | None:
    """Per source: sequences chosen, and histograms of documents per sequence and distinct tokens per sequence."""
    if not any(s["sequences"] for s in sources.values()):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(11.0, 3.2))
    names = list(sources)
    colors = [_COLORS[i % len(_COLORS)] for i in range(len(names))]
    bars = axes[0].bar(names, [sources[n]["sequences"] for n in names], color=colors)
    axes[0].bar_label(bars, fontsize=8)
    axes[0].set_title("sequences per source", fontsize=10)
    for ax, key, title in ((axes[1], "docs_per_sequence", "documents per sequence"),
                           (axes[2], "distinct_tokens", "distinct tokens per sequence")):
        data = [sources[n][key] for n in names if sources[n][key]]
        if data:
            lo, hi = min(min(d) for d in data), max(max(d) for d in data)
            bins = [b - 0.5 for b in range(lo, hi + 2)] if hi - lo <= 20 else 12
            ax.hist(data, bins=bins, stacked=True, edgecolor="white", color=[c for n, c in zip(names, colors) if sources[n][key]],
                    label=[n for n in names if sources[n][key]])
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
    return _png(fig)


def pareto_chart(points: dict[str, dict], x_label: str, y_label: str) -> str | None:
    """Scatter of sweep points with seed error bars (±1 sd) and the Pareto front highlighted.

    points: {label: {"x", "y", "x_sd", "y_sd", "front": bool}}; larger is better on both axes.
    """
    pts = {k: p for k, p in points.items() if p.get("x") is not None and p.get("y") is not None}
    if not pts:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.4, 5.2))
    for i, (label, p) in enumerate(sorted(pts.items())):
        on = p.get("front")
        ax.errorbar(p["x"], p["y"], xerr=p.get("x_sd") or 0.0, yerr=p.get("y_sd") or 0.0, fmt="o" if on else "s",
                    markersize=7 if on else 5, capsize=3, color=_COLORS[0] if on else "#9aa3ad",
                    markeredgecolor="black" if on else "none", zorder=3 if on else 2)
        ax.annotate(label, (p["x"], p["y"]), textcoords="offset points", xytext=(5, 4), fontsize=7,
                    fontweight="bold" if on else "normal")
    front = sorted(((p["x"], p["y"]) for p in pts.values() if p.get("front")), key=lambda xy: xy[0])
    if len(front) > 1:
        ax.plot([x for x, _ in front], [y for _, y in front], color=_COLORS[0], linewidth=1.2, zorder=1)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    ax.set_title("Calibration sweep: Pareto front (blue) and dominated points (grey), ±1 sd over seeds", fontsize=9)
    return _png(fig)
