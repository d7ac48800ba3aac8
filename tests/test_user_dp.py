"""User-level DP (DP-FedAvg): clipping, noise, fixed denominator, adaptive clipping."""

import math
from types import SimpleNamespace

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp
from flwr.app import Array, ArrayRecord
from torch import nn

from fedsim.dp import accounting, solve
from fedsim.dp.randomness import seeded_root
from fedsim.messages import ARRAYS, METRICS, PARTITION_KEY, WEIGHT_KEY
from fedsim.server import privacy
from fedsim.server.user_dp import UserLevelDP, clip, noisy_mean, running_variances, update_std

pytestmark = pytest.mark.usefixtures("flower_run")


class Inner:
    """Stands in for the wrapped strategy: it may see only the released average."""

    def configure_train(self, server_round, arrays, config, grid):
        return []

    def aggregate_train(self, server_round, replies):
        (average,) = replies  # never a client's own update
        assert dict(average.content[METRICS]) == {PARTITION_KEY: -1, WEIGHT_KEY: 1}
        return average.content[ARRAYS], None


def record(arrays):
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()})


def reply(arrays):
    # only .content is read; a real Message needs a running Flower task to be built
    return SimpleNamespace(content={ARRAYS: record(arrays)})


WRAPPER = {
    "sample_rate": 0.1,
    "noise_multiplier": 1e-9,
    "clip_norm": 1.0,
    "expected_cohort": 4.0,
    "root": seeded_root(0),
}


def wrapper(**kw):
    return UserLevelDP(Inner(), **{"ledger": [], **WRAPPER, **kw})


def test_clip_scales_only_long_updates():
    long, norm = clip({"w": np.array([3.0, 4.0])}, 1.0)
    assert norm == 5.0 and np.allclose(long["w"], [0.6, 0.8])
    short, _ = clip({"w": np.array([0.3, 0.4])}, 1.0)
    assert np.allclose(short["w"], [0.3, 0.4])


def test_noisy_mean_uses_fixed_denominator():
    updates = [{"w": np.ones(3)}, {"w": 2 * np.ones(3)}]
    rng = np.random.default_rng(0)
    mean = noisy_mean(updates, {"w": np.zeros(3)}, std=0.0, denominator=10.0, rng=rng)
    assert np.allclose(mean["w"], 0.3)  # (1 + 2) / 10, not / 2


def test_aggregate_is_clipped_unweighted_sum_over_expected_cohort():
    dp = wrapper()
    base = {"w": np.zeros(2)}
    dp.configure_train(1, record(base), None, None)
    replies = [reply({"w": [3.0, 4.0]}), reply({"w": [0.0, 0.5]})]
    new, metrics = dp.aggregate_train(1, replies)
    expected = (np.array([0.6, 0.8]) + np.array([0.0, 0.5])) / 4.0
    assert np.allclose(new["w"].numpy(), expected, atol=1e-6)
    assert metrics["cohort"] == 2
    assert dp.ledger == [privacy.LedgerEntry(1, 1e-9, 0.1, 1)]


def test_noise_std_matches_sigma_clip_over_cohort():
    dp = wrapper(noise_multiplier=2.0, clip_norm=0.5, expected_cohort=10.0)
    base = {"w": np.zeros(200_000)}
    dp.configure_train(3, record(base), None, None)
    new, _ = dp.aggregate_train(3, [])  # an empty Poisson cohort still releases noise
    assert np.std(new["w"].numpy()) == pytest.approx(2.0 * 0.5 / 10.0, rel=0.02)


def test_a_step_counter_is_kept_by_the_server_and_outside_the_clip():
    # a BatchNorm's num_batches_tracked: a 0-d int64 that training moves by its step count
    dp = wrapper()
    base = ArrayRecord(
        {"w": Array(np.zeros(2, np.float32)), "steps": Array(np.asarray(5, np.int64))}
    )
    dp.configure_train(1, base, None, None)
    local = ArrayRecord(
        {"w": Array(np.array([0.3, 0.4], np.float32)), "steps": Array(np.asarray(105, np.int64))}
    )
    new, _ = dp.aggregate_train(1, [SimpleNamespace(content={ARRAYS: local})])
    # counted in, the counter's change of 100 would have scaled w's update by 1/100
    assert np.allclose(new["w"].numpy(), np.array([0.3, 0.4]) / 4.0, atol=1e-6)
    assert new["steps"].numpy().dtype == np.int64 and new["steps"].numpy() == 5
    assert new["w"].numpy().dtype == np.float32


def test_running_variances_are_found_by_layer():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2),
        nn.Sequential(nn.InstanceNorm1d(3), nn.BatchNorm1d(4)),
    )
    assert running_variances(model) == {"1.running_var", "2.1.running_var"}  # 2.0: no stats
    assert running_variances(nn.BatchNorm1d(3)) == {"running_var"}


@pytest.mark.parametrize("clipped", [True, False])
def test_a_running_variance_is_released_clipped_at_zero(clipped):
    # noise of std σC/(qN) = 0.25 around a variance of 0.1: about a third of it below 0
    keys = frozenset({"bn.running_var"}) if clipped else frozenset()
    dp = wrapper(noise_multiplier=1.0, nonnegative=keys)
    base = {"w": np.zeros(2), "bn.running_var": np.full(300, 0.1)}
    dp.configure_train(1, record(base), None, None)
    new, _ = dp.aggregate_train(1, [reply(base)])
    var, w = new["bn.running_var"].numpy(), new["w"].numpy()
    assert (var < 0).any() != clipped
    assert (var == 0).sum() > 50 if clipped else (var < 0).sum() > 50
    assert var.max() > 0.5 and (w != 0).all()  # the rest is noised as before


