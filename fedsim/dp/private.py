"""DP-SGD in one of three per-sample modes, all with Opacus's optimizer, noise and ledger.

``fast`` clips in one backward pass (``fedsim.dp.fast_clip``); ``hooks`` and ``ghost``
are Opacus's own. ``auto`` picks one per model, from measurements.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import register_norm_sampler
from opacus.grad_sample.embedding import compute_embedding_norm_sample
from opacus.optimizers import DPOptimizer
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from fedsim.dp.clip_rules import shares_parameters
from fedsim.dp.fast_clip import make_private_fast, poisson_loader
from fedsim.dp.noise import fuse_noise_step
from fedsim.dp.randomness import DPRandomness
from fedsim.dp.schedule import Schedule
from fedsim.errors import FedsimError

GRAD_SAMPLE_MODES = ("fast", "hooks", "ghost")  # what ``auto`` chooses from


def choose_grad_sample(grad_sample: str, module: nn.Module) -> str:
    """The per-sample mode to train ``module`` with: ``grad_sample``, or ``auto``'s choice.

    ``auto`` is ``fast`` wherever ``fast`` can clip the model, and ``hooks`` where layers
    share a parameter (tied weights), which ``fast``'s per-layer norms cannot add up;
    ``ghost`` is refused there, as its per-layer norms would under-count such a gradient.
    Measured (docs/benchmarks.md): ``fast`` is the fastest of the three for every built-in
    model on a CPU, and on an H100 for the CNN, level with ``hooks`` for the Transformer
    and the LSTM (within the repeats' spread); no device changes the choice.
    """
    if grad_sample not in ("auto", *GRAD_SAMPLE_MODES):
        raise FedsimError(f"grad-sample must be auto or one of {', '.join(GRAD_SAMPLE_MODES)}")
    if grad_sample == "ghost" and shares_parameters(module):
        raise FedsimError(
            "grad-sample 'ghost' cannot clip a model whose layers share a parameter (tied "
            "weights): Opacus's ghost norms count each layer's part of its gradient alone, "
            "and one sample could move the sum by more than max-grad-norm; use 'hooks'"
        )
    if grad_sample != "auto":
        return grad_sample
    return "hooks" if shares_parameters(module) else "fast"


class PrivateTraining(NamedTuple):
    """What DP-SGD trains with: use these in place of the plain objects, then ``close()``.

    ``sample_norms()``: the last backward pass's per-sample gradient norms, before
    clipping, shape (B,); ``None`` before any pass or after an empty batch.
    """

    module: nn.Module
    optimizer: DPOptimizer
    criterion: Callable[[Tensor, Tensor], Any]
    data_loader: DPDataLoader
    close: Callable[[], None]
    sample_norms: Callable[[], Tensor | None]


def new_engine() -> PrivacyEngine:
    """Opacus's ``PrivacyEngine`` with its RDP accountant, without its secure-RNG warning.

    fedsim draws DP-SGD's randomness itself (``fedsim.dp.randomness``: from the operating
    system with ``secure-noise``, Opacus's float-safe noise included), so Opacus's own
    ``secure_mode``, which wants torchcsprng, stays off, and its "Secure RNG turned off"
    warning would tell a reader of a secure run's log the opposite of the truth.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        return PrivacyEngine(accountant="rdp")


def make_private(
    engine: PrivacyEngine,
    *,
    grad_sample: str,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: TensorDataset,
    schedule: Schedule,
    noise_multiplier: float,
    max_grad_norm: float,
    randomness: DPRandomness,
) -> PrivateTraining:
    """DP-SGD with Poisson sampling on ``schedule`` and cross-entropy loss.

    Parameters
    ----------
    grad_sample
        ``fast``: one backward pass with ``fedsim.dp.clip_rules`` (exact);
        ``hooks``: Opacus's per-sample gradients (the reference); ``ghost``: Opacus's
        ghost clipping (two backward passes); ``auto``: :func:`choose_grad_sample`'s
        choice (the default). The optimizer, noise and accountant are Opacus's in every
        mode, and so is the loss of a sample: its mean over positions.
    randomness
        The generators of the Poisson masks and of the noise.

    """
    grad_sample = choose_grad_sample(grad_sample, module)
    loader = poisson_loader(dataset, schedule, randomness.batches)
    args: dict[str, Any] = {
        "module": module,
        "optimizer": optimizer,
        "data_loader": loader,
        "noise_multiplier": noise_multiplier,
        "max_grad_norm": max_grad_norm,
        "noise_generator": randomness.noise,
    }
    private = _MODES[grad_sample](engine, args)
    # Opacus's secure_mode also wants torchcsprng; its float-safe noise needs only this flag
    private.optimizer.secure_mode = randomness.secure
    # Opacus's int(n · q) is 0 for n = 49 at batch size 1, and floors n / k everywhere
    private.optimizer.expected_batch_size = schedule.expected_batch
    return private


def _fast(engine: PrivacyEngine, args: dict[str, Any]) -> PrivateTraining:
    """``fast``: fedsim's one-pass clipping, with Opacus's optimizer and noise."""
    model, opt, criterion, loader, clipper = make_private_fast(engine, **args)
    return PrivateTraining(
        model, opt, criterion, loader, clipper.close, lambda: clipper.per_sample_norms
    )


def _ghost(engine: PrivacyEngine, args: dict[str, Any]) -> PrivateTraining:
    """``ghost``: Opacus's ghost clipping, its loss a sample's mean over positions."""
    model, opt, ghost, loader = engine.make_private(
        **args, criterion=nn.CrossEntropyLoss(), poisson_sampling=False, grad_sample_mode="ghost"
    )
    private = PrivateTraining(
        model, opt, _per_sequence(ghost), loader, model._close, partial(_ghost_norms, model)
    )
    fuse_noise_step(private.optimizer)
    return private


def _hooks(engine: PrivacyEngine, args: dict[str, Any]) -> PrivateTraining:
    """``hooks``: Opacus's per-sample gradients."""
    model, opt, loader = engine.make_private(
        **args, poisson_sampling=False, grad_sample_mode="hooks"
    )
    private = PrivateTraining(
        model, opt, nn.CrossEntropyLoss(), loader, model._close, partial(_hook_norms, opt)
    )
    fuse_noise_step(private.optimizer)
    return private


_MODES = {"fast": _fast, "ghost": _ghost, "hooks": _hooks}


def _hook_norms(optimizer: DPOptimizer) -> Tensor | None:
    """Per-sample gradient norms from Opacus's ``grad_sample``s, as its clipping takes them."""
    found = [getattr(p, "grad_sample", None) for p in optimizer.params]
    samples: list[Tensor] = [
        torch.cat(g) if isinstance(g, list) else g for g in found if g is not None
    ]
    if not samples or not len(samples[0]):
        return None
    per_param = [g.reshape(len(g), -1).norm(2, dim=-1) for g in samples]  # each (B,)
    return torch.stack(per_param, dim=1).norm(2, dim=1)


def _ghost_norms(module: Any) -> Tensor | None:
    """The per-sample gradient norms of Opacus's ghost clipping's first backward pass."""
    return module._per_sample_gradient_norms


def _per_sequence(ghost: Callable[..., Any]) -> Callable[[Tensor, Tensor], Any]:
    """Opacus's ghost criterion, told the sequence shape so a sample's loss is its mean."""

    def criterion(output: Tensor, target: Tensor) -> Any:
        if output.dim() != 3:
            return ghost(output, target)
        batch, classes, steps = output.shape
        flat = output.transpose(1, 2).reshape(batch * steps, classes)
        return ghost(flat, target.reshape(-1), shape=(batch, steps, classes))

    return criterion


@register_norm_sampler(nn.Embedding)
def _embedding_norms(
    layer: nn.Embedding, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Opacus's ghost-clipping norms of an embedding, from contiguous ids.

    Opacus 1.6 ``view``s the ids, which fails for ids made by ``expand`` (position ids,
    as in fedsim's Transformer); Opacus's public registry lets this fix it for any model.
    """
    ids = [a.contiguous() for a in activations]
    return compute_embedding_norm_sample(layer, ids, backprops)
