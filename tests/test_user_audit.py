"""The user-level audit: canary clients inside DP-FedAvg, scored by cosine (issue 15)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedsim.dp import UserCanaries, accounting, best_guesses, gaussian_estimate, gdp_epsilon, solve
from fedsim.dp.randomness import seeded_root
from fedsim.errors import FedsimError
from fedsim.messages import ARRAYS
from fedsim.server.user_dp import UserLevelDP, flatten, to_numpy, unflatten

pytestmark = pytest.mark.usefixtures("flower_run")
DELTA = 1e-5
SHAPES = {"conv": (8, 3, 3), "bias": (8,), "fc": (10, 800)}  # 8,080 numbers


class Inner:
    def configure_train(self, server_round, arrays, config, grid):
        return []

    def aggregate_train(self, server_round, replies):
        (average,) = replies
        return average.content[ARRAYS], None


def record(arrays):
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()})


def audited_run(*, noise: float, rounds: int, rate: float, canaries: int, clients: int = 4):
    """DP-FedAvg rounds with ``clients`` real clients (random updates) and canary clients.

    ``noise``: the noise multiplier the mechanism really applies. Returns the audit's
    canary scores and which canaries were in.
    """
    start = {k: np.zeros(s) for k, s in SHAPES.items()}
    dim = flatten(start).size
    audit = UserCanaries(count=canaries, seed=3, dim=dim)
    dp = UserLevelDP(
        Inner(),
        ledger=[],
        sample_rate=rate,
        noise_multiplier=noise,
        clip_norm=1.0,
        expected_cohort=rate * (clients + canaries),
        root=seeded_root(11),
        canaries=audit,
    )
    rng = np.random.default_rng(5)
    current = record(start)
    for r in range(1, rounds + 1):
        dp.configure_train(r, current, None, None)
        base = to_numpy(current)
        noisy = [{k: v + rng.normal(size=v.shape) for k, v in base.items()} for _ in range(clients)]
        replies = [SimpleNamespace(content={ARRAYS: record(u)}) for u in noisy]
        current, _ = dp.aggregate_train(r, replies)
    change = flatten(to_numpy(current)) - flatten(start)
    return audit.scores(change), audit.included()


def claimed_epsilon(noise, rate, rounds):
    return accounting.history_epsilon([(noise, rate, rounds)], delta=DELTA, accountant="rdp")


def test_flatten_and_unflatten_are_inverse():
    record = ArrayRecord(
        {
            "a": Array(np.arange(6.0, dtype=np.float32).reshape(2, 3)),
            "n": Array(np.array([3])),  # not floating point: not part of an update
            "b": Array(np.ones(2, np.float32)),
        }
    )
    arrays = to_numpy(record)
    assert list(arrays) == ["a", "b"] and arrays["a"].dtype == np.float64
    vector = flatten(arrays)
    assert vector.tolist() == [0, 1, 2, 3, 4, 5, 1, 1]
    back = unflatten(vector, arrays)
    assert np.array_equal(back["a"], arrays["a"]) and np.array_equal(back["b"], arrays["b"])


def test_canaries_are_seeded_half_in_and_unit_length():
    audit = UserCanaries(count=2000, seed=1, dim=50)
    assert np.array_equal(audit.included(), UserCanaries(2000, 1, 50).included())
    assert 900 < audit.included().sum() < 1100
    assert math.isclose(float(np.linalg.norm(audit.direction(7))), 1.0)
    assert not np.array_equal(audit.included(), UserCanaries(2000, 2, 50).included())
    sampled = audit.sampled(0.3, root=seeded_root(0), server_round=4)
    assert set(sampled) <= set(np.flatnonzero(audit.included()))
    assert 0.2 < len(sampled) / audit.included().sum() < 0.4
    with pytest.raises(FedsimError, match="non-zero change of 50"):
        audit.scores(np.zeros(50))


@pytest.mark.parametrize("mu", [0.5, 1.0, 3.0])
def test_gdp_epsilon_matches_an_independent_pld_accountant(mu):
    # one Gaussian release with sensitivity 1 and noise 1/μ is μ-GDP; PLD is tight for it
    pld = accounting.history_epsilon([(1 / mu, 1.0, 1)], delta=DELTA, accountant="pld")
    assert gdp_epsilon(mu, DELTA) == pytest.approx(pld, rel=2e-3)
    assert gdp_epsilon(0.0, DELTA) == 0.0


def test_the_audit_sees_canaries_when_there_is_no_noise_to_hide_them():
    scores, included = audited_run(noise=1e-6, rounds=5, rate=0.5, canaries=200)
    audit = best_guesses(scores, included, delta=DELTA, beta=0.05)
    assert audit.epsilon > 2.5  # the ceiling for 200 guesses at β = 0.05 is 4.2
    assert gaussian_estimate(scores, included, delta=DELTA) > 10


@pytest.mark.parametrize("target", [1.0, 4.0])
def test_the_audit_never_contradicts_a_correct_mechanism(target):
    rate, rounds = 0.5, 20
    noise = solve.solve_noise_multiplier(
        target_epsilon=target, delta=DELTA, accountant="rdp", schedules=[(rate, rounds)]
    )
    scores, included = audited_run(noise=noise, rounds=rounds, rate=rate, canaries=1000)
    bound = best_guesses(scores, included, delta=DELTA, beta=0.05).epsilon
    assert bound <= claimed_epsilon(noise, rate, rounds) <= target + 1e-3
    estimate = gaussian_estimate(scores, included, delta=DELTA)
    assert estimate is not None and 0 < estimate <= target * 1.5


def test_the_audit_catches_noise_ten_times_smaller_than_the_ledger_says():
    rate, rounds = 0.5, 20
    said = solve.solve_noise_multiplier(
        target_epsilon=1.0, delta=DELTA, accountant="rdp", schedules=[(rate, rounds)]
    )
    scores, included = audited_run(noise=said / 10, rounds=rounds, rate=rate, canaries=1000)
    bound = best_guesses(scores, included, delta=DELTA, beta=0.05).epsilon
    assert claimed_epsilon(said, rate, rounds) <= 1.0 + 1e-3 < bound