class Overshooting(Inner):
    """A server optimizer whose step overshoots the release (momentum, a large server-lr)."""

    def aggregate_train(self, server_round, replies):
        arrays, _ = super().aggregate_train(server_round, replies)
        return record({k: v.numpy() - 1.0 for k, v in arrays.items()}), None


def test_the_new_global_model_s_variances_are_clipped_after_the_server_optimizer():
    keys = frozenset({"bn.running_var"})
    dp = UserLevelDP(Overshooting(), ledger=[], **WRAPPER, nonnegative=keys)
    base = {"w": np.zeros(2), "bn.running_var": np.full(3, 0.5)}
    dp.configure_train(1, record(base), None, None)
    new, _ = dp.aggregate_train(1, [reply(base)])
    assert (new["bn.running_var"].numpy() == 0).all()  # 0.5 - 1, clipped
    assert np.allclose(new["w"].numpy(), -1.0)  # the rest as the optimizer left it


@pytest.mark.parametrize(("update_norm", "direction"), [(0.01, -1), (100.0, +1)])
def test_adaptive_clip_moves_toward_quantile(update_norm, direction):
    dp = wrapper(
        noise_multiplier=0.01, clip_quantile=0.5, clip_lr=0.2, count_noise=0.01, expected_cohort=3.0
    )
    base = {"w": np.zeros(2)}
    dp.configure_train(1, record(base), None, None)
    dp.aggregate_train(1, [reply({"w": [update_norm, 0.0]})] * 3)
    # all updates fit (fraction 1 > 0.5): C must shrink; none fit (0 < 0.5): C must grow
    assert math.copysign(1, dp.clip_norm - 1.0) == direction
    fraction = 1.0 if direction < 0 else 0.0
    assert dp.clip_norm == pytest.approx(math.exp(-0.2 * (fraction - 0.5)), rel=1e-2)


def test_update_std_splits_noise_between_update_and_count():
    assert update_std(1.0, 0.0) == 1.0
    assert update_std(1.0, 10.0) == pytest.approx((1 - 1 / 400) ** -0.5)
    # the pair of releases is accounted as one Gaussian with noise multiplier z
    z, sb = 1.3, 2.0
    assert update_std(z, sb) ** -2 + (2 * sb) ** -2 == pytest.approx(z**-2)
    with pytest.raises(Exception, match="clip-count-noise"):
        update_std(1.0, 0.4)


@pytest.mark.parametrize("accountant", ["rdp", "prv", "pld"])
def test_user_ledger_epsilon_against_dp_accounting(accountant):
    z, q, rounds = 1.1, 0.05, 200
    ledger = [privacy.LedgerEntry(r, z, q, 1) for r in range(1, rounds + 1)]
    ours = privacy.client_epsilon(ledger, delta=1e-5, accountant=accountant)
    acc = rdp.RdpAccountant(accounting.RDP_ORDERS)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    independent_rdp = acc.get_epsilon(1e-5)
    if accountant == "rdp":
        assert ours == pytest.approx(independent_rdp, rel=1e-3)
    else:  # tighter than RDP, never optimistic by more than discretization
        assert ours <= independent_rdp
        assert ours >= 0.75 * independent_rdp


def test_solve_user_noise_meets_target():
    sigma = solve.solve_noise_multiplier(
        target_epsilon=2.0, delta=1e-5, accountant="rdp", schedules=[(0.1, 100)]
    )
    eps = accounting.history_epsilon([(sigma, 0.1, 100)], delta=1e-5, accountant="rdp")
    assert 2.0 * 0.99 <= eps <= 2.0


class NoNoise:
    """A generator without noise: what remains of a release is its sensitive part."""

    def normal(self, loc=0.0, scale=1.0, size=None):
        return loc if size is None else np.full(size, loc, dtype=float)


def noiseless_release(monkeypatch, updates, *, z, count_noise, cohort=4.0, lr=0.2):
    """(sum of clipped updates, count statistic) that an adaptive round releases."""
    monkeypatch.setattr(np.random, "default_rng", lambda *a, **k: NoNoise())
    dp = wrapper(
        noise_multiplier=z,
        clip_quantile=0.5,
        clip_lr=lr,
        count_noise=count_noise,
        expected_cohort=cohort,
    )
    dp.configure_train(1, record({"w": np.zeros(2)}), None, None)
    new, _ = dp.aggregate_train(1, [reply({"w": u}) for u in updates])
    # C' = C·exp(−η (b̄ − γ)) with C = 1 and γ = 0.5: invert it for the released b̄
    released_fraction = 0.5 - math.log(dp.clip_norm) / lr
    return new["w"].numpy().astype(float) * cohort, released_fraction * cohort


@pytest.mark.parametrize("extra", [[0.6, 0.79], [0.0, 0.1], [30.0, 40.0]])
def test_adaptive_round_is_a_gaussian_mechanism_with_multiplier_z(monkeypatch, extra):
    # Andrew et al.'s split σ_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) holds only if one client moves
    # the count by at most 1/2 (bits centred to ±1/2). Adding one client to the cohort
    # must move (sum/σ_Δ·C, count/σ_b) by at most 1/z in L2 norm.
    z, sb = 1.0, 0.6
    base = [[0.1, 0.0], [0.0, 3.0]]
    sum_a, count_a = noiseless_release(monkeypatch, base, z=z, count_noise=sb)
    sum_b, count_b = noiseless_release(monkeypatch, [*base, extra], z=z, count_noise=sb)
    sigma_update = update_std(z, sb)
    moved = math.hypot(
        float(np.linalg.norm(sum_b - sum_a)) / sigma_update, (count_b - count_a) / sb
    )
    assert moved <= (1 / z) * (1 + 1e-5)
