"""Exact per-sample quantities of weights whose gradient is a sum of outer products.

A linear layer over a sequence (or an LSTM's gate weights) has, for sample b, the weight
gradient ``G_b = sum_t g[b, t] a[b, t]^T`` with ``g`` = dl_b/d(output) and ``a`` the input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

Grads = dict[Tensor, Tensor]  # parameter -> its clipped gradient sum (or per-sample ones)
ClipFn = Callable[[Tensor], Grads]
Norms = list[Tensor]  # (B,) each; their squares sum to the layer's squared norms
# a rule takes its own layer type (clip_rules.RULES keys each rule by that type), the
# call's inputs and dl/d(output): a tensor, or a tuple of them for a layer differentiated
# by torch.func (func_rules.functional_rule), one per tensor the layer returned
Rule = Callable[[Any, tuple, Any], tuple[Norms, ClipFn]]
Calls = list[tuple[tuple, Any]]  # (inputs, dl/d(output)) of each call of one layer
CallsRule = Callable[[Any, Calls], tuple[Norms, ClipFn]]  # a layer that ran several times

# Per-sample gradients up to this many elements (32 MB in float32) are kept and summed with
# weights; above it, fresh allocations cost page faults and memory traffic that the Gram
# form and one matrix product avoid.
PER_SAMPLE_BUDGET = 1 << 23


def norm(t: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    """Euclidean norms over ``dim``: one operator (a sum of squares is two: ``pow``, ``sum``).

    Rules give norms, not their squares: the model's per-sample norm is then one
    ``vector_norm`` over all of them, where squares would need an addition a part and a
    square root (on a GPU every operator is a kernel launch).
    """
    return torch.linalg.vector_norm(t, dim=dim)


def scaled(t: Tensor, coef: Tensor) -> Tensor:
    """``t`` with sample b (dimension 0) multiplied by ``coef[b]``."""
    return t * coef.to(t.dtype).view(-1, *([1] * (t.dim() - 1)))


def outer_sum(g: Tensor, a: Tensor) -> Tensor:
    """``sum_{b,t} g[b, t] a[b, t]^T`` as one matrix product (einsum copies far more here)."""
    if not g.is_contiguous() and g.transpose(0, 1).is_contiguous():  # stored time-major
        g, a = g.transpose(0, 1), a.transpose(0, 1)
    return g.reshape(-1, g.shape[-1]).t() @ a.reshape(-1, a.shape[-1])


def gram64(x: Tensor) -> Tensor:
    """Every sample's Gram matrix ``x_b x_b^T``, ``(B, T, T)`` from ``(B, T, n)``, in float64."""
    x = x.double()
    return torch.bmm(x, x.transpose(1, 2))


def summed_products(gg: Tensor, aa: Tensor, m: Tensor, length: int) -> Tensor:
    """``sum_{t,s} gg[b,t,s] aa[b,t,s]`` per sample b, rounded *up* by its rounding error.

    The terms can cancel: a float32 sum may come out near 0 for a gradient of norm 4, and
    that sample would then not be clipped. So the Gram matrices are float64 and the result
    is raised by a bound on all its rounding: ``gamma_n |g_t| |g_s| |a_t| |a_s|`` per term
    (``gamma_n = n u``, ``n`` = ``length``, the two dot products' lengths), then
    ``gamma_{T^2}`` for the sum; with ``m_b = sum_t |g_t| |a_t|`` that is at most
    ``(length + T^2) u m_b^2``. The margin added is four times that (``eps`` = 2u, doubled
    for the second-order terms and the rounding of ``m`` itself).
    """
    total = (gg * aa).sum((1, 2))
    terms = length + gg.shape[1] ** 2 + 2
    return total.clamp(min=0) + 2 * terms * torch.finfo(torch.float64).eps * m.double().square()


def row_norms(x: Tensor) -> Tensor:
    """``|x[b, t]|`` for every b and t, in float64, from ``(B, T, n)``."""
    return torch.linalg.vector_norm(x, dim=2, dtype=torch.float64)


def weight_norms(a: Tensor, g: Tensor, g_gram: Callable[[], Tensor] | None = None) -> Tensor:
    """``|G_b|`` for every b, for ``a`` and ``g`` of shape ``(B, T, .)``.

    Takes the cheaper exact form: row norms when T = 1 (``|G_b| = |a_b| |g_b|``), else
    T x T Gram matrices (``|G_b|^2 = sum_{t,s} (g_t . g_s)(a_t . a_s)``,
    ``summed_products``) or the per-sample gradients themselves. ``g_gram`` gives
    ``gram64(g)`` where weights share ``g``.
    """
    steps, n_in, n_out = a.shape[1], a.shape[2], g.shape[2]
    if steps == 1:
        return norm(a, (1, 2)) * norm(g, (1, 2))
    if steps * (n_in + n_out) < n_in * n_out:
        gg = g_gram() if g_gram is not None else gram64(g)
        m = (row_norms(g) * row_norms(a)).sum(1)
        return summed_products(gg, gram64(a), m, n_in + n_out).sqrt().to(g.dtype)
    return norm(torch.bmm(g.transpose(1, 2), a), (1, 2))


def outer_weight(
    a: Tensor, g: Tensor, g_gram: Callable[[], Tensor] | None = None
) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``|G_b|`` for every b, and ``coef -> sum_b coef_b G_b``; ``a``, ``g`` ``(B, T, .)``.

    Either materialises the per-sample gradients (one ``bmm``, then a weighted sum) or
    never does (norms as above, the clipped sum as one matrix product with ``g`` scaled per
    sample), whichever costs fewer operations within ``PER_SAMPLE_BUDGET``.
    """
    batch, steps, n_in = a.shape
    n_out = g.shape[2]
    gram_cost = steps * steps * (n_in + n_out) if steps > 1 else 0
    if steps > 1 and batch * n_in * n_out <= PER_SAMPLE_BUDGET and 4 * n_in * n_out < gram_cost:
        grads = torch.bmm(g.transpose(1, 2), a)
        return norm(grads, (1, 2)), lambda coef: torch.tensordot(coef.to(g.dtype), grads, dims=1)

    def clip(coef: Tensor) -> Tensor:  # scale whichever factor is smaller
        if g.numel() <= a.numel():
            return outer_sum(scaled(g, coef), a)
        return outer_sum(g, scaled(a, coef))

    return weight_norms(a, g, g_gram), clip


def weighted(grads: Grads, batch: int) -> tuple[Norms, ClipFn]:
    """Norms and clipped sum of materialised per-sample gradients, ``(B, ...)`` each."""
    norms = [norm(gs.reshape(batch, -1), 1) for gs in grads.values()]

    def clip(coef: Tensor) -> Grads:
        return {p: torch.tensordot(coef.to(gs.dtype), gs, dims=1) for p, gs in grads.items()}

    return norms, clip
