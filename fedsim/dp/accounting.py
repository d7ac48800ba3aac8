"""Accounting: ε of a history of Poisson-subsampled Gaussian mechanisms; σ for a target.

Pure functions, no I/O. A history is ``[(σ, q, steps), ...]``; each named accountant
turns it into ε at a δ:

- ``rdp``: Opacus's RDP accountant, with more orders than its default;
- ``prv``: Opacus's PRV accountant;
- ``pld``: dp-accounting's PLD accountant, pessimistic discretization;
- ``pld-replace-one``: the same for replacing one record by another;
- ``pld-group-<g>`` (``fedsim.dp.group``): changing ``g`` records of one client at
  once, as a character of a text shared by ``g`` overlapping windows.

``rdp``, ``prv`` and ``pld`` bound add-or-remove-one, which for Poisson sampling equals
zeroing one record out (dp-accounting's REPLACE_SPECIAL). Replace-one is what a
guarantee for a whole client implies for one of its examples.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterable, Sequence

import dp_accounting
import numpy as np
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from opacus.accountants import create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis
from threadpoolctl import ThreadpoolController

from fedsim.dp.group import GROUP_PREFIX, composed_epsilon, group_epsilon
from fedsim.dp.group import group_accountant as group_accountant  # re-exported
from fedsim.errors import FedsimError

# Opacus's default orders stop at 63, which is loose for few steps at large ε; any order
# gives a valid bound, so more orders can only tighten ε, never make it optimistic.
RDP_ORDERS = (
    [1 + x / 10.0 for x in range(1, 100)]
    + list(range(12, 64))
    + [80, 96, 128, 192, 256, 384, 512, 1024]
)


History = list[tuple[float, float, int]]


def _opacus_epsilon(name: str) -> Callable[[History, float], float]:
    def epsilon(history: History, delta: float) -> float:
        acc = create_accountant(mechanism=name)
        acc.history = list(history)
        extra = {"alphas": RDP_ORDERS} if name == "rdp" else {}
        return float(acc.get_epsilon(delta=delta, **extra))

    return epsilon


def _rdp_epsilon(history: History, delta: float) -> float:
    """Opacus's ``RDPAccountant.get_epsilon`` at ``RDP_ORDERS``, the same float operations.

    Opacus recomputes every (σ, q)'s RDP curve on each call (~0.1 s); the curve of one
    step is remembered here and multiplied by the steps, as ``compute_rdp`` does, so
    asking again every round for a history that grew costs almost nothing.
    """
    rdp = sum([_rdp_curve(sigma, q) * steps for sigma, q, steps in history])
    eps, _ = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=1024)
def _rdp_curve(sigma: float, q: float) -> np.ndarray:
    """RDP of one step of the sampled Gaussian mechanism at each of ``RDP_ORDERS``."""
    curve = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDP_ORDERS)
    curve.setflags(write=False)  # shared by every caller of the cache
    return curve


PLD_INTERVAL = 1e-3  # dp-accounting's default; its pessimistic rounding over-reports ε


def _pld_epsilon(relation: dp_accounting.NeighboringRelation) -> Callable[[History, float], float]:
    def epsilon(history: History, delta: float) -> float:
        """dp-accounting's ``PLDAccountant`` on Poisson-subsampled Gaussians, op for op.

        Its one-step distribution per (σ, q) is built once (~70 ms); the accountant
        rebuilt it on every call, every round.
        """
        return composed_epsilon(
            history, delta, lambda sigma, q: _pld_step(sigma, q, relation), PLD_INTERVAL
        )

    return epsilon


@functools.lru_cache(maxsize=128)  # 0.05-0.7 MB each: at most ~90 MB
def _pld_step(
    sigma: float, q: float, relation: dp_accounting.NeighboringRelation
) -> pld_lib.PrivacyLossDistribution:
    """One step of the sampled Gaussian mechanism, discretized pessimistically."""
    return pld_lib.from_gaussian_mechanism(
        standard_deviation=sigma,
        value_discretization_interval=PLD_INTERVAL,
        sampling_prob=q,
        neighboring_relation=relation,
    )


REPLACE_ONE = "pld-replace-one"
# name -> ε of a (σ, q, steps) history of Poisson-subsampled Gaussian mechanisms
ACCOUNTANTS: dict[str, Callable[[History, float], float]] = {
    "rdp": _rdp_epsilon,
    "prv": _opacus_epsilon("prv"),
    "pld": _pld_epsilon(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE),
    REPLACE_ONE: _pld_epsilon(dp_accounting.NeighboringRelation.REPLACE_ONE),
}


def _named(accountant: str) -> Callable[[History, float], float]:
    """The ε function an accountant's name stands for."""
    if accountant.startswith(GROUP_PREFIX):
        return functools.partial(group_epsilon, group=int(accountant.removeprefix(GROUP_PREFIX)))
    return ACCOUNTANTS[accountant]


