"""The optimizer side of a cohort's step: each client's DP noise and its SGD update.

``fedsim.dp.cohort`` keeps K clients' weights stacked; these apply, to the clients still
training, what Opacus's ``DPOptimizer`` and ``torch.optim.SGD`` do to one client: the
noise from each client's own generator, one draw per parameter in parameter order, the
division by the expected batch size, then momentum and FedProx's pull.
"""

from __future__ import annotations

import torch
from opacus.optimizers.optimizer import _generate_noise
from torch import Tensor

from fedsim.dp.cohort_step import Weights
from fedsim.dp.randomness import DPRandomness
from fedsim.dp.schedule import poisson_schedule


class CohortNoise:
    """DP-SGD's noise and scale for the active clients: (Σ clipped + N(0, σ²C²)) / E[B]."""

    def __init__(
        self, rand: list[DPRandomness], std: float, sizes: list[int], *, batch_size: int
    ) -> None:
        self.rand, self.std = rand, std
        expected = [
            poisson_schedule(n, batch_size=batch_size, epochs=1).expected_batch for n in sizes
        ]
        self.expected = torch.tensor(expected, dtype=torch.float64)
        self._scales: dict[tuple, Tensor] = {}

    def __call__(self, summed: Weights, k: int) -> Weights:
        """``summed`` (k, *shape) each, noised and scaled; each generator draws as Opacus's."""
        out = {}
        for name, s in summed.items():  # per generator: one draw a parameter, in order
            noise = [_noise(self.std, s, j, r) for j, r in enumerate(self.rand[:k])]
            scale = self._expected_on(s)[:k].view(-1, *[1] * (s.dim() - 1))
            out[name] = (s + torch.stack(noise)) / scale
        return out

    def _expected_on(self, like: Tensor) -> Tensor:
        """E[B] per client on ``like``'s device and dtype, moved there once.

        Not every step: a copy from host memory waits for the device to finish all it was
        given, a host synchronisation per parameter and step.
        """
        key = (like.device, like.dtype)
        if key not in self._scales:
            self._scales[key] = self.expected.to(like.device, like.dtype)
        return self._scales[key]


def _noise(std: float, stacked: Tensor, j: int, rand: DPRandomness) -> Tensor:
    """N(0, std²) shaped like client j's ``stacked[j]``: the draws of Opacus's ``_generate_noise``.

    Opacus fills a zero tensor first, used only for std = 0 and secure noise; without
    them one ``torch.normal`` call is its whole draw, one kernel fewer per parameter, and
    no view of the client's row (the host is what limits a cohort's step on a GPU).
    """
    if std == 0 or rand.secure:
        return _generate_noise(
            std=std, reference=stacked[j], generator=rand.noise, secure_mode=rand.secure
        )
    return torch.normal(
        mean=0,
        std=std,
        size=stacked.shape[1:],
        device=stacked.device,
        generator=rand.noise,
        dtype=stacked.dtype,
    )


class CohortSGD:
    """``torch.optim.SGD`` (momentum, then FedProx's pull) on the active clients' weights."""

    def __init__(
        self,
        weights: Weights,
        *,
        lr: float,
        momentum: float,
        pull: float,
        noise: CohortNoise | None,
    ) -> None:
        self.weights, self.lr, self.momentum, self.pull = weights, lr, momentum, pull
        self.noise = noise
        # a zero velocity makes torch's first step (buf = grad) the general one: 0·m + g = g
        self.velocity = {n: torch.zeros_like(p) for n, p in weights.items()} if momentum else {}
        self.origin = {n: p.clone() for n, p in weights.items()} if pull else {}

    def __call__(self, grads: Weights, k: int) -> None:
        """One step of the first ``k`` clients, in place, from their gradients (k, *shape)."""
        grads = {name: grads[name] for name in self.weights}  # parameter order, as Opacus's
        if self.noise is not None:
            grads = self.noise(grads, k)
        for name, g in grads.items():
            p = self.weights[name][:k]  # a view: updates the stack in place
            if self.velocity:
                g = self.velocity[name][:k].mul_(self.momentum).add_(g)
            p.add_(g, alpha=-self.lr)
            if self.origin:
                p.sub_(self.pull * (p - self.origin[name][:k]))
