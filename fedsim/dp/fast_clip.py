"""DP-SGD with per-sample clipping in one backward pass; Opacus's optimizer steps and counts.

Opacus computes per-sample gradients (``hooks``: materialised, ``B`` copies of every
weight) or runs two backward passes (``ghost``). ``make_private_fast`` does one backward
pass that asks autograd only for dl/d(output) of every trainable layer, never for the
ordinary parameter gradients. Per-layer rules (``fedsim.dp.clip_rules``) turn those into
per-sample gradient norms and, once the clipping coefficients are known, into the clipped
gradient sum, which becomes ``p.grad``. From there Opacus's own objects take over: the
optimizer is Opacus's ``DPOptimizerFastGradientClipping`` (steps the accountant), built by
``PrivacyEngine.make_private``, with its noise and scaling done in fused operations by
``fedsim.dp.noise`` (in every mode: one draw a step, the same mechanism), and the data loader is
Opacus's Poisson ``DPDataLoader`` on the schedule of ``fedsim.dp.schedule``, so the ledger
records exactly the (q, steps) the σ solver assumed. Masks and noise come from the
generators the caller passes (``fedsim.dp.randomness``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Container
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from fedsim.dp.clip_rules import (
    CALLS_RULES,
    has_rule,
    layers_share,
    rule_for,
    rule_layers,
    total_norm,
)
from fedsim.dp.fast_lstm import LSTMGates
from fedsim.dp.func_rules import functional_grads, functional_rule, output_tensors, repeated_rule
from fedsim.dp.noise import fuse_noise_step
from fedsim.dp.schedule import Schedule
from fedsim.errors import FedsimError

# layers whose rule sees a whole sequence in one call, and that cannot run again per sample
ONCE = (LSTMGates,)
Call = tuple[nn.Module, tuple, tuple[Tensor, ...], tuple[int, ...]]  # layer, in, out, versions


class FastClipper:
    """Clips per-sample gradients of ``module`` to ``max_grad_norm`` in one backward pass.

    Forward hooks on every layer with trainable parameters keep its inputs and output;
    ``backward(per_sample_loss)`` sets each trainable parameter's ``.grad`` to
    ``sum_b c_b grad_b l_b`` with ``c_b = min(1, C / (|grad_b| + 1e-6))`` (Opacus's formula).
    """

    def __init__(self, module: nn.Module, *, max_grad_norm: float) -> None:
        self.max_grad_norm = max_grad_norm
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.layers = rule_layers(module)
        if layers_share(self.layers):
            raise FedsimError(
                "grad-sample 'fast' does not support parameters shared between layers "
                "(tied weights); use grad-sample 'hooks'"
            )
        # before the hooks: each copies its layer once, and the copy must have none
        again = [m for m in self.layers if type(m) not in ONCE]  # may run repeatedly
        per_sample = {m: functional_grads(m) for m in again if type(m) not in CALLS_RULES}
        self.rules = {
            m: rule_for(m) if has_rule(m) else functional_rule(per_sample[m]) for m in self.layers
        }
        self.repeated = {
            m: CALLS_RULES[type(m)] if m not in per_sample else repeated_rule(per_sample[m])
            for m in again
        }
        self._signatures = {m: inspect.signature(m.forward) for m in self.layers if not has_rule(m)}
        self._calls: list[Call] = []
        self._handles = [
            m.register_forward_hook(self._capture)
            if has_rule(m)
            else m.register_forward_hook(self._capture_positional, with_kwargs=True)
            for m in self.layers
        ]
        self.per_sample_norms: Tensor | None = None  # of the last batch, before clipping

    def _capture(self, layer: nn.Module, inputs: tuple, output: Any) -> None:
        if not (layer.training and torch.is_grad_enabled()):
            return
        outputs = output_tensors(output)
        if has_rule(layer) and not isinstance(output, Tensor):
            raise FedsimError(f"grad-sample 'fast': {type(layer).__name__} must return a tensor")
        if not outputs:
            raise FedsimError(f"grad-sample 'fast': {type(layer).__name__} returned no tensor")
        self._calls.append((layer, inputs, outputs, _versions(inputs, outputs)))

    def _capture_positional(
        self, layer: nn.Module, inputs: tuple, kwargs: dict[str, Any], output: Any
    ) -> None:
        if kwargs:  # its rule calls it again, on positional arguments only
            inputs = _positional(layer, self._signatures[layer], inputs, kwargs)
        self._capture(layer, inputs, output)

    def close(self) -> None:
        """Remove the hooks; the module is a plain module again."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._calls = [], []

    def backward(self, per_sample_loss: Tensor) -> None:
        """Accumulate the clipped per-sample gradient sum into ``p.grad``."""
        calls, self._calls = self._calls, []
        batch = per_sample_loss.shape[0]
        if batch == 0 or not calls:  # an empty Poisson batch: only noise will be added
            self._accumulate({})
            return
        _check_calls(calls, self.repeated)
        by_layer = _grads_by_layer(calls, per_sample_loss.sum())
        dtype = self.params[0].dtype
        norms: list[Tensor] = []
        clips: list[Callable[[Tensor], dict]] = []
        for layer, layer_calls in by_layer.items():
            if len(layer_calls) == 1:
                layer_norms, clip = self.rules[layer](layer, *layer_calls[0])
            else:  # its calls' per-sample gradients add up before the norm
                layer_norms, clip = self.repeated[layer](layer, layer_calls)
            norms += layer_norms
            clips.append(clip)
        if norms:
            self.per_sample_norms = total_norm(norms).to(dtype)
        else:  # every layer's output was unused
            self.per_sample_norms = per_sample_loss.new_zeros(batch, dtype=dtype)
        coef = (self.max_grad_norm / (self.per_sample_norms + 1e-6)).clamp(max=1.0)
        summed: dict[nn.Parameter, Tensor] = {}
        for clip in clips:
            for param, grad in clip(coef).items():
                summed[param] = summed[param] + grad if param in summed else grad
        self._accumulate(summed)

    def _accumulate(self, summed: dict[nn.Parameter, Tensor]) -> None:
        # the rules run with autograd on (under no_grad, glibc gave freed blocks back to the
        # OS and the CNN's next step page-faulted them in again: +20 ms), hence the detach
        for p in self.params:
            grad = summed.get(p)
            grad = torch.zeros_like(p) if grad is None else grad.detach().to(p.dtype).view_as(p)
            p.grad = grad if p.grad is None else p.grad + grad


def _grads_by_layer(calls: list[Call], loss: Tensor) -> dict[nn.Module, list[tuple[tuple, Any]]]:
    """Each layer's calls that the loss used: their inputs and dl/d(output).

    dl/d(output) is a tensor for a layer with a rule; a tuple, one per tensor it returned
    (zeros where one went unused), for a layer differentiated by torch.func.
    """
    flat = [out for _, _, outputs, _ in calls for out in outputs]
    grads = iter(torch.autograd.grad(loss, flat, allow_unused=True))
    by_layer: dict[nn.Module, list[tuple[tuple, Any]]] = {}
    for layer, inputs, outputs, _ in calls:
        got = [next(grads) for _ in outputs]
        if all(g is None for g in got):
            continue
        if has_rule(layer):
            by_layer.setdefault(layer, []).append((inputs, got[0]))
        else:
            outs = tuple(
                torch.zeros_like(o) if g is None else g for o, g in zip(outputs, got, strict=True)
            )
            by_layer.setdefault(layer, []).append((inputs, outs))
    return by_layer


def _positional(
    layer: nn.Module, signature: inspect.Signature, args: tuple, kwargs: dict[str, Any]
) -> tuple:
    """A call's arguments, all positional, as the layer's torch.func rule passes them."""
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    if bound.kwargs:
        raise FedsimError(
            f"grad-sample 'fast': {type(layer).__name__} has no rule and takes keyword-only "
            f"arguments ({', '.join(bound.kwargs)}), which its rule cannot pass; make them "
            "positional"
        )
    return bound.args


def _versions(inputs: tuple, outputs: tuple[Tensor, ...]) -> tuple[int, ...]:
    """Version counters of the tensors a rule reads that autograd also tracks."""
    tracked = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]
    return tuple(t._version for t in [*tracked, *outputs])


