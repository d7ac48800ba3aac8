"""Recurrent layers swapped for ones that compute the same and that DP-SGD or vmap can run.

torch's ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` run one fused kernel a sequence (cuDNN or
oneDNN): Opacus cannot take per-sample gradients through it, and ``torch.func.vmap`` has
no batching rule for it (nor for ``FastDPLSTM``'s recurrence, an ``autograd.Function``).

- For DP-SGD (:func:`dp_recurrent`, which ``build_model(dp=True)`` applies): ``nn.LSTM``
  becomes ``FastDPLSTM`` (exact per-sample gradients from whole-sequence products), and
  ``nn.GRU`` and ``nn.RNN`` Opacus's ``DPGRU`` and ``DPRNN``.
- For a vectorized cohort (:func:`vectorizable`): every one of those, ``FastDPLSTM``
  included, becomes Opacus's ``DPLSTM``, ``DPGRU`` or ``DPRNN``, cells of ``RNNLinear``
  layers stepped in Python, which vmap batches and whose linear layers the cohort clips
  in one pass (each layer's calls taken together).

A swapped layer has the replaced one's weights, frozen flags, device, dtype, mode and
``nn.LSTM``-style state_dict keys, so a model trains and averages under its own keys. A
subclass of these layers is left alone (its forward may differ), and so is an
``nn.LSTM`` with ``proj_size``, which none of them has: the per-sample checks then refuse
it in one line, and so does :func:`check_cohort_model`, with running statistics.
"""

from __future__ import annotations

import copy

from opacus.layers import DPGRU, DPLSTM, DPRNN
from opacus.layers.dp_rnn import DPRNNBase
from torch import nn

from fedsim.dp.attention import dp_attention
from fedsim.dp.fast_lstm import FastDPLSTM
from fedsim.dp.time_first import time_first_layers
from fedsim.errors import FedsimError

Swaps = dict[type[nn.Module], type[nn.Module]]
# each layer type, and the layer that computes the same function for DP-SGD
DP_SWAPS: Swaps = {nn.LSTM: FastDPLSTM, nn.GRU: DPGRU, nn.RNN: DPRNN}
# ... and in cells that vmap can batch
COHORT_SWAPS: Swaps = {FastDPLSTM: DPLSTM, nn.LSTM: DPLSTM, nn.GRU: DPGRU, nn.RNN: DPRNN}


def dp_recurrent(model: nn.Module) -> nn.Module:
    """``model`` with its layers of ``DP_SWAPS`` replaced, in place; returns it."""
    return _swapped(model, DP_SWAPS)


def vectorizable(model: nn.Module) -> nn.Module:
    """``model`` itself, or a copy with its layers of ``COHORT_SWAPS`` replaced.

    And its ``nn.MultiheadAttention`` layers and torch's time-first transformer layers
    swapped as DP-SGD swaps them (:func:`fedsim.dp.dp_attention`): the cohort then clips
    their projections in one pass, with each sample first, whether it is given the plain
    model or the one built for DP.
    """
    swappable = [m for m in model.modules() if type(m) in COHORT_SWAPS]
    attention = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    if not (swappable or attention or time_first_layers(model)):
        return model
    for layer in swappable:
        _refuse_projection(layer)
    return dp_attention(_swapped(copy.deepcopy(model), COHORT_SWAPS))


def _refuse_projection(layer: nn.Module) -> None:
    if getattr(layer, "proj_size", False):
        raise FedsimError(
            f"vectorized cohort training does not support {type(layer).__name__} with "
            "proj_size (Opacus's DP RNNs, which vmap can batch, have none); set "
            "clients-per-worker = 1"
        )


def _swapped(module: nn.Module, swaps: Swaps) -> nn.Module:
    if type(module) in swaps and not getattr(module, "proj_size", False):
        return equivalent(module, swaps[type(module)])
    for name, child in module.named_children():
        setattr(module, name, _swapped(child, swaps))
    return module


