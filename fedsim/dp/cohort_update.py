"""The optimizer side of a cohort's step: each client's DP noise and its SGD update.

``fedsim.dp.cohort`` keeps K clients' weights stacked; these apply, to the clients still
training, what ``fedsim.dp.noise`` and ``torch.optim.SGD`` do to one client: the noise from
each client's own generator, one draw of all its parameters' elements in parameter order,
the division by the expected batch size, then momentum and FedProx's pull.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fedsim.dp.cohort_step import Weights
from fedsim.dp.noise import gaussian_noise, split_like
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
        """``summed`` (k, *shape) each, noised and scaled; each client's noise one draw.

        The sums are laid out as the noise is, one row of all parameters a client, so
        that the addition and the division are one operator each, not one a parameter;
        the results are views of that row. With more than one client those views are
        strided, and torch's fused ``_foreach_*`` kernels need tensors of equal strides:
        on a GPU :class:`CohortSGD`'s update then launches a kernel a parameter (still
        fewer launches in all than two a parameter here).
        """
        ref = next(iter(summed.values()))
        shapes = [s.shape[1:] for s in summed.values()]
        total = sum(math.prod(shape) for shape in shapes)
        noise = torch.stack(
            [
                gaussian_noise(
                    self.std,
                    total,
                    generator=r.noise,
                    secure=r.secure,
                    device=ref.device,
                    dtype=ref.dtype,
                )
                for r in self.rand[:k]
            ]
        )  # (k, Σ numel): client j's row is the draw train_local's optimizer makes
        flat = torch.cat([s.reshape(k, -1) for s in summed.values()], dim=1)  # (k, Σ numel)
        noised = flat.add_(noise).div_(self._expected_on(ref)[:k, None])
        return dict(zip(summed, split_like(noised, shapes), strict=True))

    def _expected_on(self, like: Tensor) -> Tensor:
        """E[B] per client on ``like``'s device and dtype, moved there once.

        Not every step: a copy from host memory waits for the device to finish all it was
        given, a host synchronisation per parameter and step.
        """
        key = (like.device, like.dtype)
        if key not in self._scales:
            self._scales[key] = self.expected.to(like.device, like.dtype)
        return self._scales[key]


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
        """One step of the first ``k`` clients, in place, from their gradients (k, *shape).

        Each line is one call over all parameters (``torch._foreach_*``: on a GPU one
        kernel where tensors share their strides, as weights and velocities do; the noised
        gradients of :class:`CohortNoise` do not, and take a kernel a parameter); the
        arithmetic is SGD's.
        """
        grads = {name: grads[name] for name in self.weights}  # parameter order, as Opacus's
        if self.noise is not None:
            grads = self.noise(grads, k)
        names = list(self.weights)
        step = [grads[name] for name in names]
        params = [self.weights[name][:k] for name in names]  # views: update the stack in place
        if self.velocity:
            velocity = [self.velocity[name][:k] for name in names]
            torch._foreach_mul_(velocity, self.momentum)
            torch._foreach_add_(velocity, step)
            step = velocity
        torch._foreach_add_(params, step, alpha=-self.lr)
        if self.origin:
            pulls = torch._foreach_sub(params, [self.origin[name][:k] for name in names])
            torch._foreach_mul_(pulls, self.pull)
            torch._foreach_sub_(params, pulls)
