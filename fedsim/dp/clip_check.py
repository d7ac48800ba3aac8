"""A check, by one DP-SGD step of a copy, that the chosen per-sample mode can train a model.

Without it a model of one's own meets the clipping in its first round, in every worker,
after the engine has started. Opacus refuses some layers outright (``nn.LSTM``,
``nn.MultiheadAttention``) and has drop-ins for them. ``fast`` differentiates a layer
it has no rule for with torch.func, on a condition (one tensor per sample, first) that
only a call can check; its clipped sum with nothing clipped must then be autograd's
own gradient of the summed loss, which the check compares.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from opacus.layers import DPMultiheadAttention as OpacusAttention
from opacus.utils.module_utils import trainable_modules
from opacus.validators import ModuleValidator
from torch import Tensor, nn

from fedsim.dp.bound_check import check_clip_bound, fast_step, opacus_step, state_copy
from fedsim.dp.cohort import train_cohort
from fedsim.dp.loss import per_sample_loss
from fedsim.dp.private import GRAD_SAMPLE_MODES, choose_grad_sample
from fedsim.errors import FedsimError, first_line

# layers whose per-sample gradients Opacus cannot compute, and what to use instead
DROP_INS = {
    nn.LSTM: "fedsim.dp.FastDPLSTM (nn.LSTM's arguments, outputs and state-dict names)",
    nn.GRU: "opacus.layers.DPGRU",
    nn.RNN: "opacus.layers.DPRNN",
    nn.MultiheadAttention: (
        "fedsim.dp.DPMultiheadAttention (nn.MultiheadAttention's arguments and outputs; "
        "fedsim.dp.replace_attention(model) swaps every one in, weights included; a model "
        "built for DP-SGD has it already where kdim and vdim equal embed_dim)"
    ),
}


def check_clippable(
    model: nn.Module, x: Tensor, y: Tensor, *, grad_sample: str, all_positions: bool = False
) -> None:
    """Refuse, in one line, a model that DP-SGD in mode ``grad_sample`` cannot train.

    Opacus's validation first (``make_private`` repeats it in every mode), then one step
    of a copy of ``model`` on ``(x, y)``, a few training samples: through
    :func:`fedsim.dp.make_private`, or with ``fast`` its clipper's backward pass, whose
    per-sample gradients, none of them clipped, must add up to autograd's gradient of
    the summed loss. A buffer the step changed (running statistics of a layer of one's
    own), or a weight it changed at learning rate 0, is refused: clients send their
    whole state, and only the gradients are noised. Last, the mode must keep each
    sample's clipped gradient within the bound (:func:`check_clip_bound`). Every step
    trains the clients' loss (``all_positions``: every position of a window).
    """
    name = type(model).__name__
    _refuse_layers(model, name)
    try:
        grad_sample = choose_grad_sample(grad_sample, model)
        _check_mode(model, x, y, grad_sample, all_positions)
    except FedsimError as error:
        raise FedsimError(f"model {name}: {error}") from None
    except STEP_ERRORS as error:
        # the forward pass ran in check_samples_apart: this is the per-sample machinery's
        raise FedsimError(
            f"model {name} cannot be trained with grad-sample '{grad_sample}' "
            f"({first_line(error)}); {_instead(model, x, y, grad_sample, all_positions)}"
        ) from None


def _check_mode(
    model: nn.Module, x: Tensor, y: Tensor, grad_sample: str, all_positions: bool
) -> None:
    """A step of a copy, its state unchanged but for the weights, the bound; raises if not."""
    probe = copy.deepcopy(model)
    state = state_copy(probe)
    _step(probe, x, y, grad_sample, all_positions)
    _check_unchanged(probe, state)
    with _quiet():
        check_clip_bound(model, x, y, grad_sample=grad_sample, all_positions=all_positions)


STEP_ERRORS = (NotImplementedError, RuntimeError, TypeError, ValueError)


def _step(model: nn.Module, x: Tensor, y: Tensor, grad_sample: str, all_positions: bool) -> None:
    """One DP-SGD step of ``model`` (a copy) in mode ``grad_sample``; raises if it fails."""
    with _quiet():
        if grad_sample == "fast":
            _check_fast_sum(model, x, y, all_positions)
        else:
            opacus_step(model, x, y, grad_sample, 1.0, 1.0, all_positions=all_positions)


def _instead(model: nn.Module, x: Tensor, y: Tensor, failed: str, all_positions: bool) -> str:
    """What to do instead: the other modes whose step runs on this model, tried here."""
    works = []
    for mode in GRAD_SAMPLE_MODES:
        if mode == failed:
            continue
        try:  # every check the mode would meet; any failure rules it out
            _check_mode(model, x, y, choose_grad_sample(mode, model), all_positions)
        except Exception:  # a probe: how it failed does not matter here
            continue
        works.append(mode)
    if not works:
        return "no other grad-sample mode can train it either: change that layer"
    return f"grad-sample {' or '.join(works)} can (set it in the config)"


@contextmanager
def _quiet() -> Iterator[None]:
    """Without Opacus's warnings, which are about steps nobody will use."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _check_unchanged(probe: nn.Module, before: dict[str, Tensor]) -> None:
    """Refuse a buffer that a training step changed, or a weight it changed at lr 0."""
    for path, t in probe.state_dict(keep_vars=True).items():
        if path not in before or torch.equal(t.detach(), before[path]):
            continue
        what = "weight" if isinstance(t, nn.Parameter) else "buffer"
        raise FedsimError(
            f"its {what} '{path}' changed in a training step at learning "
            "rate 0, and would reach the server unnoised (DP-SGD noises gradients only); "
            f"keep {what}s fixed in the forward pass"
        )


