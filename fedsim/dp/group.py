"""ε for changing several records of one client at once: a group of overlapping examples.

One character of a Shakespeare role lies in up to 81 of its 80-character training windows
(as context or as the target), so changing it changes up to 81 records: DP-SGD's ε for
one record says little about it. This is that group's ε, under dp-accounting's PLD.
"""

from __future__ import annotations

import math

from dp_accounting.pld import privacy_loss_distribution as pld_lib

from fedsim.errors import FedsimError

GROUP_PREFIX = "pld-group-"
# per record of the group; pessimistic rounding, so a coarser grid only over-reports ε
INTERVAL_PER_RECORD = 1e-3
_NEGLIGIBLE = 1e-30  # below dp-accounting's own truncation of the noise's mass


def group_accountant(group: int) -> str:
    """The accountant's name for changing ``group`` records of one client at once."""
    if group < 1:
        raise FedsimError(f"a group of records has at least 1 record, not {group}")
    return f"{GROUP_PREFIX}{group}"


def group_epsilon(history: list[tuple[float, float, int]], delta: float, *, group: int) -> float:
    """ε of a (σ, q, steps) history for ``group`` records changed at once.

    Each record joins a step's Poisson batch on its own, so k ~ Binomial(group, q) of
    them are in it and the clipped sum moves by at most k·C: the worst case, every
    clipped gradient aligned. That step is dp-accounting's mixture of Gaussians with
    sensitivities k and weights Binomial(k; group, q), both adjacency directions.
    """
    interval = INTERVAL_PER_RECORD * group
    total = pld_lib.identity(value_discretization_interval=interval)
    for sigma, q, steps in history:
        if q == 0:  # as the accountants: nothing happened
            continue
        if sigma == 0:
            return math.inf
        total = total.compose(_step(sigma, q, group, interval).self_compose(steps))
    return float(total.get_epsilon_for_delta(delta))


def _step(sigma: float, q: float, group: int, interval: float) -> pld_lib.PrivacyLossDistribution:
    weights = [math.comb(group, k) * q**k * (1 - q) ** (group - k) for k in range(group + 1)]
    kept = [k for k, w in enumerate(weights) if w > _NEGLIGIBLE]
    return pld_lib.from_mixture_gaussian_mechanism(
        sigma,
        [float(k) for k in kept],
        [weights[k] for k in kept],
        value_discretization_interval=interval,
    )
