"""The accuracy-versus-ε frontier, rebuilt from result folders alone."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from fedsim.results import files
from fedsim.results.report import format_epsilon, load_run

IGNORED = {"seed", "name", "out-dir"}  # keys that never make two runs different points
FIELDS = (
    "unit", "epsilon", "delta", "accountant", "accuracy_mean", "accuracy_std", "seeds",
    "noise_multiplier", "clip", "rounds", "clients_per_round", "num_clients", "noise", "runs",
)  # fmt: skip


def find_runs(paths: list[Path]) -> list[Path]:
    """Result folders among ``paths``: each path is a run, or a folder of runs (a sweep)."""
    runs = []
    for path in paths:
        if (path / files.SUMMARY).is_file():
            runs.append(path)
        elif path.is_dir():
            runs.extend(sorted(p for p in path.iterdir() if (p / files.SUMMARY).is_file()))
    return runs


def _point_key(summary: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in summary["config"].items() if k not in IGNORED))


def frontier(runs: list[Path]) -> list[dict]:
    """One row per distinct config (seeds pooled), sorted by ε, non-private last."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        summary, _ = load_run(run)
        groups.setdefault(_point_key(summary), []).append(summary | {"_dir": run.name})
    rows = [_row(group) for group in groups.values()]
    return sorted(rows, key=lambda r: (r["unit"] == "none", r["unit"], r["epsilon"]))


def _row(group: list[dict]) -> dict:
    first = group[0]
    unit = first["privacy_unit"]
    accs = [s["accuracy"] for s in group]
    user = unit == "user"
    return {
        "unit": unit,
        "epsilon": max(s["epsilon"] for s in group) if unit != "none" else math.inf,
        "delta": first["delta"] or "",
        "accountant": first["accountant"] or "",
        "accuracy_mean": round(statistics.fmean(accs), 4),
        "accuracy_std": round(statistics.stdev(accs), 4) if len(accs) > 1 else 0.0,
        "seeds": len(group),
        "noise_multiplier": round(
            first["user_noise_multiplier"] if user else first["noise_multiplier"], 4
        ),
        "clip": first["max_update_norm"] if user else first["max_grad_norm"] or "",
        "rounds": first["num_rounds"],
        "clients_per_round": first["config"]["clients-per-round"],
        "num_clients": first["num_clients"],
        "noise": first.get("noise", {}).get("kind", "seeded"),
        "runs": " ".join(sorted(s["_dir"] for s in group)),
    }


def markdown(rows: list[dict]) -> str:
    """The frontier as a Markdown table (what goes into docs and papers)."""
    cols = ["unit", "ε", "δ", "accountant", "accuracy (mean ± std)", "seeds", "σ", "clip"]
    cols += ["rounds", "cohort", "clients", "noise"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append(
            f"| {r['unit']} | {format_epsilon(r['epsilon'])} | {r['delta']} | {r['accountant']} "
            f"| {r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f} | {r['seeds']} "
            f"| {r['noise_multiplier']} | {r['clip']} | {r['rounds']} "
            f"| {r['clients_per_round']} | {r['num_clients']} | {r['noise']} |"
        )
    note = (
        "\nnoise: secure = from the operating system; seeded = from the config's seed, so the ε "
        "holds only against whoever does not know the seed.\n"
    )
    return "\n".join(lines) + "\n" + note


def write_frontier(rows: list[dict], out_dir: Path) -> list[Path]:
    """Write ``frontier.csv``, ``frontier.md`` and ``frontier.png`` into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    out_dir.mkdir(parents=True, exist_ok=True)
    csv_rows = [r | {"epsilon": "inf" if math.isinf(r["epsilon"]) else r["epsilon"]} for r in rows]
    files.write_csv(out_dir / "frontier.csv", csv_rows, FIELDS)
    files.write_atomic(out_dir / "frontier.md", markdown(rows))
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for unit in sorted({r["unit"] for r in rows} - {"none"}):
        pts = [r for r in rows if r["unit"] == unit]
        ax.errorbar(
            [r["epsilon"] for r in pts],
            [r["accuracy_mean"] for r in pts],
            yerr=[r["accuracy_std"] for r in pts],
            marker="o",
            capsize=3,
            label=f"unit: one {unit} (δ={pts[0]['delta']}, {pts[0]['accountant']})",
        )
    for r in rows:
        if r["unit"] == "none":
            ax.axhline(r["accuracy_mean"], linestyle="--", color="gray", label="no DP")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("ε")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "frontier.png")
    plt.close(fig)
    return [out_dir / n for n in ("frontier.csv", "frontier.md", "frontier.png")]
