"""Exact per-sample quantities of weights whose gradient is a sum of outer products.

A linear layer over a sequence (or an LSTM's gate weights) has, for sample b, the weight
gradient ``G_b = sum_t g[b, t] a[b, t]^T`` with ``g`` = dl_b/d(output) and ``a`` the input.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sq(t: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    """Sums of squares over ``dim`` (``vector_norm`` is several times faster than squaring)."""
    return torch.linalg.vector_norm(t, dim=dim).square()


def scaled(t: Tensor, coef: Tensor) -> Tensor:
    """``t`` with sample b (dimension 0) multiplied by ``coef[b]``."""
    return t * coef.to(t.dtype).view(-1, *([1] * (t.dim() - 1)))


def outer_sum(g: Tensor, a: Tensor) -> Tensor:
    """``sum_{b,t} g[b, t] a[b, t]^T`` as one matrix product (einsum copies far more here)."""
    if not g.is_contiguous() and g.transpose(0, 1).is_contiguous():  # stored time-major
        g, a = g.transpose(0, 1), a.transpose(0, 1)
    return g.reshape(-1, g.shape[-1]).t() @ a.reshape(-1, a.shape[-1])


def weight_sq_norms(a: Tensor, g: Tensor) -> Tensor:
    """``|G_b|^2`` for every b, for ``a`` and ``g`` of shape ``(B, T, .)``.

    Takes the cheaper exact form: row norms when T = 1, else T x T Gram matrices
    (``|G_b|^2 = sum_{t,s} (g_t . g_s)(a_t . a_s)``) or the per-sample gradients themselves.
    """
    steps, n_in, n_out = a.shape[1], a.shape[2], g.shape[2]
    if steps == 1:
        return sq(a, (1, 2)) * sq(g, (1, 2))
    if steps * (n_in + n_out) < n_in * n_out:
        gram = torch.bmm(g, g.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))
        return gram.sum((1, 2)).clamp(min=0)
    return sq(torch.bmm(g.transpose(1, 2), a), (1, 2))