def _check_calls(calls: list[Call], repeatable: Container) -> None:
    seen = set()
    for layer, inputs, outputs, versions in calls:
        name = type(layer).__name__
        if id(layer) in seen and layer not in repeatable:
            raise FedsimError(
                f"grad-sample 'fast': {name} ran twice in one forward pass "
                "(shared weights); use grad-sample 'hooks'"
            )
        seen.add(id(layer))
        if _versions(inputs, outputs) != versions:
            raise FedsimError(
                f"grad-sample 'fast': the input or output of {name} was modified in "
                "place (e.g. ReLU(inplace=True)); use an out-of-place op"
            )


class ClippedLoss:
    """What ``criterion(output, target)`` returns: ``.backward()`` clips per sample."""

    def __init__(self, clipper: FastClipper, per_sample: Tensor) -> None:
        self.clipper, self.per_sample = clipper, per_sample

    def backward(self) -> None:
        """Clip per sample and accumulate into ``p.grad`` (one backward pass)."""
        self.clipper.backward(self.per_sample)

    def item(self) -> float:
        """Mean loss of the batch."""
        return float(self.detach())

    def detach(self) -> Tensor:
        """Mean loss of the batch, as a tensor on its device (no host sync)."""
        return self.per_sample.detach().mean()


def make_private_fast(
    engine: PrivacyEngine,
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DPDataLoader,
    noise_multiplier: float,
    max_grad_norm: float,
    noise_generator: torch.Generator | None = None,
) -> tuple[
    nn.Module,
    torch.optim.Optimizer,
    Callable[[Tensor, Tensor], ClippedLoss],
    DPDataLoader,
    FastClipper,
]:
    """Like ``engine.make_private(..., grad_sample_mode="ghost")``, with one backward pass.

    ``data_loader`` is already the Poisson loader (:func:`poisson_loader`).

    Returns
    -------
    tuple
        The module (unchanged, with forward hooks), Opacus's DP optimizer, a cross-entropy
        criterion whose result's ``.backward()`` clips, the data loader, and the clipper
        (``close()`` it after training).

    """
    # Opacus builds and validates everything; its per-layer hooks are then replaced by ours
    hooks, dp_optimizer, _, dp_loader = engine.make_private(
        module=module,
        optimizer=optimizer,
        data_loader=data_loader,
        criterion=nn.CrossEntropyLoss(),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=False,  # the loader samples already, on the schedule's steps
        noise_generator=noise_generator,
        grad_sample_mode="ghost",
        wrap_model=False,
    )
    hooks.cleanup()
    fuse_noise_step(dp_optimizer)
    clipper = FastClipper(module, max_grad_norm=max_grad_norm)

    def criterion(output: Tensor, target: Tensor) -> ClippedLoss:
        return ClippedLoss(clipper, per_sample_cross_entropy(output, target))

    return module, dp_optimizer, criterion, dp_loader, clipper


def per_sample_cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    """One loss per sample, ``(B,)``: the mean over positions where there are several.

    ``output`` is ``(B, C)`` or ``(B, C, T)`` (one prediction per position), as for
    ``nn.functional.cross_entropy``. Opacus's ``hooks`` mode with a mean-reduced loss
    clips the gradient of this same per-sample mean.
    """
    losses = nn.functional.cross_entropy(output, target, reduction="none")
    return losses.flatten(1).mean(1) if losses.dim() > 1 else losses


def poisson_loader(
    dataset: TensorDataset, schedule: Schedule, generator: torch.Generator | None
) -> DPDataLoader:
    """Opacus's Poisson loader at rate ``schedule.sample_rate`` for exactly ``schedule.batches``.

    Opacus derives the steps as ``int(1 / q)``, one short of ``⌈n / B⌉`` for some batch
    counts; the schedule's own count is what the σ solver and the ledger assume.
    """
    loader = DPDataLoader(dataset, sample_rate=schedule.sample_rate, generator=generator)
    loader.batch_sampler.steps = schedule.batches
    return loader