def _refuse_layers(model: nn.Module, name: str) -> None:
    """What Opacus refuses by layer type, said in one line with what to use instead."""
    for path, layer in model.named_modules():
        if getattr(layer, "proj_size", False):  # build_model(dp=True) swaps the others
            raise FedsimError(
                f"model {name}: layer '{path}' is an nn.LSTM with proj_size, which no layer "
                "that DP-SGD can clip has (fedsim.dp.FastDPLSTM, Opacus's DPLSTM); drop "
                "proj_size and project with an nn.Linear after it"
            )
        if isinstance(layer, (nn.Embedding, nn.EmbeddingBag)) and layer.max_norm is not None:
            raise FedsimError(
                f"model {name}: layer '{path}' is an embedding with max_norm, which rescales "
                "the rows a batch looks up in place, outside DP-SGD's clipping and noise "
                "(the server would see which tokens a client holds); drop max_norm"
            )
        if type(layer) in DROP_INS:
            raise FedsimError(
                f"model {name}: layer '{path}' is an nn.{type(layer).__name__}, whose "
                f"per-sample gradients Opacus cannot compute; use {DROP_INS[type(layer)]}"
            )
        if isinstance(layer, OpacusAttention) and layer.batch_first:
            raise FedsimError(
                f"model {name}: layer '{path}' is Opacus's DPMultiheadAttention with "
                "batch_first=True, whose output permutes positions and heads within each "
                f"sample (Opacus 1.6); use {DROP_INS[nn.MultiheadAttention]}"
            )
    for path, layer in trainable_modules(model):
        if next(layer.buffers(), None) is not None:
            raise FedsimError(
                f"model {name}: layer '{path}' ({type(layer).__name__}) has trainable "
                "parameters and buffers, which Opacus refuses: the server would get the "
                "buffers unnoised; keep its constants in a layer without parameters"
            )
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise FedsimError(f"model {name}: {first_line(errors[0])}")


def _check_fast_sum(model: nn.Module, x: Tensor, y: Tensor, all_positions: bool) -> None:
    """``fast``'s unclipped per-sample gradients, summed, against autograd's gradient.

    Both passes run on ``model`` (a copy) from the same random state (dropout masks).
    """
    with torch.random.fork_rng(devices=[]):
        fast_step(model, x, y, float("inf"), all_positions=all_positions)
    summed = {path: p.grad for path, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    per_sample_loss(model, x, y, all_positions).sum().backward()
    # the model's largest gradient sets the tolerance: a parameter whose gradient is zero
    # in exact arithmetic (attention's key bias: softmax ignores it) holds rounding only
    scale = max((float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None),
                default=0.0) + 1e-12  # fmt: skip
    for path, p in model.named_parameters():
        want, got = p.grad, summed[path]
        if want is None or got is None:  # frozen, or unused by the loss
            continue
        if not torch.allclose(got, want, rtol=1e-3, atol=1e-4 * scale):
            raise FedsimError(
                f"grad-sample 'fast': the per-sample gradients of '{path}' do not add up to "
                "its gradient (a layer without a rule got an input that is not one row per "
                "sample?); use grad-sample 'hooks'"
            )


def check_cohort_step(
    model: nn.Module, x: Tensor, y: Tensor, *, dp: bool, all_positions: bool = False
) -> None:
    """Refuse, in one line, a model a vectorized cohort cannot train: one step of a copy.

    Besides :func:`fedsim.dp.check_cohort_model`'s layer types, what ``vmap`` and ``grad``
    refuse only when called: in-place updates of a buffer, data-dependent control flow.
    With ``dp``, the cohort must then keep each sample's clipped gradient within the bound
    (:func:`check_clip_bound`). Both train the clients' loss (``all_positions``).
    """
    probe = copy.deepcopy(model)
    name = type(model).__name__
    try:
        train_cohort(
            probe, [probe.state_dict()], [(x, y)], epochs=1, batch_size=len(y), lr=0.0,
            noise_multiplier=1.0 if dp else None, all_positions=all_positions,
        )  # fmt: skip
    # AttributeError: a forward that calls what only the swapped-out layer had
    except (AttributeError, NotImplementedError, RuntimeError, TypeError, ValueError) as error:
        raise FedsimError(
            f"model {name} cannot be trained as a vectorized cohort "
            f"({first_line(error)}); set clients-per-worker = 1"
        ) from None
    if dp:
        try:
            with _quiet():
                check_clip_bound(model, x, y, grad_sample="cohort", all_positions=all_positions)
        except FedsimError as error:
            raise FedsimError(f"model {name}: {error}") from None