def history_epsilon(history: History, *, delta: float, accountant: str) -> float:
    """ε of one composed (σ, q, steps) history under a named accountant."""
    if not history:
        return 0.0
    try:
        return _epsilon(tuple(map(tuple, history)), delta, accountant)
    except (MemoryError, OverflowError, ValueError) as exc:
        # PRV and PLD discretize the composed privacy loss, in arrays that grow with the
        # steps: a huge num-rounds asks for more memory than exists (numpy says so with
        # MemoryError, OverflowError or "Maximum allowed size exceeded")
        if isinstance(exc, ValueError) and "allowed size" not in str(exc):
            raise
        steps = sum(int(t) for _, _, t in history)
        raise FedsimError(
            f"accountant {accountant} cannot count {steps} noisy steps ({type(exc).__name__}); "
            "use accountant rdp, or fewer rounds or local epochs"
        ) from None


MAX_POOLED = 16  # choices of one history per run that pooled_epsilon composes one by one


def pooled_epsilon(
    runs: Sequence[Iterable[History]], *, delta: float, accountant: str
) -> tuple[float, str]:
    """ε of one record that is in every run of ``runs``, in whichever client is worst.

    ``runs`` holds, per run, its clients' histories (the user unit: one). The runs of a
    sweep's point share their data: each record is in one client of each run, and a
    reader of all of them faces the composition. Where there are at most ``MAX_POOLED``
    ways to pick one distinct history per run, each pick is composed under
    ``accountant`` and the largest ε kept. Otherwise each run's RDP curve is the largest
    of its clients', order by order (a bound on every one of them), the runs' curves are
    added, and ε is ``rdp``'s.

    Parameters
    ----------
    runs : sequence of iterables of History
        Per run, each client's (σ, q, steps) history.
    delta : float
        The δ of the ε.
    accountant : str
        The accountant for picks composed one by one (a name in ``ACCOUNTANTS``).

    Returns
    -------
    tuple of (float, str)
        ε, and the name of the accountant that gave it.

    """
    choices = [sorted({merged_history(h) for h in histories}) or [()] for histories in runs]
    if math.prod(len(c) for c in choices) <= MAX_POOLED:
        eps = max(
            history_epsilon(list(merged_history(sum(pick, ()))), delta=delta, accountant=accountant)
            for pick in itertools.product(*choices)
        )
        return eps, accountant
    total = sum(np.max([_rdp_of(h) for h in c], axis=0) for c in choices)
    eps, _ = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=total, delta=delta)
    return float(eps), "rdp"


def merged_history(history: Iterable[tuple[float, float, int]]) -> tuple:
    """The history with equal (σ, q) entries merged, as a sorted tuple (a set member).

    Composition needs only each (σ, q)'s total steps; merged, a history costs one
    accountant step per distinct mechanism.
    """
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, t in history:
        steps[(float(sigma), float(q))] = steps.get((float(sigma), float(q)), 0) + int(t)
    return tuple((sigma, q, t) for (sigma, q), t in sorted(steps.items()))


def _rdp_of(history: tuple) -> np.ndarray:
    """RDP at each of ``RDP_ORDERS`` of a composed history."""
    return sum((_rdp_curve(s, q) * t for s, q, t in history), np.zeros(len(RDP_ORDERS)))


@functools.lru_cache(maxsize=4096)
def _epsilon(history: tuple, delta: float, accountant: str) -> float:
    # every round asks again for the histories it asked for before (clients with the
    # same size and participation count share one); a pure function, so remember them
    with _blas().limit(limits=1, user_api="blas"):
        return _named(accountant)(list(history), delta)


@functools.cache
def _blas() -> ThreadpoolController:
    """The process's BLAS libraries, found once (a fresh search costs ~2 ms a call).

    Opacus's PRV discretization runs BLAS on large arrays; inside a busy Flower + Ray
    process OpenBLAS's thread pool was seen spinning in exec_blas for minutes. One BLAS
    thread is as fast for these sizes and cannot wait on its pool.
    """
    return ThreadpoolController()
