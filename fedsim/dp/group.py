"""ε for zeroing out several records of one client at once: overlapping examples.

One character of a Shakespeare role lies in up to 81 of its 80-character training windows
(as context or as the target), so removing it touches up to 81 records: DP-SGD's ε for
one record says little about it. This is the ε of zeroing out that group (each record's
gradient counts as 0, the sample unit's relation for a group), under dp-accounting's PLD.
Changing the records instead (replace) costs more and is not computed here.

Taking the group's clipped gradients aligned, a scalar mixture of Gaussians, is the worst
case: a mixture of Gaussians with vector means is dominated by the scalar one with the
vectors' norms (Choquette-Choo, Ganesh, Steinke & Thakurta 2023, "Privacy Amplification
for Matrix Mechanisms", Cor. 4.7; dp-accounting's ``MixtureGaussianPrivacyLoss`` cites it).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from dp_accounting.pld import privacy_loss_distribution as pld_lib

from fedsim.errors import FedsimError

GROUP_PREFIX = "pld-group-"
# per record of the group; pessimistic rounding, so a coarser grid only over-reports ε
INTERVAL_PER_RECORD = 1e-3
_NEGLIGIBLE = 1e-30  # below dp-accounting's own truncation of the noise's mass


def group_accountant(group: int) -> str:
    """The accountant's name for zeroing out ``group`` records of one client at once.

    Raises
    ------
    FedsimError
        ``group`` is below 1.

    """
    if group < 1:
        raise FedsimError(f"a group of records has at least 1 record, not {group}")
    return f"{GROUP_PREFIX}{group}"


def group_epsilon(history: list[tuple[float, float, int]], delta: float, *, group: int) -> float:
    """ε of a (σ, q, steps) history for ``group`` records zeroed out at once.

    Each record joins a step's Poisson batch on its own, so k ~ Binomial(group, q) of
    them are in it and the clipped sum moves by at most k·C: the worst case, every
    clipped gradient aligned. That step is dp-accounting's mixture of Gaussians with
    sensitivities k and weights Binomial(k; group, q), both adjacency directions.
    """
    interval = INTERVAL_PER_RECORD * group
    return composed_epsilon(
        history, delta, lambda sigma, q: _step(sigma, q, group, interval), interval
    )


def composed_epsilon(
    history: list[tuple[float, float, int]],
    delta: float,
    step: Callable[[float, float], pld_lib.PrivacyLossDistribution],
    interval: float,
) -> float:
    """ε of a history: each (σ, q) run's ``step`` composed ``steps`` times.

    As dp-accounting's ``PLDAccountant`` composes: a q of 0 is nothing, a σ of 0 is ∞.
    """
    total = pld_lib.identity(value_discretization_interval=interval)
    for sigma, q, steps in history:
        if q == 0:  # as the accountant: nothing happened
            continue
        if sigma == 0:  # as the accountant: a non-private event
            return math.inf
        total = total.compose(step(sigma, q).self_compose(steps))
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
