"""DP-SGD's Gaussian noise: one draw a step from a client's generator, added in fused ops.

Opacus's ``DPOptimizer`` treats each parameter on its own: it copies the clipped sum, fills
a zero tensor, draws the noise, adds it and divides by the expected batch size. That is
five kernels a parameter and step (150 for a 30-tensor Transformer), and on a GPU, where a
small model's step is limited by the host launching kernels, not by the arithmetic, they
cost as much as the training itself (docs/benchmarks.md). Here the noise of every
parameter is one draw of all their elements, in parameter order, and the copy, the sum and
the division are ``torch._foreach_*`` calls over all parameters (one kernel each on a GPU).

The mechanism is Opacus's: the noised sum ``(Σ clipped + N(0, σ²C²)) / E[B]`` per step,
with independent noise in every coordinate. Only which draw lands in which coordinate
differs: a seed gives other noise than Opacus's per-parameter draws, and the same noise
in the one-client path and the vectorized cohort (``fedsim.dp.cohort_update``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import Tensor, nn

from fedsim.errors import FedsimError


def gaussian_noise(
    std: float,
    numel: int,
    *,
    generator: torch.Generator | None,
    secure: bool,
    device: torch.device | str,
    dtype: torch.dtype,
) -> Tensor:
    """``numel`` independent draws of N(0, std²), flat, in one call on ``generator``.

    ``secure``: Opacus's float-safe noise (Holohan & Braghin 2021, section 5.1): a draw
    thrown away, then the sum of four draws halved, whose low-order bits no longer give
    the draw away. ``std = 0`` draws nothing.
    """
    if std == 0:
        return torch.zeros(numel, device=device, dtype=dtype)

    def draw(size: tuple[int, ...]) -> Tensor:
        return torch.normal(0.0, std, size, generator=generator, device=device, dtype=dtype)

    if not secure:
        return draw((numel,))
    draw((1, 1))  # as Opacus's secure mode: its first draw is discarded
    total = draw((numel,))
    for _ in range(3):
        total += draw((numel,))
    return total / 2


def split_like(flat: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    """``flat``'s last axis cut, in order, into views of ``shapes``: ``(..., *shape)`` each."""
    chunks = flat.split([math.prod(shape) for shape in shapes], dim=-1)
    return [c.view(*flat.shape[:-1], *shape) for c, shape in zip(chunks, shapes, strict=True)]


def fuse_noise_step(optimizer: DPOptimizer) -> None:
    """Make ``optimizer`` (Opacus's, any mode) noise and scale in one draw and fused ops.

    Replaces its ``add_noise`` and ``scale_grad`` and, for the one-backward-pass optimizer
    (``fast`` and ``ghost``), its ``accumulate``; its clipping, step hooks (the accountant)
    and the wrapped optimizer's step stay Opacus's.
    """
    if isinstance(optimizer, DPOptimizerFastGradientClipping):
        optimizer.accumulate = partial(_accumulate, optimizer.params)
    optimizer.add_noise = partial(_add_noise, optimizer)
    optimizer.scale_grad = partial(_scale_grad, optimizer)


def _accumulate(params: list[nn.Parameter]) -> None:
    """``DPOptimizerFastGradientClipping.accumulate``: Σ of the clipped ``p.grad``, fused."""
    grads = [_grad_of(p) for p in params]
    summed = [s for p in params if (s := getattr(p, "summed_grad", None)) is not None]
    if not summed:
        for p, copy in zip(params, _copies(grads), strict=True):
            p.summed_grad = copy  # type: ignore[attr-defined]
    elif len(summed) == len(params):
        torch._foreach_add_(summed, grads)
    else:
        raise FedsimError(
            "DP-SGD: some parameters hold an accumulated gradient and some none; "
            "call optimizer.zero_grad() after changing which parameters train"
        )


def _add_noise(optimizer: DPOptimizer) -> None:
    """``DPOptimizer.add_noise``: ``p.grad = p.summed_grad + noise``, the noise one draw."""
    params = optimizer.params
    summed = [p.summed_grad for p in params]
    for s in summed:
        _check_processed_flag(s)
    multiplier = getattr(optimizer, "_adjusted_noise_multiplier", optimizer.noise_multiplier)
    flat = gaussian_noise(
        multiplier * optimizer.max_grad_norm,
        sum(s.numel() for s in summed),
        generator=optimizer.generator,
        secure=optimizer.secure_mode,
        device=summed[0].device,
        dtype=summed[0].dtype,
    )
    views = split_like(flat, [s.shape for s in summed])
    noise = [n.to(s.dtype) for n, s in zip(views, summed, strict=True)]
    noised = torch._foreach_add(summed, noise)
    for p, grad, s in zip(params, noised, summed, strict=True):
        p.grad = grad.view_as(p)
        _mark_as_processed(s)


def _scale_grad(optimizer: DPOptimizer) -> None:
    """``DPOptimizer.scale_grad``: the mean over the expected batch, fused."""
    if optimizer.loss_reduction == "mean":
        divisor = optimizer.expected_batch_size * optimizer.accumulated_iterations
        torch._foreach_div_([_grad_of(p) for p in optimizer.params], divisor)


def _copies(tensors: list[Tensor]) -> list[Tensor]:
    """Fresh copies of ``tensors``, in one fused copy."""
    out = [torch.empty_like(t) for t in tensors]
    torch._foreach_copy_(out, tensors)
    return out


def _grad_of(p: nn.Parameter) -> Tensor:
    if p.grad is None:  # where Opacus's deepcopy of None.data would fail
        raise FedsimError(
            f"DP-SGD: a parameter of shape {tuple(p.shape)} got no gradient; "
            "freeze the parameters the model does not use (requires_grad=False)"
        )
    return p.grad
