"""The report's figures as PNG bytes: cost versus KL with the Pareto front, per-part sensitivity, and
KL versus calibration-set size. matplotlib's Agg canvas, no global pyplot state, no version stamp in
the file (a re-run gives the same bytes).
"""
from __future__ import annotations

import io
import math
from typing import Any

BASELINE = "fp32"


def _figure(size: tuple[float, float] = (7.5, 4.8)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version stamp: stable bytes
    return buf.getvalue()


def _rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [summary["baseline"], *summary["variants"]]


def pareto_png(summary: dict[str, Any]) -> bytes:
    """Cost per 1M requests (x) against KL mean (y, symlog so fp32's 0 shows), front highlighted."""
    from matplotlib.lines import Line2D

    front, picked = summary["search"]["front"], summary["search"]["picked"]
    pts = [r for r in _rows(summary)
           if r["cost_per_1m_requests_usd"] is not None and r["quality"]["kl_mean"] is not None]
    fig = _figure()
    ax = fig.add_subplot()
    positive = [r["quality"]["kl_mean"] for r in pts if r["quality"]["kl_mean"] > 0]
    ax.set_yscale("symlog", linthresh=10 ** math.floor(math.log10(min(positive))) if positive else 1e-3)
    by_name = {r["name"]: r for r in pts}
    line = [by_name[n] for n in front if n in by_name]
    ax.plot([r["cost_per_1m_requests_usd"] for r in line], [r["quality"]["kl_mean"] for r in line],
            color="#f0a020", lw=6, alpha=0.35, zorder=1, solid_capstyle="round")
    style = {True: ("o", "#2a9d2a"), False: ("X", "#d62728"), None: ("o", "#888888")}
    for r in pts:
        marker, color = ("s", "#222222") if r["name"] == BASELINE else style[r["gate"]["passed"]]
        x, y = r["cost_per_1m_requests_usd"], r["quality"]["kl_mean"]
        ax.scatter([x], [y], marker=marker, s=140 if r["name"] == picked else 70, color=color, zorder=3,
                   edgecolors="#f0a020" if r["name"] in front else "none", linewidths=2)
        ax.annotate(r["name"] + (" (picked)" if r["name"] == picked else ""), (x, y),
                    textcoords="offset points", xytext=(7, 6), fontsize=8)
    ax.set_xlabel("cost per 1M requests (USD)")
    ax.set_ylabel("KL mean vs fp32 (nats/token, symlog)")
    ax.set_title("Cost versus quality")
    ax.grid(True, alpha=0.3)
    ax.legend(handles=[
        Line2D([], [], marker="s", ls="", color="#222222", label="fp32 baseline"),
        Line2D([], [], marker="o", ls="", color="#2a9d2a", label="gates passed"),
        Line2D([], [], marker="X", ls="", color="#d62728", label="gates failed"),
        Line2D([], [], color="#f0a020", lw=6, alpha=0.35, label="Pareto front"),
    ], fontsize=8, loc="best")
    return _png(fig)




def sensitivity_png(sens: dict[str, Any]) -> bytes:
    """KL added by quantizing one part alone, per layer: attention and MLP, one line per precision."""
    fig = _figure((7.5, 4.2))
    ax = fig.add_subplot()
    table = sens["parts"]
    layers = sorted({int(p.split(".")[1]) for p in table})
    kinds = sorted({p.split(".")[2] for p in table})
    colors = {"int4": "#d62728", "int8": "#1f77b4"}
    styles = ["-", "--", ":"]
    for prec in sens["precisions"]:
        for j, kind in enumerate(kinds):
            ys = [table.get(f"layers.{i}.{kind}", {}).get(prec) for i in layers]
            ax.plot(layers, ys, styles[j % 3], marker="o", ms=3, color=colors.get(prec, "#555"),
                    label=f"{kind} {prec}")
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("KL vs fp32 when only this part is quantized\n(nats/token, log)")
    ax.set_title(f"Per-part sensitivity (INT4 {sens.get('int4_method', 'rtn').upper()}, "
                 f"group {sens.get('group_size')}; {sens.get('tokens')} tokens)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return _png(fig)


def curve_png(curve: dict[str, Any]) -> bytes:
    """KL mean (with its 95% CI) against the number of calibration samples."""
    fig = _figure((6.0, 3.8))
    ax = fig.add_subplot()
    pts = sorted(curve["points"], key=lambda p: p["samples"])
    xs = [p["samples"] for p in pts]
    ys = [p["kl_mean"]["value"] for p in pts]
    lo = [p["kl_mean"]["value"] - p["kl_mean"]["ci95"][0] for p in pts]
    hi = [p["kl_mean"]["ci95"][1] - p["kl_mean"]["value"] for p in pts]
    ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=4, color="#1f77b4", label=curve["variant"])
    if curve.get("rtn_kl_mean") is not None:
        ax.axhline(curve["rtn_kl_mean"], color="#d62728", ls="--", label="same scheme, RTN (no calibration)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("calibration samples")
    ax.set_ylabel("KL mean vs fp32 (nats/token)")
    ax.set_title(f"Calibration size ({curve['prompts']} held-out prompts)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def cache_curve_png(calibration: dict[str, Any]) -> bytes:
    """The semantic cache's hit rate against its false-hit rate (and the latter's 95% upper bound) on the
    held labeled pairs as the cosine threshold moves, the calibrated setting marked."""
    fig = _figure((6.0, 3.8))
    ax = fig.add_subplot()
    pts = calibration["curve"]
    ax.plot([p["false_hit_rate"] for p in pts], [p["hit_rate"] for p in pts], marker=".", color="#1f77b4",
            label="false-hit rate")
    ax.plot([p["false_hit_upper95"] for p in pts], [p["hit_rate"] for p in pts], ls="--", color="#7f7f7f",
            label="its 95% upper bound")
    held = calibration["held"]["overall"]
    ax.scatter([held["false_hit_upper95"]], [held["hit_rate"]], color="#d62728", zorder=3,
               label=f"calibrated (threshold {calibration['setting']['threshold']:.2f})")
    ax.axvline(calibration.get("max_false_hit", 0.01), color="#d62728", ls=":", lw=1)
    ax.set_xlabel("false hits / near-miss pairs")
    ax.set_ylabel("hits / same-answer pairs")
    ax.set_title("Semantic cache: held labeled pairs")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)
