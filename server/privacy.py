"""Privacy ledger and accounting: pure functions, no I/O.

The ledger holds, for every client, each round it trained in with the noise multiplier,
sample rate and number of DP-SGD steps that its Opacus optimizer reported. A client's ε
is the composition of all its rounds under one Opacus accountant; a run's ε is the
maximum over clients, since each client protects its own samples.

Sampling assumption: Poisson sampling of examples inside each client's DP-SGD. The
server's choice of which clients train in a round is *not* counted as amplification,
so the sample unit's ε is valid even if that choice were public. Where it must stay
secret (user-level DP samples the cohorts), the published sample-unit ε charges every
client for every round (:func:`all_rounds_epsilon`), so it reveals no cohort.

Neighbouring relations: ``rdp``, ``prv`` and ``pld`` bound add-or-remove-one (equal, for
Poisson sampling, to zeroing out one record: dp-accounting's REPLACE_SPECIAL).
``pld-replace-one`` bounds replacing one record by another, which is what a guarantee
for one client implies for one of its examples (or any other change of its data).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import dp_accounting
from dp_accounting import pld
from opacus.accountants import create_accountant
from threadpoolctl import ThreadpoolController

from fedsim.errors import FedsimError
from fedsim.messages import PrivacySpent
from fedsim.schedule import poisson_schedule

PRIVACY_UNIT_SAMPLE = "sample"
PRIVACY_UNIT_USER = "user"
SAMPLING = "poisson sampling of examples within each client; client selection not amplified"
USER_SAMPLING = "poisson sampling of clients, rate clients-per-round / num-clients"
MAX_SIGMA = 1e4
# Opacus's default orders stop at 63, which is loose for few steps at large ε; any order
# gives a valid bound, so more orders can only tighten ε, never make it optimistic.
RDP_ORDERS = (
    [1 + x / 10.0 for x in range(1, 100)]
    + list(range(12, 64))
    + [80, 96, 128, 192, 256, 384, 512, 1024]
)


@dataclass(frozen=True)
class LedgerEntry:
    """A run of DP-SGD steps with one noise multiplier and sample rate."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int


Ledger = dict[int, list[LedgerEntry]]


def record(ledger: Ledger, client: int, server_round: int, spent: PrivacySpent) -> None:
    """Append what ``client`` spent in ``server_round`` to the ledger."""
    ledger.setdefault(client, []).extend(_entries(spent, [server_round]))


def _entries(spent: PrivacySpent, rounds: Iterable[int]) -> list[LedgerEntry]:
    """Ledger entries for spending ``spent`` in each of ``rounds``."""
    runs = list(zip(spent.noise_multiplier, spent.sample_rate, spent.steps, strict=True))
    return [LedgerEntry(r, sigma, q, steps) for r in rounds for sigma, q, steps in runs]


def _history(entries: Iterable[LedgerEntry]) -> list[tuple[float, float, int]]:
    """Opacus history with equal (σ, q) runs merged; composition only needs the totals."""
    merged: dict[tuple[float, float], int] = {}
    for e in entries:
        merged[(e.noise_multiplier, e.sample_rate)] = (
            merged.get((e.noise_multiplier, e.sample_rate), 0) + e.steps
        )
    return [(sigma, q, steps) for (sigma, q), steps in sorted(merged.items())]


History = list[tuple[float, float, int]]


def _opacus_epsilon(name: str) -> Callable[[History, float], float]:
    def epsilon(history: History, delta: float) -> float:
        acc = create_accountant(mechanism=name)
        acc.history = list(history)
        extra = {"alphas": RDP_ORDERS} if name == "rdp" else {}
        return float(acc.get_epsilon(delta=delta, **extra))

    return epsilon


def _pld_epsilon(relation: dp_accounting.NeighboringRelation) -> Callable[[History, float], float]:
    def epsilon(history: History, delta: float) -> float:
        # the default (pessimistic) discretization over-reports, never under-reports
        acc = pld.PLDAccountant(relation, value_discretization_interval=1e-3)
        for sigma, q, steps in history:
            event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
            acc.compose(event, steps)
        return float(acc.get_epsilon(delta))

    return epsilon


REPLACE_ONE = "pld-replace-one"
# name -> ε of a (σ, q, steps) history of Poisson-subsampled Gaussian mechanisms
ACCOUNTANTS: dict[str, Callable[[History, float], float]] = {
    "rdp": _opacus_epsilon("rdp"),
    "prv": _opacus_epsilon("prv"),
    "pld": _pld_epsilon(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE),
    REPLACE_ONE: _pld_epsilon(dp_accounting.NeighboringRelation.REPLACE_ONE),
}


