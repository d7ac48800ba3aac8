"""One client's training step, written to run inside ``vmap`` over a cohort's clients.

``fedsim.dp.cohort`` trains K clients at once with ``vmap`` over clients. The simple DP
step there, ``vmap(grad(...))`` over samples, builds every sample's gradient of every
parameter: for ``fedavg-cnn`` (1.66 M parameters, 1.6 M of them in one linear layer)
that is B copies of the model per client and step, written to memory, normed and summed.

``client_step`` gives ``fedsim.dp.cohort`` a client's gradient: the batch mean's without
DP; under DP the clipped sum, here by ``fast_clip``'s one-pass clipping in functional
form where every layer has a rule, else from per-sample gradients. A forward hook on every
trainable layer keeps the inputs of each of its calls and adds a zero tensor, a *probe*,
to the call's output. The gradient of the summed per-sample losses with respect to the
probes is every sample's dl_b/d(output), because samples do not mix
(``check_cohort_model`` refuses running statistics). The layer rules of
``fedsim.dp.clip_rules`` turn inputs and output gradients into exact per-sample norms
and, given the clipping coefficients, the clipped sum; linear layers never build
per-sample gradients, and one that runs at every step of a recurrence (Opacus's
``DPGRU`` cells) counts its calls as more positions. Same clipping, same sum, up to
float rounding (tests/test_cohort.py compares it with the per-sample step).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from fedsim.dp.clip_rules import (
    CALLS_RULES,
    has_rule,
    layers_share,
    rule_for,
    rule_layers,
    total_norm,
)
from fedsim.dp.loss import next_char_targets
from fedsim.dp.recurrent import vectorizable
from fedsim.errors import FedsimError

Weights = dict[str, Tensor]
# the active clients' step: weights, constants, x (k, B, ...), y, rows (k, B)
# -> grads (k, *shape) each, per-sample losses (k, B)
Step = Callable[[Weights, Weights, Tensor, Tensor, Tensor], tuple[Weights, Tensor]]
# weights, other state, x (B, ...), y -> per-sample losses (B,)
PerSample = Callable[[Weights, Weights, Tensor, Tensor], Tensor]
# weights, other state, x, y, rows (B,) -> clipped gradient sum per weight, per-sample losses
ClippedSum = Callable[[Weights, Weights, Tensor, Tensor, Tensor], tuple[Weights, Tensor]]
Call = tuple[nn.Module, tuple]  # a layer and the inputs of its forward call
Example = tuple[Weights, Weights, Tensor, Tensor]  # one client's weights, state, x[:1], y[:1]


def client_step(
    model: nn.Module,
    example: Example,
    *,
    dp: bool,
    clip: float,
    all_positions: bool,
    one_pass: bool = True,
) -> Step:
    """One client's step for vmap over clients: its gradient (DP: clipped sum), its losses.

    The losses are per sample, padding rows included: the caller weighs them with the
    host-side plan, which knows each batch's size, rather than the step reducing them.

    ``example`` is as in :func:`one_pass_clipped_sum`; ``all_positions`` as in
    ``clients.training.train_local``. ``one_pass=False`` clips per-sample gradients even
    where every layer has a rule (the reference).
    """
    per_sample = functional_per_sample(model, all_positions=all_positions)
    clipped_sum = None
    if dp and one_pass:
        clipped_sum = one_pass_clipped_sum(model, per_sample, example, clip=clip)

    def one(weights: Weights, consts: Weights, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        loss = per_sample(weights, consts, x[None], y[None]).sum()  # one sample, batch of 1
        return loss, loss

    # "different": each sample's forward draws its own dropout mask, as in a batch
    per_grad = vmap(grad(one, has_aux=True), in_dims=(None, None, 0, 0), randomness="different")

    def private(w: Weights, c: Weights, x: Tensor, y: Tensor, rows: Tensor) -> tuple:
        if clipped_sum is not None:
            return clipped_sum(w, c, x, y, rows)
        grads, loss = per_grad(w, c, x, y)  # (B, *shape) each, (B,)
        norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in grads.values()], 1)
        coef = (clip / (norms.norm(2, dim=1) + 1e-6)).clamp(max=1.0) * rows  # Opacus's; pad: 0
        summed = {n: torch.einsum("i,i...", coef.to(g.dtype), g) for n, g in grads.items()}
        return summed, loss

    def plain(w: Weights, c: Weights, x: Tensor, y: Tensor, rows: Tensor) -> tuple:
        def batch_mean(weights: Weights) -> tuple[Tensor, Tensor]:
            losses = per_sample(weights, c, x, y)
            return mean_loss(losses, rows), losses  # CrossEntropyLoss's mean, as train_local

        return grad(batch_mean, has_aux=True)(w)

    return private if dp else plain


def cohort_clipping(
    model: nn.Module, x: Tensor, y: Tensor, *, all_positions: bool
) -> Literal["one-pass", "per-sample"]:
    """How ``fedsim.dp.train_cohort`` clips ``model``'s per-sample gradients by default.

    In one pass where every trainable layer has a rule, else from per-sample gradients.
    ``x``, ``y``: training inputs and labels, one or more.
    """
    template = vectorizable(copy.deepcopy(model)).train()
    weights = {n: p.detach() for n, p in template.named_parameters() if p.requires_grad}
    consts = {n: p.detach() for n, p in template.named_parameters() if not p.requires_grad}
    consts.update(template.named_buffers())  # by path, as functional_call takes them
    per_sample = functional_per_sample(template, all_positions=all_positions)
    found = one_pass_clipped_sum(template, per_sample, (weights, consts, x[:1], y[:1]), clip=1.0)
    return "per-sample" if found is None else "one-pass"


def canonical_names(template: nn.Module) -> dict[str, str]:
    """Each state_dict key -> the attribute path of its tensor, which ``functional_call`` takes.

    A key may differ from the path: Opacus's ``DPGRU`` saves one parameter under two
    names (``functional_call`` takes the first path and ties the others), and
    ``FastDPLSTM`` and :class:`fedsim.dp.DPMultiheadAttention` save theirs under
    ``nn.LSTM``'s and ``nn.MultiheadAttention``'s keys.
    """
    path_of: dict[int, str] = {}
    for path, tensor in (*template.named_parameters(), *template.named_buffers()):
        path_of.setdefault(id(tensor), path)
    state = template.state_dict(keep_vars=True)
    return {key: path_of.get(id(tensor), key) for key, tensor in state.items()}


def mean_loss(loss: Tensor, rows: Tensor) -> Tensor:
    """Mean of the real rows' losses; 0 for an empty batch."""
    return (loss * rows).sum() / rows.sum().clamp(min=1)


