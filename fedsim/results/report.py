"""Text of a run rebuilt from its result files alone: the round table and summary line."""

from __future__ import annotations

import math
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

from fedsim.results.schema import RoundRow


def format_epsilon(eps: float | None, *, places: int | None = None) -> str:
    """ε for humans, rounded up, so that no printed ε is below the one computed.

    3 significant digits, or ``places`` decimals; ∞ for non-private training. (Rounding to
    nearest printed 8.004 as "8".)
    """
    if eps is None or math.isinf(eps):
        return "∞"
    return _directed(eps, places, ROUND_CEILING)


def format_lower_bound(eps: float, *, places: int | None = None) -> str:
    """A measured lower bound on ε (an audit's), rounded down: never above the measured."""
    return _directed(eps, places, ROUND_FLOOR)


def _directed(value: float, places: int | None, rounding: str) -> str:
    # the shortest decimal that reads back as the same float: 2.77, not 2.7700000000000000177
    exact = Decimal(repr(float(value)))
    # 3 significant digits, as "%.3g" shows them; and for ε ≥ 1e6, which places would spell out
    if places is None or exact.adjusted() >= 6:
        if exact == 0:
            return "0"
        step = Decimal(1).scaleb(exact.adjusted() - 2)
        return f"{float(exact.quantize(step, rounding=rounding)):.3g}"
    return f"{exact.quantize(Decimal(1).scaleb(-places), rounding=rounding):.{places}f}"


def round_table(rounds: list[RoundRow]) -> str:
    """Plain-text table of accuracy against ε spent, one line per round."""
    lines = [f"{'round':>5}  {'accuracy':>8}  {'loss':>7}  {'epsilon':>8}  {'seconds':>7}"]
    for r in rounds:
        lines.append(
            f"{r.round:>5}  {r.accuracy:>8.4f}  {r.loss:>7.4f}  "
            f"{format_epsilon(r.epsilon):>8}  {'' if r.seconds is None else f'{r.seconds:.2f}':>7}"
        )
    return "\n".join(lines)


def audit_words(summary: dict) -> str:
    """Each audited unit's measured bound in words, or "" where the run had no canaries."""
    words = ""
    for audit in (summary.get("audit") or {}).values():
        bound = format_lower_bound(audit["epsilon"], places=3)
        words += (
            f"; audited: ε ≥ {bound} for one {audit['unit']} at "
            f"{audit['confidence']:.0%} confidence ({audit['correct']} of {audit['guesses']} "
            f"guesses right, {audit['canaries']} canaries, ceiling {audit['ceiling']:.2f})"
        )
        if audit["ceiling"] <= 0:  # not even perfect guesses could show ε > 0
            n = audit["canaries"]
            words += f"; with {n} canaries no number of guesses shows ε > 0: use more"
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
        f"ε = {format_epsilon(eps, places=3)} for one {unit} (σ = {sigma[unit]:.4f})"
        for unit, eps in summary["epsilon_by_unit"].items()
    ]
    parts += [implied_words(g) for g in summary.get("guarantees", []) if g.get("implied_by")]
    return (
        f"accuracy {summary['accuracy']:.4f} at {', '.join(parts)} "
        f"(δ = {summary['delta']:g}, accountant: {summary['accountant']}); {noise_words(summary)}"
        f"{audit_words(summary)}"
    )


def implied_words(guarantee: dict) -> str:
    """A guarantee that follows from another unit's, in words.

    From the user unit's: one example replaced. From the sample unit's, for a piece of
    data other than a sample (a character): its samples zeroed out (where it lies in
    several), or it changed (where it lies in one).
    """
    accountant = guarantee["accountant"]
    if guarantee["implied_by"] == "user":
        what = "example replaced"
    elif accountant == "pld-replace-one":
        what = f"{guarantee['unit']} changed"
    else:
        what = f"{guarantee['unit']}'s samples zeroed out"
    if guarantee["epsilon"] is None:  # its relation says why
        return f"no ε for one {guarantee['unit']}, which lies in several samples"
    return f"ε = {format_epsilon(guarantee['epsilon'], places=3)} for one {what} ({accountant})"


def noise_words(summary: dict) -> str:
    """Which noise the run used, and what that means for a reader."""
    kind = summary.get("noise", {}).get("kind", "seeded")
    if kind == "secure":
        return "secure noise (from the OS; no one can recompute it)"
    seed = summary["config"]["seed"]
    return f"seeded noise (seed {seed}: whoever knows it can remove the noise)"
