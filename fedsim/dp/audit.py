"""One-run privacy auditing: an ε lower bound from guesses about canaries.

After Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS
2023, arXiv:2305.08846). Each of m canaries is included with probability 1/2, independently;
after one training run an auditor guesses "in" for the r canaries it is surest of, "out" for
the s it is least sure of, and abstains on the rest. The paper's main theorem (Section 3)
bounds, for an (ε, δ)-DP mechanism, the chance of ``v`` or more correct out of ``k = r + s``
guesses, with W ~ Binomial(k, e^ε / (1 + e^ε)) (ε-DP randomized response)::

    p(ε) = P[W ≥ v] + 2 m δ · max_{1 ≤ i ≤ v} P[v > W ≥ v - i] / i

The audit's lower bound at confidence 1 - β is the largest ε found with p(ε) < β: the
guesses refute the (ε, δ) claim, hence every smaller ε too. This is what the paper's Python
code (its Appendix D: ``p_value_DP_audit``, ``get_eps_audit``) and google-deepmind/
jax_privacy (``jax_privacy/auditing.py``: ``_one_run_p_value``, ``_epsilon_one_run``)
compute, with math and numpy in place of scipy. Pure functions, no I/O.

The ceiling: r guesses, all correct, δ = 0, give p(ε) = q^r, so the bound can never exceed
``epsilon_ceiling`` = log(β^(1/r) / (1 - β^(1/r))) ≈ log(r / ln(1/β)), e.g. 5.81 for
r = m = 1000 canaries at β = 0.05; δ > 0 lowers it further.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from statistics import NormalDist
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from fedsim.errors import FedsimError


class OneRunAudit(NamedTuple):
    """The best audit ``best_guesses`` found: its ε bound and the guesses behind it."""

    epsilon: float
    guessed_in: int
    guessed_out: int


@functools.lru_cache(maxsize=8)
def _log_factorials(n: int) -> npt.NDArray[np.float64]:
    table = np.array([math.lgamma(k + 1.0) for k in range(n + 1)])
    table.flags.writeable = False  # shared through the cache
    return table


def _binomial_pmf(k: int, epsilon: float) -> npt.NDArray[np.float64]:
    """P[W = j] for j = 0..k, W ~ Binomial(k, e^ε / (1 + e^ε)), in log space to stay exact."""
    # a power-of-two table size lets one cached table serve many k
    lf = _log_factorials(1 << k.bit_length())
    j = np.arange(k + 1)
    log_q = -math.log1p(math.exp(-epsilon))  # log e^ε/(1+e^ε), finite for large ε
    log_not_q = log_q - epsilon
    log_pmf = lf[k] - lf[j] - lf[k - j] + j * log_q + (k - j) * log_not_q
    return np.exp(log_pmf)


def _p_value(guesses: int, correct: int, epsilon: float, delta: float, canaries: int) -> float:
    if correct == 0:
        return 1.0
    pmf = _binomial_pmf(guesses, epsilon)
    tail = float(pmf[correct:].sum())  # P[W >= v]
    if delta == 0:
        return min(tail, 1.0)
    # running sums P[v > W >= v - i] for i = 1..v, as the paper's loop accumulates them
    below = np.cumsum(pmf[correct - 1 :: -1])
    alpha = float(np.max(below / np.arange(1, correct + 1)))
    return min(tail + alpha * delta * 2 * canaries, 1.0)


def _largest_rejected(k: int, v: int, delta: float, m: int, beta: float, floor: float) -> float:
    """The largest ε ≥ ``floor`` with p(ε) < β (bisection, as the paper's code), else floor."""
    if _p_value(k, v, floor, delta, m) >= beta:
        return floor
    lo, hi = floor, floor + 1.0
    while _p_value(k, v, hi, delta, m) < beta:  # p -> 1 as ε grows, so this ends
        lo, hi = hi, 2.0 * hi
    for _ in range(100):
        if hi - lo <= 1e-10 * hi:
            break
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _p_value(k, v, mid, delta, m) < beta else (lo, mid)
    return lo  # p(lo) < β always holds: the bound errs low, never high


def _whole(name: str, value: int) -> int:
    # numpy integers count; bools and floats are mistakes
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise FedsimError(f"{name} must be a whole number, got {value!r}")
    return int(value)


def _check(
    guesses: int, correct: int, delta: float, beta: float, canaries: int
) -> tuple[int, int, int]:
    guesses, correct = _whole("guesses", guesses), _whole("correct", correct)
    canaries = _whole("canaries", canaries)
    if not 0 <= correct <= guesses:
        raise FedsimError(f"correct guesses ({correct}) must be in 0..guesses ({guesses})")
    if guesses > canaries:
        raise FedsimError(f"guesses ({guesses}) cannot exceed canaries ({canaries})")
    if not 0.0 <= delta < 1.0:
        raise FedsimError(f"delta must be in [0, 1), got {delta}")
    if not 0.0 < beta < 1.0:
        raise FedsimError(f"beta (1 - confidence) must be in (0, 1), got {beta}")
    return guesses, correct, canaries


def one_run_p_value(
    *, guesses: int, correct: int, epsilon: float, delta: float, canaries: int
) -> float:
    """Bound on P[≥ ``correct`` of ``guesses`` right] for an (ε, δ)-DP mechanism.

    Parameters are as in ``one_run_epsilon``, with the claim's ``epsilon`` (finite, ≥ 0)
    and ``canaries`` required. Returns the p-value of the claim: small values refute it.
    """
    guesses, correct, canaries = _check(guesses, correct, delta, 0.5, canaries)
    if not 0.0 <= epsilon < math.inf:
        raise FedsimError(f"epsilon must be finite and >= 0, got {epsilon}")
    return _p_value(guesses, correct, epsilon, delta, canaries)


def one_run_epsilon(
    *, guesses: int, correct: int, delta: float, beta: float = 0.05, canaries: int | None = None
) -> float:
    """ε lower bound at confidence 1 - β from ``correct`` right of ``guesses`` guesses.

    Parameters
    ----------
    guesses, correct : int
        Guesses made (abstentions excluded) and how many were right. The guesses must be
        fixed before membership is seen; see ``best_guesses`` for choosing them.
    delta : float
        δ of the (ε, δ) claims refuted; in [0, 1).
    beta : float
        1 - confidence, in (0, 1).
    canaries : int, optional
        m, the canaries each included with probability 1/2. Needed when δ > 0, since
        δ's term grows with m; with δ = 0 it only bounds ``guesses``.

    Returns
    -------
    float
        The largest ε with p(ε) < β; 0.0 where the guesses refute no positive ε.

    """
    if canaries is None:
        if delta > 0:
            raise FedsimError("canaries (m) is needed for delta > 0: its term is 2·m·δ")
        canaries = guesses
    guesses, correct, canaries = _check(guesses, correct, delta, beta, canaries)
    return _largest_rejected(guesses, correct, delta, canaries, beta, 0.0)


def epsilon_ceiling(*, guesses: int, beta: float = 0.05) -> float:
    """The largest bound ``guesses`` guesses can give (all right, δ = 0): the ceiling.

    0.0 below log2(1/β) guesses (5 at β = 0.05): so few cannot refute even ε = 0.
    """
    if _whole("guesses", guesses) < 1 or not 0.0 < beta < 1.0:
        raise FedsimError(f"need guesses >= 1 and beta in (0, 1), got {guesses}, {beta}")
    q = beta ** (1.0 / guesses)  # q^r = β: the accuracy at which r right is a β event
    return max(0.0, math.log(q / (1.0 - q)))


def best_guesses(
    scores: npt.ArrayLike,
    included: npt.ArrayLike,
    *,
    delta: float,
    beta: float = 0.05,
    candidates: Sequence[tuple[int, int]] | None = None,
) -> OneRunAudit:
    """The best ε bound over several guess counts, valid at confidence 1 - β overall.

    The paper's theorem holds for guess counts fixed in advance; trying several on one run
    and keeping the best is a multiple test, so each runs at β / len(candidates), a union
    (Bonferroni) bound, as jax_privacy's default ``Bonferroni`` threshold strategy does.

    Parameters
    ----------
    scores, included : array_like
        Per canary: a finite score, higher meaning more likely included (ties are broken by
        position, never by membership), and whether it was in the training data.
    delta, beta : float
        As in ``one_run_epsilon``; β is shared among the candidates.
    candidates : sequence of (int, int), optional
        (r, s): guess "in" for the r highest scores, "out" for the s lowest. By default
        s = 0 (as jax_privacy) and r on a geometric grid, m down to 1, four per doubling.

    Returns
    -------
    OneRunAudit
        (epsilon, guessed_in, guessed_out); (0.0, 0, 0) where no candidate refutes ε > 0.

    """
    score = np.asarray(scores, dtype=float).ravel()
    member = np.asarray(included, dtype=bool).ravel()
    m = score.size
    if member.size != m or m == 0 or not np.isfinite(score).all():
        raise FedsimError(f"need one finite score per membership, got {m} for {member.size}")
    pairs = np.array(candidates if candidates is not None else default_candidates(m))
    if pairs.ndim != 2 or pairs.size == 0 or pairs.dtype.kind not in "iu" or pairs.shape[1] != 2:
        raise FedsimError("candidates must be a non-empty list of whole-number (r, s) pairs")
    if (pairs < 0).any() or (pairs.sum(1) > m).any():
        raise FedsimError(f"candidates (r, s) need r, s >= 0 and r + s <= {m} canaries")
    _check(0, 0, delta, beta, m)
    hits = member[np.argsort(-score, kind="stable")]
    top_in = np.concatenate([[0], np.cumsum(hits)])  # included among the r highest
    bottom_out = np.concatenate([[0], np.cumsum(~hits[::-1])])  # excluded among the s lowest
    v = top_in[pairs[:, 0]] + bottom_out[pairs[:, 1]]
    return _sweep(pairs.sum(1), v, pairs, delta, m, beta / len(pairs))


def default_candidates(m: int) -> list[tuple[int, int]]:
    """The (r, s) guess counts ``best_guesses`` tries for m canaries: β is shared by them.

    Four "in" counts per doubling, m down to 1, and no "out" guesses: the union bound's
    share stays large (about β / 4·log2(m)), where every r = 1..m would divide β by m.
    """
    steps = np.arange(int(4 * math.log2(m)) + 1)
    counts = np.unique(np.maximum(np.round(m * 2.0 ** (-steps / 4)), 1).astype(int))
    return [(int(r), 0) for r in counts]


def _sweep(
    k: npt.NDArray[np.int64],
    v: npt.NDArray[np.int64],
    pairs: npt.NDArray[np.int64],
    delta: float,
    m: int,
    share: float,
) -> OneRunAudit:
    # Wilson lower bounds on accuracy put the likely best first; the order is only for speed
    z = NormalDist().inv_cdf(1.0 - min(share, 0.5))
    n = np.maximum(k, 1)
    p = v / n
    spread = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    order = np.argsort(-(p + z * z / (2 * n) - spread) / (1 + z * z / n), kind="stable")
    best = OneRunAudit(0.0, 0, 0)
    for i in order:
        # accuracy at most e^ε/(1+e^ε) makes P[W >= v] >= 1/2 (binomial median), > share
        if k[i] == 0 or (share < 0.5 and v[i] <= k[i] / (1.0 + math.exp(-best.epsilon))):
            continue
        eps = _largest_rejected(int(k[i]), int(v[i]), delta, m, share, best.epsilon)
        if eps > best.epsilon:
            best = OneRunAudit(eps, int(pairs[i, 0]), int(pairs[i, 1]))
    return best
