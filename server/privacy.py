"""Privacy ledger: what every client spent in every round; pure functions, no I/O.

The ledger holds, for every client, each round it trained in with the noise multiplier,
sample rate and number of DP-SGD steps that its Opacus optimizer reported. A client's ε
is the composition of all its rounds under one Opacus accountant; a run's ε is the
maximum over clients, since each client protects its own samples.

Sampling assumption: Poisson sampling of examples inside each client's DP-SGD. The
server's choice of which clients train in a round is *not* counted as amplification,
so the sample unit's ε is valid even if that choice were public. Where it must stay
secret (user-level DP samples the cohorts), the published sample-unit ε charges every
client for every round (:func:`all_rounds_epsilon`), so it reveals no cohort.

The accountants themselves are ``fedsim.dp.accounting``'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from fedsim.dp import history_epsilon, merged_history, poisson_schedule
from fedsim.messages import PrivacySpent

PRIVACY_UNIT_SAMPLE = "sample"
PRIVACY_UNIT_USER = "user"
SAMPLING = "poisson sampling of examples within each client; client selection not amplified"
USER_SAMPLING = "poisson sampling of clients, rate clients-per-round / num-clients"


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
    return list(merged_history((e.noise_multiplier, e.sample_rate, e.steps) for e in entries))


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
    return max(
        (
            history_epsilon(h, delta=delta, accountant=accountant)
            for h in all_rounds_histories(ledger, prescribed, rounds)
        ),
        default=0.0,
    )


def all_rounds_histories(
    ledger: Ledger, prescribed: Sequence[PrivacySpent], rounds: Sequence[int]
) -> list[list[tuple[float, float, int]]]:
    """The histories :func:`all_rounds_epsilon` takes the largest ε of."""
    histories = [_entries(spend, rounds) for spend in set(prescribed)]
    for client, entries in ledger.items():
        trained = {e.round for e in entries}
        missing = [r for r in rounds if r not in trained]
        histories.append(entries + _entries(prescribed[client], missing))
    return [_history(h) for h in histories]


def ledger_histories(ledger: Ledger) -> list[list[tuple[float, float, int]]]:
    """Each client's merged (σ, q, steps) history."""
    return [_history(entries) for entries in ledger.values()]


def dominating(
    histories: list[list[tuple[float, float, int]]],
) -> list[list[tuple[float, float, int]]]:
    """One history whose ε bounds every one of ``histories``', where one is easy to find.

    Where each is one (σ, q, steps) run at one shared σ, (σ, largest q, most steps): for a
    fixed σ, ε grows with the sample rate and with the steps. Otherwise the histories
    themselves. A costly accountant (a group's) then runs once, not once per client size.
    """
    if not histories or any(len(h) != 1 for h in histories):
        return histories
    runs = [h[0] for h in histories]  # (σ, q, steps) each
    if len({sigma for sigma, _, _ in runs}) != 1:
        return histories
    return [[(runs[0][0], max(q for _, q, _ in runs), max(t for _, _, t in runs))]]


def prescribed_spend(
    num_examples: int, *, noise_multiplier: float, batch_size: int, epochs: int
) -> PrivacySpent:
    """What one round of DP-SGD spends for a client of ``num_examples``: its schedule."""
    schedule = poisson_schedule(num_examples, batch_size=batch_size, epochs=epochs)
    return PrivacySpent((noise_multiplier,), (schedule.sample_rate,), (schedule.steps,))


def ledger_to_json(ledger: Ledger) -> dict[str, list[dict]]:
    """The ledger as JSON-ready data keyed by client id."""
    return {str(c): [asdict(e) for e in ledger[c]] for c in sorted(ledger)}


def ledger_from_json(data: dict[str, list[dict]]) -> Ledger:
    """Inverse of :func:`ledger_to_json`."""
    return {int(c): [LedgerEntry(**e) for e in entries] for c, entries in data.items()}
