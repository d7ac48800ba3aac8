"""Per-layer rules for clipping per-sample gradients without a second backward pass.

A rule gets a layer, the inputs of its forward call and dl_b/d(output) for every sample b
(the gradient of the *sum* of per-sample losses), and returns

- per-sample gradient norms, a list of ``(B,)`` tensors whose squares sum to the squared
  norm of the layer's trainable parameters (one a parameter, or one a layer);
- a function that, given the clipping coefficients ``c`` (``(B,)``), returns each
  parameter's clipped gradient sum ``sum_b c_b grad_b``.

Layers whose per-sample gradients are small (convolutions, norms) compute them and sum
them with weights. Layers whose per-sample gradients are big but are sums of outer
products (linear layers, the LSTM's gates, embeddings) never build them: norms come from
Gram matrices or row norms, and the clipped sum is one matrix product with dl/d(output)
scaled per sample ("book-keeping", Bu et al. 2023). Any other layer with parameters of its
own (a user's ``nn.Parameter``, ``PReLU``) is differentiated per sample by torch.func, whole
with its sublayers, as Opacus's ``hooks`` do, and so is a layer that runs several times in
one forward pass (``fedsim.dp.func_rules``). Every rule is exact;
the tests compare them with Opacus's per-sample gradients and with one backward pass per
sample.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from opacus.grad_sample import GradSampleModule
from opacus.layers import DPGRU, DPLSTM, DPRNN
from opacus.layers.dp_rnn import RNNLinear
from torch import Tensor, nn
from torch.nn.grad import conv1d_weight, conv2d_weight, conv3d_weight

from fedsim.dp.fast_lstm import LSTMGates
from fedsim.dp.per_sample import (
    Calls,
    CallsRule,
    ClipFn,
    Grads,
    Norms,
    Rule,
    gram64,
    norm,
    outer_weight,
    row_norms,
    scaled,
    summed_products,
    weighted,
)
from fedsim.errors import FedsimError


def linear_rule(layer: nn.Linear, inputs: tuple, grad: Tensor) -> tuple[Norms, ClipFn]:
    """``nn.Linear`` on ``(B, ..., in)``: row norms or Gram norms, clipped sum as one GEMM."""
    batch = grad.shape[0]
    a = inputs[0].reshape(batch, -1, layer.in_features).to(grad.dtype)
    g = grad.reshape(batch, -1, layer.out_features)
    return _outer_rule([(layer.weight, a)], [layer.bias], g)


def linear_calls_rule(layer: nn.Linear, calls: Calls) -> tuple[Norms, ClipFn]:
    """A linear layer that ran several times (a cell's step): its calls are more positions.

    A sample's gradient is ``sum_calls sum_t g_t a_t^T``, one call's over more positions,
    so the calls' inputs and output gradients go side by side into :func:`linear_rule`.
    """
    batch = calls[0][1].shape[0]
    a = torch.cat([inputs[0].reshape(batch, -1, layer.in_features) for inputs, _ in calls], 1)
    g = torch.cat([grad.reshape(batch, -1, layer.out_features) for _, grad in calls], 1)
    return linear_rule(layer, (a,), g)


def lstm_gates_rule(layer: LSTMGates, inputs: tuple, grad: Tensor) -> tuple[Norms, ClipFn]:
    """``FastDPLSTM``'s gates: W_ih and W_hh like linear layers over the sequence."""
    x, hs = inputs
    pairs = [(layer.weight_ih, x.to(grad.dtype)), (layer.weight_hh, hs[:, :-1].to(grad.dtype))]
    return _outer_rule(pairs, [layer.bias_ih, layer.bias_hh], grad)


def _outer_rule(
    pairs: Sequence[tuple[Tensor, Tensor]], maybe_biases: Sequence[Tensor | None], g: Tensor
) -> tuple[Norms, ClipFn]:
    """Weights with gradient ``sum_t g_t a_t^T``, biases with ``sum_t g_t``; all ``(B, T, .)``."""
    g_gram = functools.cache(lambda: gram64(g))  # the LSTM's two weights share g
    weights = [(w, outer_weight(a, g, g_gram)) for w, a in pairs if w.requires_grad]
    biases = [b for b in maybe_biases if b is not None and b.requires_grad]
    norms = [weight_norms for _, (weight_norms, _) in weights]
    bias_sum = None  # (B, out): every bias's per-sample gradient
    if biases:
        # one position (T = 1): its own gradient, a view, no reduction to launch
        bias_sum = g[:, 0] if g.shape[1] == 1 else g.sum(1)
        # the LSTM's two biases have the same gradient: its norm counts twice
        norms += [norm(bias_sum, 1)] * len(biases)

    def clip(coef: Tensor) -> Grads:
        out = {w: weight_clip(coef) for w, (_, weight_clip) in weights}
        if bias_sum is not None:
            summed = coef.to(g.dtype) @ bias_sum
            out.update({b: summed for b in biases})
        return out

    return norms, clip


def embedding_rule(
    layer: nn.Embedding | nn.EmbeddingBag, inputs: tuple, grad: Tensor
) -> tuple[Norms, ClipFn]:
    """``nn.Embedding``: norm² ``sum_{t,s: x_t = x_s} g_t . g_s``, clipped sum by ``index_add``.

    Rows hit by the same token add up, hence the pairs of equal tokens.
    """
    if layer.max_norm is not None or layer.scale_grad_by_freq or layer.sparse:
        raise FedsimError(
            "grad-sample 'fast' supports nn.Embedding without max_norm, "
            "scale_grad_by_freq or sparse; use grad-sample 'hooks'"
        )
    batch = grad.shape[0]
    ids = inputs[0].reshape(batch, -1)
    g = grad.reshape(batch, -1, layer.embedding_dim)
    if layer.padding_idx is not None:  # the padding row never gets a gradient
        g = g * (ids != layer.padding_idx).unsqueeze(2).to(g.dtype)
    same = (ids.unsqueeze(2) == ids.unsqueeze(1)).double()  # the inputs' (one-hot) Grams
    m = row_norms(g).sum(1)
    sq_norms = summed_products(gram64(g), same, m, layer.embedding_dim)

    def clip(coef: Tensor) -> Grads:
        rows = scaled(g, coef).reshape(-1, layer.embedding_dim)
        # out of place: under vmap over clients (fedsim.dp.cohort) the sum is batched
        summed = torch.zeros_like(layer.weight).index_add(0, ids.reshape(-1), rows)
        return {layer.weight: summed}

    return [sq_norms.sqrt().to(g.dtype)], clip


def embedding_bag_rule(layer: nn.EmbeddingBag, inputs: tuple, grad: Tensor) -> tuple[Norms, ClipFn]:
    """``nn.EmbeddingBag`` on ``(B, L)`` ids, ``sum`` or ``mean``: :func:`embedding_rule`.

    A bag's output gradient reaches each of its ids (over the bag's non-padding count for
    ``mean``), as an embedding's gradient reaches each position. Offsets, per-sample
    weights and ``max`` take Opacus's grad sampler, which expects offsets.
    """
    ids = inputs[0]
    if ids.dim() != 2 or any(t is not None for t in inputs[1:]) or layer.mode == "max":
        return per_sample_rule(layer, inputs, grad)
    keep = torch.ones_like(ids, dtype=grad.dtype)
    if layer.padding_idx is not None:  # padding is left out of the bag, and of its mean
        keep = (ids != layer.padding_idx).to(grad.dtype)
    if layer.mode == "mean":
        keep = keep / keep.sum(1, keepdim=True).clamp(min=1)
    return embedding_rule(layer, (ids,), grad.unsqueeze(1) * keep.unsqueeze(2))  # (B, L, D)


def per_sample_rule(layer: nn.Module, inputs: tuple, grad: Tensor) -> tuple[Norms, ClipFn]:
    """Any layer with an Opacus grad sampler: per-sample gradients, then their weighted sum.

    Right for layers whose per-sample gradients are small (norm layers, biases).
    """
    sampler = GradSampleModule.GRAD_SAMPLERS[type(layer)]
    return weighted(sampler(layer, list(inputs), grad), grad.shape[0])


_CONV_WEIGHT_GRAD = {
    nn.Conv1d: conv1d_weight,
    nn.Conv2d: conv2d_weight,
    nn.Conv3d: conv3d_weight,
}


def conv_rule(layer: nn.Conv2d, inputs: tuple, grad: Tensor) -> tuple[Norms, ClipFn]:
    """Convolutions: all per-sample weight gradients as one grouped weight gradient.

    Folding the batch into the groups lets the library's convolution kernel compute every
    sample's gradient at once; Opacus's unfold builds a tensor kernel-size times the input.
    """
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        return per_sample_rule(layer, inputs, grad)
    x = inputs[0].to(grad.dtype)
    batch, groups = x.shape[0], layer.groups
    weight = _CONV_WEIGHT_GRAD[type(layer)](
        x.reshape(1, -1, *x.shape[2:]),
        (batch * layer.out_channels, *layer.weight.shape[1:]),
        grad.reshape(1, -1, *grad.shape[2:]),
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=batch * groups,
    )
    grads: Grads = {}
    if layer.weight.requires_grad:
        grads[layer.weight] = weight.view(batch, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = grad.reshape(batch, layer.out_channels, -1).sum(2)
    return weighted(grads, batch)


RULES: dict[type[nn.Module], Rule] = {
    nn.Linear: linear_rule,
    RNNLinear: linear_rule,  # Opacus's DPGRU, DPRNN and DPLSTM cells: an nn.Linear
    nn.Conv1d: conv_rule,
    nn.Conv2d: conv_rule,
    nn.Conv3d: conv_rule,
    nn.Embedding: embedding_rule,
    nn.EmbeddingBag: embedding_bag_rule,  # Opacus's grad sampler needs offsets
    LSTMGates: lstm_gates_rule,
}
# layers run several times in one forward pass whose calls one rule takes together; any
# other takes func_rules.repeated_rule
CALLS_RULES: dict[type[nn.Module], CallsRule] = {
    nn.Linear: linear_calls_rule,
    RNNLinear: linear_calls_rule,
}


def total_norm(norms: Norms) -> Tensor:
    """Every sample's whole gradient norm, ``sqrt(sum_i n_i^2)``, from its parts' ``(B,)``.

    One ``stack`` and one ``vector_norm`` however many parts (sums of squares took an
    addition a part, then a square root).
    """
    if len(norms) == 1:
        return norms[0]
    return torch.linalg.vector_norm(torch.stack(norms), dim=0)


def rule_for(layer: nn.Module) -> Rule:
    """The rule of a layer type; Opacus's grad samplers cover the rest.

    Any other layer is refused here; ``fast``'s clipper gives it
    :func:`fedsim.dp.func_rules.functional_rule`.
    """
    if has_rule(layer):
        return RULES.get(type(layer), per_sample_rule)
    raise FedsimError(
        f"grad-sample 'fast' has no per-sample rule for {type(layer).__name__}; "
        "use grad-sample 'hooks' or a supported layer"
    )


def has_rule(layer: nn.Module) -> bool:
    """Whether a rule of its own, or an Opacus grad sampler, knows this layer type."""
    return type(layer) in RULES or type(layer) in GradSampleModule.GRAD_SAMPLERS


OPACUS_RNNS = (DPRNN, DPLSTM, DPGRU)


def rule_layers(module: nn.Module) -> list[nn.Module]:
    """The layers whose rules together clip ``module``, in ``modules()`` order.

    Every module with trainable parameters of its own; one without a rule takes its
    sublayers with it (``func_rules.functional_rule`` differentiates it whole), as Opacus
    does. Opacus's DP RNNs are not layers: their parameters are their cells' ``RNNLinear``
    weights under ``nn.RNN``'s names, and the cells are clipped, as in Opacus.
    """
    own = not isinstance(module, OPACUS_RNNS) and any(
        p.requires_grad for p in module.parameters(recurse=False)
    )
    if own and not has_rule(module):
        return [module]
    inner = [layer for child in module.children() for layer in rule_layers(child)]
    return [module, *inner] if own else inner


def shares_parameters(module: nn.Module) -> bool:
    """Whether two of its layers (:func:`rule_layers`) share a parameter: tied weights.

    Per-layer norms would miss the cross terms of such a parameter's gradient.
    """
    return layers_share(rule_layers(module))


def layers_share(layers: list[nn.Module]) -> bool:
    """:func:`shares_parameters` of the layers :func:`rule_layers` gave."""
    owned = [
        id(p)
        for layer in layers
        for p in layer.parameters(recurse=not has_rule(layer))
        if p.requires_grad
    ]
    return len(owned) != len(set(owned))
