"""A check that a per-sample mode bounds one sample's clipped gradient by C.

DP-SGD's guarantee rests on one sample moving the clipped sum by at most the norm bound
C. Each mode computes a sample's gradient norm its own way, layer by layer. A parameter
that is also used outside its own layer (a weight tied to another layer, or read by the
forward pass of other code) breaks that for Opacus's ghost clipping: it measures too
small a norm, and the clipped gradient can exceed C, which the noise does not cover.
(Opacus's hooks and the cohort's one-pass rules drop the outside part of such a gradient
instead: within C, though not the model's gradient; ``fast`` refuses such a model.) This
check runs the mode's own machinery on one sample at a time, without noise and with C at
half the sample's gradient norm, so that clipping must bite, and measures the result.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from fedsim.dp.cohort import train_cohort
from fedsim.dp.fast_clip import FastClipper
from fedsim.dp.loss import logits_and_targets, per_sample_loss
from fedsim.dp.private import make_private, new_engine
from fedsim.dp.randomness import secure_dp_randomness
from fedsim.dp.schedule import poisson_schedule
from fedsim.errors import FedsimError

Grads = dict[str, Tensor]
TOLERANCE = 1e-3  # of the norm bound: float32 rounding in the per-layer norms is ~1e-6


def check_clip_bound(
    model: nn.Module, x: Tensor, y: Tensor, *, grad_sample: str, all_positions: bool = False
) -> None:
    """Refuse, in one line, a mode that lets one sample's clipped gradient exceed the bound.

    For each sample of ``(x, y)``: the clipped gradient that mode ``grad_sample``
    (``fast``, ``hooks``, ``ghost``, or ``cohort``: a vectorized cohort's step, read from
    its update) computes for a batch of that one sample, trained on the loss the clients
    use (``all_positions``: every position of a next-character window), must not be
    longer than the norm bound.
    """
    mode = "a vectorized cohort" if grad_sample == "cohort" else f"grad-sample '{grad_sample}'"
    for i in range(len(y)):
        xi, yi = x[i : i + 1], y[i : i + 1]
        norm = _norm(_gradient(copy.deepcopy(model), xi, yi, all_positions).values())
        if not norm > 0:  # a sample with no gradient has nothing to clip
            continue
        bound = norm / 2
        got = _clipped(copy.deepcopy(model), xi, yi, grad_sample, bound, all_positions)
        length = _norm(got.values()) / bound
        if length > 1 + TOLERANCE:
            raise FedsimError(
                f"{mode} clipped one sample's gradient to {length:.4g} × the norm bound, more "
                "than the noise covers: a parameter is used outside its own layer (tied "
                f"weights, or read by other code); {_advice(grad_sample)}"
            )


def _advice(grad_sample: str) -> str:
    if grad_sample == "cohort":
        return "set clients-per-worker = 1, or use each parameter in one layer only"
    return "use grad-sample 'hooks', or use each parameter in one layer only"


def _gradient(model: nn.Module, x: Tensor, y: Tensor, all_positions: bool) -> Grads:
    """Autograd's gradient of the one sample's loss, by parameter path."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        per_sample_loss(model.train(), x, y, all_positions).sum().backward()
    return _grads(model)


def _clipped(
    model: nn.Module, x: Tensor, y: Tensor, grad_sample: str, bound: float, all_positions: bool
) -> Grads:
    """The clipped gradient that ``grad_sample``'s own machinery gives the one sample."""
    if grad_sample == "cohort":
        return _cohort_clipped(model, x, y, bound, all_positions)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if grad_sample == "fast":
            fast_step(model, x, y, bound, all_positions=all_positions)
        else:  # a batch of one: the step divides the clipped sum by 1
            opacus_step(model, x, y, grad_sample, 0.0, bound, all_positions=all_positions)
    return _grads(model)


def _grads(model: nn.Module) -> Grads:
    """Each trained parameter's ``grad`` by path, zeros where it got none."""
    return {
        path: torch.zeros_like(p) if p.grad is None else p.grad
        for path, p in model.named_parameters()
        if p.requires_grad
    }


def fast_step(
    model: nn.Module, x: Tensor, y: Tensor, max_grad_norm: float, *, all_positions: bool
) -> None:
    """``fast``'s clipped sum of the batch's per-sample gradients, left in each ``grad``.

    Its clipper alone, with no optimizer: a process's first optimizer imports
    ``torch._dynamo`` (1 s), which a check before any round need not pay.
    """
    clipper = FastClipper(model.train(), max_grad_norm=max_grad_norm)
    clipper.backward(per_sample_loss(model, x, y, all_positions))
    clipper.close()


def state_copy(model: nn.Module) -> dict[str, Tensor]:
    """A copy of the tensors of ``model``'s state_dict (weights and buffers, no extra state)."""
    state = model.state_dict(keep_vars=True)
    return {key: t.detach().clone() for key, t in state.items() if torch.is_tensor(t)}


def opacus_step(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    grad_sample: str,
    noise_multiplier: float,
    max_grad_norm: float,
    *,
    all_positions: bool,
) -> None:
    """One DP-SGD step on the batch ``(x, y)`` in mode ``hooks`` or ``ghost``, at lr 0.

    As a client takes it (:func:`fedsim.dp.make_private`); the noised, scaled sum is left
    in each parameter's ``grad``.
    """
    private = make_private(
        new_engine(),
        grad_sample=grad_sample,
        module=model.train(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        dataset=TensorDataset(x, y),
        schedule=poisson_schedule(len(y), batch_size=len(y), epochs=1),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        randomness=secure_dp_randomness(),
    )
    try:
        private.criterion(*logits_and_targets(private.module, x, y, all_positions)).backward()
        private.optimizer.step()
    finally:
        private.close()


def _cohort_clipped(
    model: nn.Module, x: Tensor, y: Tensor, bound: float, all_positions: bool
) -> Grads:
    """A one-client cohort's noiseless step, (start − end) / lr: its clipped gradient."""
    start = state_copy(model)
    largest = max(
        (float(t.abs().max()) for t in start.values() if t.is_floating_point()), default=0
    )
    lr = 1e3 * (largest + 1.0) / bound  # the step dwarfs the weights: no digits lost
    [update] = train_cohort(
        model, [start], [(x, y)], epochs=1, batch_size=1, lr=lr, noise_multiplier=0.0,
        max_grad_norm=bound, all_positions=all_positions,
    )  # fmt: skip
    key_of = {id(t): key for key, t in model.state_dict(keep_vars=True).items()}
    keys = {path: key_of[id(p)] for path, p in model.named_parameters() if p.requires_grad}
    return {path: (start[k].double() - update.state[k].double()) / lr for path, k in keys.items()}


def _norm(tensors: Iterable[Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))
