"""One-run auditing (Steinke, Nasr & Jagielski 2023) against independent computations."""

import functools
import itertools
import math
from fractions import Fraction
from statistics import NormalDist

import numpy as np
import pytest

from fedsim.dp.audit import (
    OneRunAudit,
    best_guesses,
    epsilon_ceiling,
    one_run_epsilon,
    one_run_p_value,
)
from fedsim.errors import FedsimError


def exact_p_value(r, v, q, delta, m):
    """The paper's p-value (its Appendix D loop) in exact rational arithmetic, q rational."""
    pmf = [math.comb(r, k) * q**k * (1 - q) ** (r - k) for k in range(r + 1)]
    beta = sum(pmf[v:], Fraction(0))
    alpha, total = Fraction(0), Fraction(0)
    for i in range(1, v + 1):
        total += pmf[v - i]
        alpha = max(alpha, total / i)
    return min(beta + alpha * Fraction(delta) * 2 * m, Fraction(1))


def reference_eps(m, r, v, delta, p):
    """``get_eps_audit`` of the paper's Appendix D, rewritten with math.comb for scipy."""

    def p_value(eps):
        q = 1 / (1 + math.exp(-eps))
        pmf = [math.comb(r, k) * q**k * (1 - q) ** (r - k) for k in range(r + 1)]
        beta = math.fsum(pmf[v:])
        alpha, total = 0.0, 0.0
        for i in range(1, v + 1):
            total += pmf[v - i]
            alpha = max(alpha, total / i)
        return min(beta + alpha * delta * 2 * m, 1)

    eps_min, eps_max = 0.0, 1.0
    while p_value(eps_max) < p:
        eps_max += 1
    for _ in range(30):
        eps = (eps_min + eps_max) / 2
        eps_min, eps_max = (eps, eps_max) if p_value(eps) < p else (eps_min, eps)
    return eps_min


# ε = log 3 makes the guess accuracy e^ε/(1+e^ε) exactly 3/4
@pytest.mark.parametrize(("r", "v"), [(1, 1), (10, 10), (60, 45), (60, 52), (200, 170)])
@pytest.mark.parametrize("delta", [0.0, 1e-5, 1e-3])
def test_p_value_matches_exact_rational_arithmetic(r, v, delta):
    m = 2 * r
    got = one_run_p_value(guesses=r, correct=v, epsilon=math.log(3), delta=delta, canaries=m)
    want = exact_p_value(r, v, Fraction(3, 4), delta, m)
    assert got == pytest.approx(float(want), rel=1e-10)


@pytest.mark.parametrize(
    ("m", "r", "v", "delta"),
    [(100, 20, 20, 0.0), (100, 100, 80, 0.0), (100, 100, 80, 1e-4), (300, 150, 140, 1e-5)],
)
def test_epsilon_matches_papers_code(m, r, v, delta):
    got = one_run_epsilon(guesses=r, correct=v, delta=delta, beta=0.05, canaries=m)
    assert got == pytest.approx(reference_eps(m, r, v, delta, 0.05), abs=1e-7)


def test_delta_zero_bound_is_where_the_binomial_tail_crosses_beta():
    eps = one_run_epsilon(guesses=80, correct=70, delta=0.0, beta=0.05)

    def tail(e):
        q = 1 / (1 + math.exp(-e))
        return math.fsum(math.comb(80, k) * q**k * (1 - q) ** (80 - k) for k in range(70, 81))

    assert tail(eps) < 0.05 <= tail(eps + 1e-6)


def test_ceiling_closed_form_and_values():
    # all r guesses right at δ = 0: p = q^r, so the bound solves q = β^(1/r)
    for r in (1, 10, 100, 1000):
        got = one_run_epsilon(guesses=r, correct=r, delta=0.0)
        assert got == pytest.approx(epsilon_ceiling(guesses=r), rel=1e-8)
    # m = 1000 canaries at 95%: no audit can show more than ε ≈ 5.81, ≈ log(m / ln 20)
    assert epsilon_ceiling(guesses=1000, beta=0.05) == pytest.approx(5.8091, abs=1e-4)
    assert epsilon_ceiling(guesses=10, beta=0.05) == pytest.approx(1.0519, abs=1e-4)
    # fewer than log2(1/β) guesses cannot refute even ε = 0: 5 are needed at β = 0.05
    assert epsilon_ceiling(guesses=4) == one_run_epsilon(guesses=4, correct=4, delta=0.0) == 0.0
    assert epsilon_ceiling(guesses=5) > 0
    # δ > 0 can only lower the ceiling
    assert one_run_epsilon(guesses=1000, correct=1000, delta=1e-5, canaries=1000) < 5.8091