def history_epsilon(history: History, *, delta: float, accountant: str) -> float:
    """ε of one composed (σ, q, steps) history under a named accountant."""
    if not history:
        return 0.0
    return _epsilon(tuple(map(tuple, history)), delta, accountant)


@functools.lru_cache(maxsize=4096)
def _epsilon(history: tuple, delta: float, accountant: str) -> float:
    # every round asks again for the histories it asked for before (clients with the
    # same size and participation count share one); a pure function, so remember them
    with _blas().limit(limits=1, user_api="blas"):
        return ACCOUNTANTS[accountant](list(history), delta)


@functools.cache
def _blas() -> ThreadpoolController:
    """The process's BLAS libraries, found once (a fresh search costs ~2 ms a call).

    Opacus's PRV discretization runs BLAS on large arrays; inside a busy Flower + Ray
    process OpenBLAS's thread pool was seen spinning in exec_blas for minutes. One BLAS
    thread is as fast for these sizes and cannot wait on its pool.
    """
    return ThreadpoolController()


def client_epsilon(entries: list[LedgerEntry], *, delta: float, accountant: str) -> float:
    """ε of one client over every round it trained in."""
    return history_epsilon(_history(entries), delta=delta, accountant=accountant)


def run_epsilon(ledger: Ledger, *, delta: float, accountant: str) -> tuple[float, int | None]:
    """(max ε over clients, the client that attains it). (0, None) for an empty ledger."""
    best, who = 0.0, None
    for client in sorted(ledger):
        eps = history_epsilon(_history(ledger[client]), delta=delta, accountant=accountant)
        if eps > best:
            best, who = eps, client
    return best, who


def all_rounds_epsilon(
    ledger: Ledger,
    prescribed: Sequence[PrivacySpent],
    rounds: Sequence[int],
    *,
    delta: float,
    accountant: str,
) -> float:
    """Max ε over clients with every client charged for every round in ``rounds``.

    A client is charged what it reported where it trained and its ``prescribed[client]``
    spend elsewhere, so the value depends on the cohorts only where a report differs
    from the prescribed spend: a bound that can be published while cohorts stay secret.
    """
    histories = [_entries(spend, rounds) for spend in set(prescribed)]
    for client, entries in ledger.items():
        trained = {e.round for e in entries}
        missing = [r for r in rounds if r not in trained]
        histories.append(entries + _entries(prescribed[client], missing))
    return max(
        (client_epsilon(h, delta=delta, accountant=accountant) for h in histories), default=0.0
    )


def prescribed_spend(
    num_examples: int, *, noise_multiplier: float, batch_size: int, epochs: int
) -> PrivacySpent:
    """What one round of DP-SGD spends for a client of ``num_examples``: its schedule."""
    schedule = poisson_schedule(num_examples, batch_size=batch_size, epochs=epochs)
    return PrivacySpent((noise_multiplier,), (schedule.sample_rate,), (schedule.steps,))


def solve_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    accountant: str,
    schedules: Iterable[tuple[float, int]],
) -> float:
    """Smallest σ such that every client that trains in every round ends at ε ≤ target.

    Parameters
    ----------
    schedules
        One (sample rate, total steps over the whole run) per client.

    """
    unique = sorted(set(schedules))

    def worst(sigma: float) -> float:
        return max(
            history_epsilon([(sigma, q, t)], delta=delta, accountant=accountant) for q, t in unique
        )

    low, high = 0.0, 1.0
    while worst(high) > target_epsilon:
        low, high = high, 2 * high
        if high > MAX_SIGMA:
            raise FedsimError(
                f"target ε {target_epsilon} needs a noise multiplier above {MAX_SIGMA:g}; "
                "raise the target, or train fewer rounds or epochs"
            )
    while high - low > 1e-3 * high:  # ε(high) ≤ target always holds
        mid = (low + high) / 2
        low, high = (low, mid) if worst(mid) <= target_epsilon else (mid, high)
    return high


def ledger_to_json(ledger: Ledger) -> dict[str, list[dict]]:
    """The ledger as JSON-ready data keyed by client id."""
    return {str(c): [asdict(e) for e in ledger[c]] for c in sorted(ledger)}


def ledger_from_json(data: dict[str, list[dict]]) -> Ledger:
    """Inverse of :func:`ledger_to_json`."""
    return {int(c): [LedgerEntry(**e) for e in entries] for c, entries in data.items()}
