"""Accounting against an independent implementation: Google's dp-accounting."""

import functools
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp
from opacus.accountants import create_accountant

from fedsim.dp import accounting, solve
from fedsim.errors import FedsimError
from fedsim.messages import PrivacySpent
from fedsim.server import privacy

DELTA = 1e-5


def _event(sigma, q):
    return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))


def independent_rdp(history, delta):
    acc = rdp.RdpAccountant(accounting.RDP_ORDERS)
    for sigma, q, steps in history:
        acc.compose(_event(sigma, q), steps)
    return acc.get_epsilon(delta)


def independent_pld(history, delta, *, pessimistic):
    """PLD ε: pessimistic is an upper bound on the true ε, optimistic a lower bound."""
    return _pld_epsilon(tuple(history), delta, pessimistic)


@functools.lru_cache
def _pld_epsilon(history, delta, pessimistic):
    # equal mechanisms composed k times are one mechanism self-composed k times: the same
    # distribution, far fewer convolutions (the test's history is left as the ledger has it)
    merged = {}
    for sigma, q, steps in history:
        merged[(sigma, q)] = merged.get((sigma, q), 0) + steps
    total = None
    for (sigma, q), steps in merged.items():
        one = pld.privacy_loss_distribution.from_gaussian_mechanism(
            standard_deviation=sigma,
            sampling_prob=q,
            pessimistic_estimate=pessimistic,
            value_discretization_interval=1e-3 if pessimistic else 1e-4,
            use_connect_dots=pessimistic,
        ).self_compose(steps)
        total = one if total is None else total.compose(one)
    return total.get_epsilon_for_delta(delta)


def ledger_from(histories):
    ledger = {}
    for client, history in histories.items():
        for r, (sigma, q, steps) in enumerate(history, start=1):
            privacy.record(ledger, client, r, PrivacySpent((sigma,), (q,), (steps,)))
    return ledger


HISTORIES = {
    "one-round": [(1.0, 0.2, 5)],
    "many-rounds": [(1.1, 0.05, 20)] * 30,
    "mixed": [(0.9, 0.2, 5), (1.5, 0.01, 100), (0.9, 0.2, 5), (2.0, 0.1, 10)],
    "tiny-q": [(0.8, 0.004, 250)] * 10,
}


@pytest.mark.parametrize("name", sorted(HISTORIES))
def test_rdp_matches_independent_rdp(name):
    ledger = ledger_from({0: HISTORIES[name]})
    ours = privacy.client_epsilon(ledger[0], delta=DELTA, accountant="rdp")
    theirs = independent_rdp(HISTORIES[name], DELTA)
    assert ours == pytest.approx(theirs, rel=1e-3)


@pytest.mark.parametrize("name", sorted(HISTORIES))
def test_rdp_is_opacus_rdp_to_the_last_bit(name):
    # fedsim remembers each (σ, q)'s one-step RDP curve; Opacus recomputes it every call
    opacus = create_accountant(mechanism="rdp")
    opacus.history = list(HISTORIES[name])
    want = opacus.get_epsilon(delta=DELTA, alphas=accounting.RDP_ORDERS)
    grown = [*HISTORIES[name], (1.3, 0.07, 9)]  # a history that grew uses the remembered curves
    opacus.history = list(grown)
    want_grown = opacus.get_epsilon(delta=DELTA, alphas=accounting.RDP_ORDERS)
    assert accounting.history_epsilon(HISTORIES[name], delta=DELTA, accountant="rdp") == want
    assert accounting.history_epsilon(grown, delta=DELTA, accountant="rdp") == want_grown


@pytest.mark.parametrize(
    ("accountant", "relation"),
    [
        ("pld", dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE),
        (accounting.REPLACE_ONE, dp_accounting.NeighboringRelation.REPLACE_ONE),
    ],
)
def test_pld_is_dp_accounting_s_accountant_to_the_last_bit(accountant, relation):
    # fedsim remembers each (σ, q)'s one-step distribution; the accountant rebuilds it
    history = [*HISTORIES["mixed"], (1.3, 0.07, 9), (0.9, 0.0, 4)]  # q = 0: nothing happened
    theirs = pld.PLDAccountant(relation, value_discretization_interval=1e-3)
    for sigma, q, steps in history:
        theirs.compose(_event(sigma, q), steps)
    assert accounting.history_epsilon(history, delta=DELTA, accountant=accountant) == (
        theirs.get_epsilon(DELTA)
    )


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("name", sorted(HISTORIES))
def test_never_below_truth_and_close_to_tight(name, accountant):
    history = HISTORIES[name]
    ours = privacy.client_epsilon(ledger_from({0: history})[0], delta=DELTA, accountant=accountant)
    lower = independent_pld(history, DELTA, pessimistic=False)  # below the true ε
    upper = independent_pld(history, DELTA, pessimistic=True)  # above, and tight
    assert ours >= lower
    # RDP is a valid but looser bound (most at small q and many steps); PRV is near-exact
    slack = 0.35 if accountant == "rdp" else 0.05
    assert ours <= upper * (1 + slack)