def test_monotone_in_correct_confidence_and_delta():
    by_correct = [one_run_epsilon(guesses=200, correct=v, delta=0.0) for v in range(100, 201, 5)]
    assert all(a <= b for a, b in itertools.pairwise(by_correct))
    assert by_correct[0] == 0.0 and by_correct[-1] > 0
    by_beta = [one_run_epsilon(guesses=200, correct=180, delta=0.0, beta=b) for b in (0.2, 0.05)]
    assert (
        by_beta[0] > by_beta[1] > one_run_epsilon(guesses=200, correct=180, delta=0.0, beta=0.001)
    )
    by_delta = [
        one_run_epsilon(guesses=200, correct=180, delta=d, canaries=1000) for d in (0.0, 1e-6, 1e-4)
    ]
    assert by_delta[0] > by_delta[1] > by_delta[2]


def test_numpy_integers_are_accepted():
    plain = one_run_epsilon(guesses=100, correct=90, delta=1e-5, canaries=200)
    counts = {"guesses": np.int64(100), "correct": np.int32(90), "canaries": np.int64(200)}
    assert one_run_epsilon(delta=1e-5, **counts) == plain


def test_no_evidence_gives_zero():
    assert one_run_epsilon(guesses=0, correct=0, delta=0.0) == 0.0
    assert one_run_epsilon(guesses=100, correct=50, delta=0.0) == 0.0
    assert one_run_epsilon(guesses=100, correct=0, delta=1e-5, canaries=100) == 0.0


def _deterministic_normal(mu, n):
    inverse = NormalDist().inv_cdf
    return np.array([inverse((i + 0.5) / n) for i in range(n)]) + mu


def _upper_hull(points):
    """Andrew's monotone chain: the (fn, tn) points jax_privacy keeps as thresholds."""
    hull = []
    for p in points:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x2) - (p[1] - y2) * (x2 - x1) > 0:
                break
            hull.pop()
        hull.append(p)
    return hull


# google-deepmind/jax_privacy tests/auditing_test.py, test_epsilon_one_run_close:
# 10,000 in and 10,000 out canaries with deterministic N(shift, 1) / N(0, 1) scores,
# significance 0.05, δ = 1e-6, "in" guesses above each threshold of the ROC hull, with a
# Bonferroni share of β per threshold
@pytest.mark.parametrize(
    ("shift", "expected"), [(0, 0.0), (1, 1.13346), (2, 2.311945), (4, 4.395568)]
)
def test_matches_jax_privacy_worked_numbers(shift, expected):
    n = 10_000
    held_in, held_out = _deterministic_normal(shift, n), _deterministic_normal(0, n)
    thresholds = np.concatenate([np.union1d(held_in, held_out), [np.inf]])
    fn = np.searchsorted(np.sort(held_in), thresholds, side="left")
    tn = np.searchsorted(np.sort(held_out), thresholds, side="left")
    hull = _upper_hull(list(zip(fn.tolist(), tn.tolist(), strict=True)))
    candidates = [(2 * n - f - t, 0) for f, t in hull]
    scores = np.concatenate([held_in, held_out])
    included = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    got = best_guesses(scores, included, delta=1e-6, beta=0.05, candidates=candidates)
    assert got.epsilon == pytest.approx(expected, rel=1e-5, abs=1e-9)


def _randomized_response(rng, m, epsilon, delta=0.0):
    """An (ε, δ)-DP release of each canary's membership: ε-RR, or the truth with prob. δ."""
    included = rng.random(m) < 0.5
    keep = rng.random(m) < 1 / (1 + math.exp(-epsilon))
    out = np.where(keep, included, ~included)
    return included, np.where(rng.random(m) < delta, included, out)


