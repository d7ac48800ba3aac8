"""Tables and plots rebuilt from a run's result files alone."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

from fedsim.results import files


def load_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """(summary, rounds) of a finished run, numbers parsed."""
    summary = json.loads((run_dir / files.SUMMARY).read_text(encoding="utf-8"))
    rounds = [
        {
            k: (float(v) if k in ("accuracy", "loss", "epsilon", "seconds") else v)
            for k, v in r.items()
        }
        for r in files.read_csv(run_dir / files.ROUNDS)
    ]
    return summary, rounds


def format_epsilon(eps: float | None) -> str:
    """ε for humans: ∞ for non-private training."""
    return "∞" if eps is None or math.isinf(eps) else f"{eps:.3g}"


def round_table(rounds: list[dict]) -> str:
    """Plain-text table of accuracy against ε spent, one line per round."""
    lines = [f"{'round':>5}  {'accuracy':>8}  {'loss':>7}  {'epsilon':>8}  {'seconds':>7}"]
    for r in rounds:
        lines.append(
            f"{r['round']:>5}  {r['accuracy']:>8.4f}  {r['loss']:>7.4f}  "
            f"{format_epsilon(r['epsilon']):>8}  {r['seconds']:>7.2f}"
        )
    return "\n".join(lines)


def summary_line(summary: dict) -> str:
    """One line: final accuracy and each ε with its unit, δ and accountant."""
    if summary["privacy_unit"] == "none":
        return f"accuracy {summary['accuracy']:.4f} without differential privacy (ε = ∞)"
    sigma = {"sample": summary["noise_multiplier"], "user": summary.get("user_noise_multiplier")}
    parts = [
        f"ε = {eps:.3f} for one {unit} (σ = {sigma[unit]:.4f})"
        for unit, eps in summary["epsilon_by_unit"].items()
    ]
    parts += [
        f"ε = {g['epsilon']:.3f} for one example replaced ({g['accountant']})"
        for g in summary.get("guarantees", [])
        if g.get("implied_by") == "user"
    ]
    return (
        f"accuracy {summary['accuracy']:.4f} at {', '.join(parts)} "
        f"(δ = {summary['delta']:g}, accountant: {summary['accountant']}); {noise_words(summary)}"
    )


def noise_words(summary: dict) -> str:
    """Which noise the run used, and what that means for a reader."""
    kind = summary.get("noise", {}).get("kind", "seeded")
    if kind == "secure":
        return "secure noise (from the OS; no one can recompute it)"
    seed = summary["config"]["seed"]
    return f"seeded noise (seed {seed}: whoever knows it can remove the noise)"


def plot_run(run_dir: Path) -> Path:
    """Write the accuracy-and-ε-per-round plot of ``run_dir``; return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, rounds = load_run(run_dir)
    xs = [int(r["round"]) for r in rounds]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(xs, [r["accuracy"] for r in rounds], "o-", color="tab:blue", label="test accuracy")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy", color="tab:blue")
    ax.set_ylim(0, 1)
    if summary["privacy_unit"] != "none":
        ax2 = ax.twinx()
        ax2.plot(xs, [r["epsilon"] for r in rounds], "s--", color="tab:red", label="ε")
        ax2.set_ylabel(
            f"ε (unit: {summary['privacy_unit']}, δ={summary['delta']:g}, {summary['accountant']})",
            color="tab:red",
        )
    title = f"{summary['config']['name']}: {summary_line(summary)}"
    ax.set_title("\n".join(textwrap.wrap(title, 110)), fontsize=7)
    fig.tight_layout()
    out = run_dir / files.PLOT
    fig.savefig(out)
    plt.close(fig)
    return out