def test_run_epsilon_is_max_over_clients():
    ledger = ledger_from({0: [(1.0, 0.1, 10)], 1: [(1.0, 0.1, 10)] * 3, 2: [(5.0, 0.1, 10)] * 3})
    eps, who = privacy.run_epsilon(ledger, delta=DELTA, accountant="rdp")
    assert who == 1
    assert eps == pytest.approx(independent_rdp([(1.0, 0.1, 30)], DELTA), rel=1e-3)
    assert privacy.run_epsilon({}, delta=DELTA, accountant="rdp") == (0.0, None)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_solved_sigma_meets_target_tightly(accountant):
    schedules = [(0.2, 100), (0.25, 80)]
    sigma = solve.solve_noise_multiplier(
        target_epsilon=3.0, delta=DELTA, accountant=accountant, schedules=schedules
    )
    eps = [
        accounting.history_epsilon([(sigma, q, t)], delta=DELTA, accountant=accountant)
        for q, t in schedules
    ]
    assert max(eps) <= 3.0
    assert max(eps) >= 3.0 * 0.97  # not needlessly noisy
    check = independent_pld([(sigma, q, t) for q, t in schedules[:1]], DELTA, pessimistic=False)
    assert check <= 3.0


@pytest.mark.parametrize(
    ("schedules", "target", "delta"),
    [
        ([(64 / 479, 24), (64 / 480, 24)], 4.0, 1e-5),  # tests/test_simulation.py's runs
        ([(0.3, 20), (0.1, 60)], 1.5, 1e-6),  # the second client in sorted order fails
    ],
)
def test_rdp_solve_equals_bisection_on_whole_curves(schedules, target, delta):
    """The RDP solver decides order by order; the same bisection on whole curves agrees."""

    def within(sigma):  # Opacus's epsilon over all orders, for every client
        history = [[(sigma, q, t)] for q, t in schedules]
        return all(
            accounting.history_epsilon(h, delta=delta, accountant="rdp") <= target for h in history
        )

    low, high = 0.0, 1.0
    while not within(high):
        low, high = high, 2 * high
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        low, high = (low, mid) if within(mid) else (mid, high)
    sigma = solve.solve_noise_multiplier(
        target_epsilon=target, delta=delta, accountant="rdp", schedules=schedules
    )
    assert sigma == high  # to the last bit


def test_prescribed_spend_is_the_poisson_schedule():
    spend = privacy.prescribed_spend(100, noise_multiplier=1.5, batch_size=32, epochs=2)
    assert spend == PrivacySpent((1.5,), (0.25,), (8,))
    assert privacy.prescribed_spend(64, noise_multiplier=1.0, batch_size=64, epochs=1).steps == (1,)


def test_ledger_json_round_trip():
    ledger = ledger_from(dict(enumerate(HISTORIES.values())))
    assert privacy.ledger_from_json(privacy.ledger_to_json(ledger)) == ledger
    assert math.isclose(
        privacy.run_epsilon(ledger, delta=DELTA, accountant="rdp")[0],
        privacy.run_epsilon(
            privacy.ledger_from_json(privacy.ledger_to_json(ledger)), delta=DELTA, accountant="rdp"
        )[0],
    )