def one_pass_clipped_sum(
    model: nn.Module, per_sample: PerSample, example: Example, *, clip: float
) -> ClippedSum | None:
    """The one-pass clipped sum for ``model``; ``None`` where a layer rules it out.

    ``example`` is one client's weights, other state, ``x[:1]`` and ``y[:1]``: one forward
    pass of it finds each call's probe shape. The layers are ``fast``'s
    (:func:`fedsim.dp.clip_rules.rule_layers`: Opacus's DP RNNs are their cells). A layer
    that runs several times (a cell's ``Linear`` at every step) takes its calls together
    (``CALLS_RULES``). ``None`` (use per-sample gradients) where a trainable layer has no
    rule, runs several times without such a rule, never runs, shares a parameter, or
    returns no tensor.
    """
    layers = rule_layers(model)
    if not layers or layers_share(layers) or not all(map(has_rule, layers)):
        return None
    probed = _probe_shapes(model, layers, per_sample, example)
    if probed is None:
        return None
    order = [layer for layer, _, _ in probed]  # every call, in the order they run
    rule_of = {layer: rule_for(layer) for layer in layers}
    names = {id(p): n for n, p in model.named_parameters()}
    dtypes = {dtype for _, _, dtype in probed}

    def clipped_sum(w: Weights, c: Weights, x: Tensor, y: Tensor, rows: Tensor) -> tuple:
        def summed_loss(probes: list[Tensor]) -> tuple[Tensor, tuple]:
            calls: list[Call] = []
            with _probed(order, calls, probes):
                losses = per_sample(w, c, x, y)  # (B,)
            return losses.sum(), (losses, [inputs for _, inputs in calls])

        zeros = {dtype: x.new_zeros((), dtype=dtype) for dtype in dtypes}  # one each, expanded
        probes = [zeros[dtype].expand(x.shape[0], *shape) for _, shape, dtype in probed]
        out_grads, (losses, inputs) = grad(summed_loss, has_aux=True)(probes)
        by_layer: dict[nn.Module, list[tuple[tuple, Tensor]]] = {}
        for layer, layer_inputs, g in zip(order, inputs, out_grads, strict=True):
            by_layer.setdefault(layer, []).append((layer_inputs, g))
        norms, clips = [], []
        for layer, calls in by_layer.items():
            if len(calls) == 1:
                layer_norms, layer_clip = rule_of[layer](layer, *calls[0])
            else:  # a sample's gradient sums its calls': they are more positions
                layer_norms, layer_clip = CALLS_RULES[type(layer)](layer, calls)
            norms += layer_norms
            clips.append(layer_clip)
        coef = (clip / (total_norm(norms) + 1e-6)).clamp(max=1.0) * rows  # Opacus's; pad: 0
        summed: Weights = {}
        for layer_clip in clips:
            for param, g_sum in layer_clip(coef).items():  # keyed by the module's parameter
                name = names[id(param)]
                summed[name] = summed[name] + g_sum if name in summed else g_sum
        return summed, losses

    return clipped_sum


