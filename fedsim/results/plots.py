"""Figures rebuilt from result files: a run's accuracy and ε per round, and a frontier.

Each figure is written, atomically, as PNG and as SVG beside it (vector, for papers).
Figures are built without pyplot: no backend, no window, no global state.
"""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path
from typing import Any

from matplotlib import ticker
from matplotlib.figure import Figure

from fedsim.results import files
from fedsim.results.report import format_epsilon, summary_line
from fedsim.results.schema import Result

FORMATS = ("png", "svg")


def plot_run(result: Result) -> list[Path]:
    """Accuracy and ε against round, titled with the run's whole summary line."""
    xs = [r.round for r in result.rounds]
    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    ax = fig.subplots()
    ax.plot(xs, [r.accuracy for r in result.rounds], "o-", color="tab:blue")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_ylabel("test accuracy", color="tab:blue")
    ax.set_ylim(0, 1)
    summary = result.summary
    if summary["privacy_unit"] != "none":
        ax2 = ax.twinx()
        ax2.plot(xs, [r.epsilon for r in result.rounds], "s--", color="tab:red")
        unit, delta = summary["privacy_unit"], summary["delta"]
        ax2.set_ylabel(f"ε (one {unit}, δ={delta:g}, {summary['accountant']})", color="tab:red")
    title = f"{summary['config']['name']}: {summary_line(summary)}"
    ax.set_title("\n".join(textwrap.wrap(title, 100)), fontsize=7)
    return _save(fig, result.path / Path(files.PLOT).stem)


def plot_frontier(rows: list[dict], out: Path) -> list[Path]:
    """Accuracy (mean ± std over seeds) against ε on a log axis, one line per unit."""
    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    ax = fig.subplots()
    for unit in sorted({r["unit"] for r in rows} - {"none"}):
        pts = [r for r in rows if r["unit"] == unit]
        ax.errorbar(
            [r["epsilon"] for r in pts],
            [r["accuracy_mean"] for r in pts],
            yerr=[r["accuracy_std"] for r in pts],
            marker="o",
            capsize=3,
            label=f"one {unit} (δ={pts[0]['delta']}, {pts[0]['accountant']}, {pts[0]['noise']})",
        )
    for r in rows:
        if r["unit"] == "none":
            ax.axhline(r["accuracy_mean"], linestyle="--", color="gray", label="no DP")
    _plot_audits(ax, [r for r in rows if r.get("audit_epsilon", "") != ""])
    ax.set_xscale("log")
    epsilons = sorted({r["epsilon"] for r in rows if r["unit"] != "none"})
    ax.xaxis.set_major_locator(ticker.FixedLocator(epsilons))  # every ε run is labelled
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda eps, _: format_epsilon(eps)))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("ε of each run alone (frontier.md: the seeds pooled, composed)")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=7)
    return _save(fig, out)


def _plot_audits(ax: Any, rows: list[dict]) -> None:
    """Each audited point's measured bound, at its accuracy, joined to its reported ε.

    A bound of 0 (nothing refuted) cannot sit on a log axis: its point gets a label instead.
    """
    shown = [r for r in rows if r["audit_epsilon"] > 0]
    for r in shown:
        if not math.isinf(r["epsilon"]):
            ax.plot([r["audit_epsilon"], r["epsilon"]], [r["accuracy_mean"]] * 2, ":", color="k")
    if shown:
        conf = shown[0]["audit_confidence"]
        ax.plot(
            [r["audit_epsilon"] for r in shown],
            [r["accuracy_mean"] for r in shown],
            "x",
            color="k",
            label=f"audit: measured ε lower bound ({conf:.0%})",
        )
    for r in rows:
        if r["audit_epsilon"] == 0 and not math.isinf(r["epsilon"]):
            ax.annotate("audit 0", (r["epsilon"], r["accuracy_mean"]), fontsize=6)


def _save(fig: Figure, stem: Path) -> list[Path]:
    fig.tight_layout()
    paths = [stem.with_suffix(f".{fmt}") for fmt in FORMATS]
    for path in paths:
        buf = io.BytesIO()
        fig.savefig(buf, format=path.suffix[1:])
        files.write_atomic(path, buf.getvalue())
    return paths
