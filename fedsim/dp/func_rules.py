"""Clipping rules by torch.func, for layers the one-pass rules do not cover.

A layer without a rule of its own (a user's ``nn.Parameter``, ``PReLU``, a block with
parameters of its own) is differentiated per sample whole, with its sublayers, as
Opacus's ``hooks`` do; so is each call of a layer that runs several times in one forward
pass, whose calls' per-sample gradients add up before the norm. Both materialise
per-sample gradients, as Opacus does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from fedsim.dp.per_sample import Calls, CallsRule, ClipFn, Grads, Norms, Rule, weighted
from fedsim.errors import FedsimError

Outs = tuple[Tensor, ...]  # dl/d(output) of each tensor a call returned, in order
PerSample = Callable[[nn.Module, tuple, Any], Grads]  # one call's per-sample gradients


def output_tensors(output: Any) -> tuple[Tensor, ...]:
    """The tensors a layer returned, in order, in nested tuples, lists and dicts too."""
    if isinstance(output, Tensor):
        return (output,)
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, tuple | list):
        return tuple(t for item in output for t in output_tensors(item))
    return ()


def functional_rule(per_sample: PerSample) -> Rule:
    """Any layer: its per-sample gradients (:func:`functional_grads`), then summed."""

    def rule(layer: nn.Module, inputs: tuple, grad_outs: Outs) -> tuple[Norms, ClipFn]:
        return weighted(per_sample(layer, inputs, grad_outs), _batch(grad_outs))

    return rule


def repeated_rule(per_sample: PerSample) -> CallsRule:
    """A layer that ran several times in one forward pass (a cell applied at each step).

    A sample's gradient is the sum of what each call contributes, so each call's
    per-sample gradients (:func:`functional_grads`) are added up before the norm.
    """

    def rule(layer: nn.Module, calls: Calls) -> tuple[Norms, ClipFn]:
        total: Grads = {}
        for inputs, grad_outs in calls:
            for param, grads in per_sample(layer, inputs, grad_outs).items():
                total[param] = total[param] + grads if param in total else grads
        return weighted(total, _batch(calls[0][1]))

    return rule


def _batch(grad_outs: Outs | Tensor) -> int:
    """The batch size of one call's dl/d(output): a tensor, or a tuple of them."""
    return (grad_outs if isinstance(grad_outs, Tensor) else grad_outs[0]).shape[0]


def functional_grads(layer: nn.Module) -> PerSample:
    """Per-sample parameter gradients of one call of ``layer``, by torch.func.

    The layer runs again on each sample's inputs, with ``sum_i <output_i, dl_b/d(output_i)>``
    over the tensors it returns as the loss, whose gradient is the layer's per-sample
    parameter gradient. It runs as a copy on the ``meta`` device with the layer's own
    tensors swapped in, so that hooks added to the layer later (the clipper's) do not
    fire. Its first tensor argument is split by sample (batch first, as in Opacus); any
    other argument is the same for every sample, and a call whose outputs for one sample
    are not one sample's is refused.
    """
    stateless = _meta_copy(layer)
    name = type(layer).__name__

    def per_sample(layer: nn.Module, inputs: tuple, grad_outs: Outs | Tensor) -> Grads:
        if isinstance(grad_outs, Tensor):  # a layer with a rule, run repeatedly
            grad_outs = (grad_outs,)
        first = _first_tensor(name, inputs, _batch(grad_outs))
        trainable = {n: p.detach() for n, p in layer.named_parameters() if p.requires_grad}
        fixed = {n: p.detach() for n, p in layer.named_parameters() if not p.requires_grad}
        fixed.update(layer.named_buffers())
        args = [t.detach() if isinstance(t, Tensor) else t for t in inputs]

        def sample_loss(params: dict[str, Tensor], x: Tensor, gs: Outs) -> Tensor:
            call = (*args[:first], x.unsqueeze(0), *args[first + 1 :])  # x: (1, ...)
            outs = output_tensors(functional_call(stateless, {**params, **fixed}, call))
            shapes = [tuple(o.shape) for o in outs]
            if shapes != [(1, *g.shape) for g in gs]:  # another argument was per sample
                raise FedsimError(
                    f"grad-sample 'fast': one sample's call of {name} returned shapes "
                    f"{shapes}, not {[(1, *g.shape) for g in gs]}; pass it one tensor per "
                    "sample, first, or use a supported layer"
                )
            return torch.stack(
                [(o * g.unsqueeze(0)).sum() for o, g in zip(outs, gs, strict=True)]
            ).sum()

        grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(trainable, args[first], grad_outs)
        params = dict(layer.named_parameters())
        return {params[n]: gs for n, gs in grads.items()}

    return per_sample


def _first_tensor(name: str, inputs: tuple, batch: int) -> int:
    """The position of the first tensor of ``inputs``, which must be one row per sample."""
    first = next((i for i, t in enumerate(inputs) if isinstance(t, Tensor)), None)
    if first is None or inputs[first].dim() == 0 or len(inputs[first]) != batch:
        raise FedsimError(
            f"grad-sample 'fast': {name}'s first tensor input is not one row per "
            "sample; make it batch-first or use a supported layer"
        )
    return first


def _meta_copy(layer: nn.Module) -> nn.Module:
    """``layer`` copied with its parameters and buffers on ``meta``: no storage is copied."""
    memo: dict[int, Any] = {id(b): torch.empty_like(b, device="meta") for b in layer.buffers()}
    memo.update(
        (id(p), nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad))
        for p in layer.parameters()
    )
    return copy.deepcopy(layer, memo)