def equivalent(layer: nn.Module, kind: type[nn.Module]) -> nn.Module:
    """A ``kind`` layer (``FastDPLSTM`` or an Opacus DP RNN) computing what ``layer`` does.

    The same sizes, weights, frozen flags, device, dtype and mode, and ``nn.LSTM``'s
    state_dict keys.
    """
    dropout = layer.dropout.p if isinstance(layer.dropout, nn.Dropout) else layer.dropout
    options = {"nonlinearity": layer.nonlinearity} if isinstance(layer, nn.RNN) else {}
    rnn = kind(
        layer.input_size,
        layer.hidden_size,
        num_layers=layer.num_layers,
        bias=layer.bias,
        batch_first=layer.batch_first,
        dropout=dropout,
        bidirectional=layer.bidirectional,
        **options,
    )
    if isinstance(rnn, DPRNNBase):
        with_rnn_names(rnn)
        # many forwards call nn.RNNBase's flatten_parameters (cuDNN's weight layout);
        # cells have no such layout, so for them it does nothing (FastDPLSTM has its own)
        rnn.flatten_parameters = _no_layout
    state = layer.state_dict(keep_vars=True)  # nn.LSTM's keys, FastDPLSTM's too
    rnn.load_state_dict(state)
    rnn.to(next(iter(state.values())))  # its device and dtype
    own = rnn.state_dict(keep_vars=True)  # nn.LSTM's keys
    for key, value in state.items():
        own[key].requires_grad_(value.requires_grad)  # a frozen layer stays frozen
    return rnn.train(layer.training)


def _no_layout() -> None:
    """``flatten_parameters`` of a swapped layer: its cells keep no fused weight layout."""


def with_rnn_names(layer: DPRNNBase) -> DPRNNBase:
    """``layer`` with ``nn.LSTM``'s state_dict keys (``weight_ih_l0``, ...) only.

    Opacus's DP RNNs name each parameter twice, their cells' names and ``nn.LSTM``'s, and
    hide the cells' only where the layer is the top module: its hook filters a copy, which
    a parent module never sees. This one filters in place, and runs before Opacus's.
    """
    handle = layer.register_state_dict_post_hook(_drop_cell_names)
    layer._state_dict_hooks.move_to_end(handle.id, last=False)
    layer.register_load_state_dict_pre_hook(_add_cell_names)
    return layer


def _drop_cell_names(module: DPRNNBase, state_dict: dict, prefix: str, _: object) -> None:
    for cell_name in module.old_to_new:
        state_dict.pop(prefix + cell_name, None)


def _add_cell_names(module: DPRNNBase, state_dict: dict, prefix: str, *_: object) -> None:
    for cell_name, lstm_name in module.old_to_new.items():
        if prefix + lstm_name in state_dict:
            state_dict[prefix + cell_name] = state_dict[prefix + lstm_name]


def check_cohort_model(model: nn.Module) -> None:
    """Refuse, in one line, a model that vmap cannot batch or that keeps running statistics.

    ``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and ``FastDPLSTM`` train as Opacus's DP RNNs
    (:func:`vectorizable`: checked here without building them); a subclass of theirs, or
    one with ``proj_size``, is refused.
    """
    name = type(model).__name__
    for layer in model.modules():
        kind = type(layer).__name__
        if type(layer) in COHORT_SWAPS:
            _refuse_projection(layer)
        elif isinstance(layer, nn.RNNBase | FastDPLSTM):
            raise FedsimError(
                f"vectorized cohort training does not support {name}: torch.func.vmap has no "
                f"batching rule for its {kind}, a subclass of {type(layer).__mro__[1].__name__} "
                "(fused cuDNN/oneDNN kernels run one sequence at a time); use the layer "
                "itself or Opacus's DPLSTM/DPGRU/DPRNN, or set clients-per-worker = 1"
            )
        if getattr(layer, "track_running_stats", False):
            raise FedsimError(
                f"vectorized cohort training does not support {name}: its {kind} updates "
                "running statistics in training, which mix a batch's samples; use GroupNorm"
            )
