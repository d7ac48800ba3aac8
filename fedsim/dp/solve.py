"""σ for a target ε: the smallest noise multiplier that keeps every client within it.

Pure functions, no I/O, on ``fedsim.dp.accounting``'s ε. Under ``rdp`` each σ tried is
decided order by order, which gives the σ of the whole-curve bisection to the last bit in
a fraction of the time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
from opacus.accountants.analysis import rdp as rdp_analysis

from fedsim.dp.accounting import RDP_ORDERS, history_epsilon
from fedsim.errors import FedsimError

MAX_SIGMA = 1e4


def solve_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    accountant: str,
    schedules: Iterable[tuple[float, int]],
) -> float:
    """Smallest σ such that every client that trains in every round ends at ε ≤ target.

    Bisection to 0.1%: every σ it tries either keeps every client within the target or
    not. Under ``rdp`` that question is answered by :func:`_rdp_within`, the same answer
    as ``history_epsilon(...) <= target_epsilon``, found sooner; σ is the same.

    Parameters
    ----------
    schedules
        One (sample rate, total steps over the whole run) per client.

    """
    within = _within(
        sorted(set(schedules)), delta=delta, target=target_epsilon, accountant=accountant
    )
    low, high = 0.0, 1.0
    while not within(high):
        low, high = high, 2 * high
        if high > MAX_SIGMA:
            raise _unreachable(target_epsilon)
    while high - low > 1e-3 * high:  # ε(high) ≤ target always holds
        mid = (low + high) / 2
        low, high = (low, mid) if within(mid) else (mid, high)
    return high


def check_reachable(
    *, target_epsilon: float, delta: float, accountant: str, schedules: Iterable[tuple[float, int]]
) -> None:
    """Refuse, in one line, a target ε that no σ up to ``MAX_SIGMA`` reaches.

    What :func:`solve_noise_multiplier` would find last, found in milliseconds: a run
    checks it before any engine starts.
    """
    unique = sorted(set(schedules))
    if not _within(unique, delta=delta, target=target_epsilon, accountant=accountant)(MAX_SIGMA):
        raise _unreachable(target_epsilon)


def _unreachable(target_epsilon: float) -> FedsimError:
    return FedsimError(
        f"target ε {target_epsilon} needs a noise multiplier above {MAX_SIGMA:g}; "
        "raise the target, or train fewer rounds or epochs"
    )


def _within(
    unique: list[tuple[float, int]], *, delta: float, target: float, accountant: str
) -> Callable[[float], bool]:
    """Whether a σ keeps every (q, steps) of ``unique`` within ``target``."""
    if accountant == "rdp":
        return _rdp_within(unique, delta=delta, target=target)

    def within(sigma: float) -> bool:
        worst = max(
            history_epsilon([(sigma, q, t)], delta=delta, accountant=accountant) for q, t in unique
        )
        return worst <= target

    return within


def _rdp_within(
    schedules: list[tuple[float, int]], *, delta: float, target: float
) -> Callable[[float], bool]:
    """Whether σ keeps every (q, steps) schedule at RDP ε ≤ ``target``.

    ε is the least over ``RDP_ORDERS`` of Opacus's per-order bound
    (``get_privacy_spent``), so one order within the target answers yes. Each order's
    bound is computed alone with the same float operations as the whole curve, so every
    answer equals ``history_epsilon(...) <= target`` to the last bit. A whole curve costs
    ~0.25 s on 2 cores (its 99 fractional orders ~2 ms each); trying orders outward from
    the one that decided last, and first the schedule that failed last, a yes mostly
    takes a few orders and a no one schedule's curve.
    """
    orders = np.atleast_1d(RDP_ORDERS)
    # get_privacy_spent's terms that do not depend on the RDP, by its own operations
    shift = (np.log(delta) + np.log(orders)) / (orders - 1)
    gap = np.log((orders - 1) / orders)
    hint = dict.fromkeys(schedules, len(orders) // 4)
    queue = list(schedules)

    def bound(sigma: float, q: float, steps: int, i: int) -> float:
        # a list of one order, as RDP_ORDERS holds it: compute_rdp's path for a curve
        rdp = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=[RDP_ORDERS[i]])
        return float((rdp[0] * steps - shift[i]) + gap[i])

    def within(sigma: float) -> bool:
        for schedule in queue:
            near = sorted(range(len(orders)), key=lambda i: abs(i - hint[schedule]))
            bounds = {}
            for i in near:
                bounds[i] = bound(sigma, *schedule, i)
                if bounds[i] <= target:
                    hint[schedule] = i
                    break
            else:  # no order within the target: this σ fails, and so may the next
                hint[schedule] = min(bounds, key=lambda i: (math.isnan(bounds[i]), bounds[i]))
                queue.remove(schedule)
                queue.insert(0, schedule)
                return False
        return True

    return within
