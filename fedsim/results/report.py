"""Text of a run rebuilt from its result files alone: the round table and summary line."""

from __future__ import annotations

import math

from fedsim.results.schema import RoundRow


def format_epsilon(eps: float | None) -> str:
    """ε for humans: ∞ for non-private training."""
    return "∞" if eps is None or math.isinf(eps) else f"{eps:.3g}"


def round_table(rounds: list[RoundRow]) -> str:
    """Plain-text table of accuracy against ε spent, one line per round."""
    lines = [f"{'round':>5}  {'accuracy':>8}  {'loss':>7}  {'epsilon':>8}  {'seconds':>7}"]
    for r in rounds:
        lines.append(
            f"{r.round:>5}  {r.accuracy:>8.4f}  {r.loss:>7.4f}  "
            f"{format_epsilon(r.epsilon):>8}  {r.seconds:>7.2f}"
        )
    return "\n".join(lines)


def audit_words(summary: dict) -> str:
    """Each audited unit's measured bound in words, or "" where the run had no canaries."""
    words = ""
    for audit in (summary.get("audit") or {}).values():
        words += (
            f"; audited: ε ≥ {audit['epsilon']:.3f} for one {audit['unit']} at "
            f"{audit['confidence']:.0%} confidence ({audit['correct']} of {audit['guesses']} "
            f"guesses right, {audit['canaries']} canaries, ceiling {audit['ceiling']:.2f})"
        )
        if audit.get("estimate") is not None:
            words += f", estimate ε ≈ {audit['estimate']:.3f} (Andrew et al., no confidence)"
    return words


def summary_line(summary: dict) -> str:
    """One line: final accuracy, each ε with its unit, δ and accountant, and the noise.

    A run with canaries ends with the audit's measured ε lower bound.
    """
    if summary["privacy_unit"] == "none":
        line = f"accuracy {summary['accuracy']:.4f} without differential privacy (ε = ∞)"
        return line + audit_words(summary)
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
        f"{audit_words(summary)}"
    )


def noise_words(summary: dict) -> str:
    """Which noise the run used, and what that means for a reader."""
    kind = summary.get("noise", {}).get("kind", "seeded")
    if kind == "secure":
        return "secure noise (from the OS; no one can recompute it)"
    seed = summary["config"]["seed"]
    return f"seeded noise (seed {seed}: whoever knows it can remove the noise)"