@contextmanager
def _probed(order: list[nn.Module], calls: list[Call], probes: list[Tensor]) -> Iterator[None]:
    """Each call is recorded in ``calls`` and gets the next probe added to its output.

    ``order``: the layer of every call, in the order they ran when the probes were shaped.
    """
    pending = iter(probes)

    versions: list[tuple[int, ...]] = []

    def hook(layer: nn.Module, inputs: tuple, output: Any) -> Tensor:
        calls.append((layer, inputs))
        versions.append(_versions(inputs))
        return output + next(pending)

    handles = [layer.register_forward_hook(hook) for layer in dict.fromkeys(order)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    if [layer for layer, _ in calls] != order:
        raise FedsimError("a layer ran in another order than when its probes were shaped")
    _check_unmodified(calls, versions)


def _versions(inputs: tuple) -> tuple[int, ...]:
    return tuple(t._version for t in inputs if isinstance(t, Tensor))


def _check_unmodified(calls: list[Call], versions: list[tuple[int, ...]]) -> None:
    """Refuse a layer input changed in place after the layer ran: its rule would read it."""
    for (layer, inputs), seen in zip(calls, versions, strict=True):
        if _versions(inputs) != seen:
            raise FedsimError(
                f"vectorized DP-SGD: the input of {type(layer).__name__} was modified in "
                "place after it ran (e.g. x += layer(x)); use an out-of-place op "
                "(x = x + layer(x))"
            )


def _probe_shapes(
    model: nn.Module, layers: list[nn.Module], per_sample: PerSample, example: Example
) -> list[tuple[nn.Module, tuple[int, ...], torch.dtype]] | None:
    """The layer of each call in the order they ran, its output's shape past the batch.

    Also the output's dtype; ``None`` where a layer never runs, runs several times
    without a rule for its calls together, or returns something other than a tensor.
    """
    calls: list[Call] = []
    outputs: list[Any] = []
    versions: list[tuple[int, ...]] = []

    def record(layer: nn.Module, inputs: tuple, output: Any) -> None:
        calls.append((layer, inputs))
        outputs.append(output)
        versions.append(_versions(inputs))

    handles = [m.register_forward_hook(record) for m in layers]
    try:
        with torch.no_grad():
            per_sample(*example)
    finally:
        for handle in handles:
            handle.remove()
    _check_unmodified(calls, versions)  # before training, not in its first step
    ran = [layer for layer, _ in calls]
    counts = Counter(ran)
    if set(counts) != set(layers):  # a layer that never ran: its rule has nothing to read
        return None
    if any(n > 1 and type(layer) not in CALLS_RULES for layer, n in counts.items()):
        return None
    if not all(isinstance(out, Tensor) for out in outputs):
        return None
    return [(m, tuple(out.shape[1:]), out.dtype) for m, out in zip(ran, outputs, strict=True)]


def functional_per_sample(model: nn.Module, *, all_positions: bool) -> PerSample:
    """Per-sample cross-entropy of ``model`` called with given weights (``functional_call``)."""

    def per_sample(weights: Weights, consts: Weights, x: Tensor, y: Tensor) -> Tensor:
        if not all_positions:  # (B, C) logits
            return _cross_entropy(functional_call(model, (weights, consts), (x,)), y)
        targets = next_char_targets(x, y)  # (B, T)
        logits = functional_call(model, (weights, consts), (x,), {"all_positions": True})
        return _cross_entropy(logits, targets)  # (B, C, T) -> (B,)

    return per_sample


def _cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    """``fast_clip.per_sample_cross_entropy``, bit for bit, in operators vmap batches as such.

    Under ``vmap`` and ``grad``, ``cross_entropy`` decomposes into 22 operators (its
    ``ignore_index`` masks, forward and back); the log-softmax picked at the target, negated,
    is 9. ``target`` holds class indices: ``(B,)``, or ``(B, T)`` for ``(B, C, T)`` output.
    """
    losses = -torch.log_softmax(output, 1).gather(1, target.unsqueeze(1)).squeeze(1)
    return losses.flatten(1).mean(1) if losses.dim() > 1 else losses