def test_runs_pooled_on_the_same_data_compose_their_worst_clients():
    # two seeds' runs, one client size each: the record's two histories, composed
    one = [(1.1, 0.05, 100)]
    eps, used = accounting.pooled_epsilon([[one], [one]], delta=DELTA, accountant="pld")
    assert used == "pld" and eps >= independent_pld(one * 2, DELTA, pessimistic=False)
    assert eps > accounting.history_epsilon(one, delta=DELTA, accountant="pld") * 1.2
    # clients that differ: every pick of one per run is a record's possible history
    a, b = [(0.9, 0.1, 20)], [(2.0, 0.3, 60)]
    eps, used = accounting.pooled_epsilon([[a, b], [a, b]], delta=DELTA, accountant="pld")
    for pick in ([a, a], [a, b], [b, b]):
        assert eps >= independent_pld(pick[0] + pick[1], DELTA, pessimistic=False)
    # too many picks (3 runs of 3 sizes): RDP's curves, the largest per order in each run;
    # with one σ and one step count that is the largest sample rate's, 3 times
    runs = [[[(1.0, q, 50)] for q in (0.02, 0.08, 0.05)]] * 3
    eps, used = accounting.pooled_epsilon(runs, delta=DELTA, accountant="prv")
    assert used == "rdp"
    assert eps == pytest.approx(independent_rdp([(1.0, 0.08, 150)], DELTA), rel=1e-3)


def _mixture_epsilon(sigma, q, group, delta):
    """ε of one step for ``group`` records, by numerical integration: independent of
    dp-accounting. P = Σ_k Binomial(k; group, q) N(k, σ²) against Q = N(0, σ²), both ways."""
    x = np.linspace(-40 * sigma, group + 40 * sigma, 400_001)
    dx = x[1] - x[0]
    k = np.arange(group + 1)
    weights = np.array([math.comb(group, j) * q**j * (1 - q) ** (group - j) for j in k])
    p = (weights[:, None] * np.exp(-((x - k[:, None]) ** 2) / (2 * sigma**2))).sum(0)
    p /= math.sqrt(2 * math.pi) * sigma
    r = np.exp(-(x**2) / (2 * sigma**2)) / (math.sqrt(2 * math.pi) * sigma)

    def hockey(eps):
        return (
            max(
                np.maximum(p - math.exp(eps) * r, 0).sum(),
                np.maximum(r - math.exp(eps) * p, 0).sum(),
            )
            * dx
        )

    lo, hi = 0.0, 50.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if hockey(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize(("sigma", "q", "group"), [(1.0, 0.2, 3), (0.8, 0.05, 9), (2.0, 0.5, 2)])
def test_a_group_s_epsilon_is_the_integrated_mixture_s(sigma, q, group):
    """One step of DP-SGD for ``group`` records changed at once (a character in several
    Shakespeare windows): dp-accounting's mixture PLD against a direct integration."""
    history = [(sigma, q, 1)]
    got = accounting.history_epsilon(
        history, delta=1e-5, accountant=accounting.group_accountant(group)
    )
    exact = _mixture_epsilon(sigma, q, group, 1e-5)
    assert exact - 1e-6 <= got <= exact * 1.001  # pessimistic: never below the truth
    one = accounting.history_epsilon(history, delta=1e-5, accountant="pld")
    assert one < got  # a group costs more than one record


def test_a_group_of_one_is_one_record():
    history = [(0.75, 1 / 32, 320), (1.1, 1 / 16, 40)]
    one = accounting.history_epsilon(history, delta=1e-5, accountant="pld")
    group = accounting.history_epsilon(
        history, delta=1e-5, accountant=accounting.group_accountant(1)
    )
    assert group == pytest.approx(one, rel=1e-6)
    with pytest.raises(FedsimError, match="at least 1 record"):
        accounting.group_accountant(0)


def test_one_history_bounds_many_client_sizes_for_a_costly_accountant():
    """A group's ε costs seconds a history; with many client sizes one history that
    bounds them all is accounted instead: never below any client's own ε."""
    sizes = [[(1.0, 0.1, 100)], [(1.0, 0.05, 300)], [(1.0, 1 / 32, 320)]]
    (bound,) = privacy.dominating(sizes)
    assert bound == [(1.0, 0.1, 320)]
    for accountant in ("rdp", accounting.group_accountant(3)):
        worst = accounting.history_epsilon(bound, delta=DELTA, accountant=accountant)
        each = [accounting.history_epsilon(h, delta=DELTA, accountant=accountant) for h in sizes]
        assert worst >= max(each)
    mixed = [[(1.0, 0.1, 100)], [(2.0, 0.05, 300)]]  # no single σ: left as they are
    assert privacy.dominating(mixed) == mixed
