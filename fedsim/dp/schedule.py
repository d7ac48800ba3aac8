"""One client's DP-SGD schedule in one round: the one place that fixes (q, steps).

The σ solver, the expected spend of a client that did not reply, and the client's own
Poisson data loader all use :func:`poisson_schedule`, so the ledger records exactly what
the solver assumed. Opacus's own loader takes ``int(1 / q)`` steps an epoch, which is
one step short of ``⌈n / B⌉`` for some batch counts (93, 99, 105, ...); the client's
loader is built from this schedule instead (``clients.training``). Opacus also divides by
``int(n · q)``, which is 0 for some n at batch size 1 (n = 49: 49 · (1/49) < 1 in floats);
the schedule's ``expected_batch`` is n / k exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """Poisson sampling at rate ``sample_rate`` for ``batches`` steps, ``epochs`` times."""

    sample_rate: float
    batches: int  # steps per epoch
    epochs: int
    expected_batch: float  # n / batches: DP-SGD divides the noised sum by it

    @property
    def steps(self) -> int:
        """DP-SGD steps in one round."""
        return self.batches * self.epochs


def poisson_schedule(num_examples: int, *, batch_size: int, epochs: int) -> Schedule:
    """``k = ⌈n / B⌉`` steps an epoch, each including every example with probability 1/k.

    The expected batch is then n/k ≤ B, and one epoch sees every example once on average.
    """
    batches = max(1, math.ceil(num_examples / batch_size))
    return Schedule(
        sample_rate=1.0 / batches,
        batches=batches,
        epochs=epochs,
        expected_batch=num_examples / batches,
    )


def run_schedules(
    sizes: Iterable[int], *, batch_size: int, epochs: int, rounds: int
) -> list[tuple[float, int]]:
    """(sample rate, steps over ``rounds``) of each distinct client size: what σ is solved on."""
    out = []
    for size in sorted(set(sizes)):
        s = poisson_schedule(size, batch_size=batch_size, epochs=epochs)
        out.append((s.sample_rate, s.steps * rounds))
    return out