@pytest.mark.parametrize(("epsilon", "delta"), [(1.0, 0.0), (2.0, 1e-4)])
def test_bound_exceeds_true_epsilon_at_most_beta_of_the_time(epsilon, delta):
    rng = np.random.default_rng(15)
    m, trials, beta = 200, 3000, 0.05
    audit = functools.cache(
        lambda v: one_run_epsilon(guesses=m, correct=v, delta=delta, beta=beta, canaries=m)
    )
    wrong = 0
    for _ in range(trials):
        included, released = _randomized_response(rng, m, epsilon, delta)
        wrong += audit(int((released == included).sum())) > epsilon
    assert wrong / trials <= beta + 0.01


def test_best_guesses_stays_valid_across_its_candidates():
    rng = np.random.default_rng(16)
    m, trials, beta, epsilon = 256, 200, 0.1, 1.0
    wrong = 0
    for _ in range(trials):
        included, released = _randomized_response(rng, m, epsilon)
        scores = released + rng.random(m) * 0.5  # post-processing: ties broken at random
        wrong += best_guesses(scores, included, delta=0.0, beta=beta).epsilon > epsilon
    assert wrong / trials <= beta + 0.03


def test_leaky_mechanism_gives_a_clearly_positive_bound():
    rng = np.random.default_rng(17)
    included, released = _randomized_response(rng, 1000, 8.0)
    audit = best_guesses(released.astype(float), included, delta=1e-5, beta=0.05)
    # "in" guesses only: about m/2 = 500 of them, so the ceiling is that of 500 guesses
    assert 3.0 < audit.epsilon < epsilon_ceiling(guesses=500)
    scores = rng.normal(np.where(included, 3.0, 0.0), 1.0)
    two_sided = [(r, s) for r in (50, 100, 200) for s in (50, 100, 200)]
    both = best_guesses(scores, included, delta=1e-5, candidates=two_sided)
    assert both.epsilon > 1.5 and both.guessed_in > 0 and both.guessed_out > 0


def test_best_guesses_counts_correct_guesses_from_both_ends():
    scores = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    included = [1, 1, 1, 0, 1, 0, 1, 0, 0, 0]
    # r = 3 "in" (all right) and s = 3 "out" (all right): 6 of 6, one candidate, full β
    got = best_guesses(scores, included, delta=0.0, beta=0.05, candidates=[(3, 3)])
    assert got == OneRunAudit(one_run_epsilon(guesses=6, correct=6, delta=0.0), 3, 3)
    assert got.epsilon == pytest.approx(epsilon_ceiling(guesses=6))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"guesses": 10, "correct": 11, "delta": 0.0},
        {"guesses": 10, "correct": -1, "delta": 0.0},
        {"guesses": 10, "correct": 5, "delta": 0.0, "beta": 0.0},
        {"guesses": 10, "correct": 5, "delta": 0.0, "beta": 1.0},
        {"guesses": 10, "correct": 5, "delta": -0.1, "canaries": 10},
        {"guesses": 10, "correct": 5, "delta": 1.0, "canaries": 10},
        {"guesses": 10, "correct": 5, "delta": 1e-5},
        {"guesses": 10, "correct": 5, "delta": 0.0, "canaries": 9},
        {"guesses": 10.0, "correct": 5, "delta": 0.0},
        {"guesses": 10, "correct": True, "delta": 0.0},
        {"guesses": 10, "correct": 5, "delta": float("nan"), "canaries": 10},
    ],
)
def test_invalid_input_is_one_line_fedsim_error(kwargs):
    with pytest.raises(FedsimError) as info:
        one_run_epsilon(**kwargs)
    assert "\n" not in str(info.value)


def test_invalid_best_guesses_and_p_value_input():
    with pytest.raises(FedsimError, match="membership"):
        best_guesses([1.0, 2.0], [True], delta=0.0)
    with pytest.raises(FedsimError, match="finite"):
        best_guesses([1.0, float("nan")], [True, False], delta=0.0)
    for bad in ([(2, 1)], [(-1, 0)], [(1.5, 0)], [], [(1, 0, 0)]):
        with pytest.raises(FedsimError, match="candidates"):
            best_guesses([1.0, 2.0], [True, False], delta=0.0, candidates=bad)
    with pytest.raises(FedsimError, match="delta"):
        best_guesses([1.0, 2.0], [True, False], delta=1.0)
    with pytest.raises(FedsimError, match="epsilon"):
        one_run_p_value(guesses=2, correct=1, epsilon=-1.0, delta=0.0, canaries=2)
    with pytest.raises(FedsimError, match="beta"):
        epsilon_ceiling(guesses=5, beta=1.5)
