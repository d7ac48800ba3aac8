"""Recurrent layers that a vectorized cohort can run: Opacus's DP RNNs for fused ones.

``torch.func.vmap`` has no batching rule for torch's fused recurrent kernels
(``nn.LSTM``, ``nn.GRU``, ``nn.RNN``: cuDNN or oneDNN, one call a sequence) nor for
``FastDPLSTM``'s recurrence (an ``autograd.Function``). Opacus's ``DPLSTM``, ``DPGRU`` and
``DPRNN`` compute the same functions with cells of ``RNNLinear`` layers stepped in Python,
which vmap batches and whose linear layers the cohort clips in one pass (each layer's
calls taken together). :func:`vectorizable` swaps them in, on a copy, with the replaced
layer's weights and its ``nn.LSTM``-style state_dict keys, so that the cohort's updates
carry the model's own keys. :func:`check_cohort_model` refuses, in one line, what a cohort
still cannot run: a subclass of one of those layers, and running statistics.
"""

from __future__ import annotations

import copy

from opacus.layers import DPGRU, DPLSTM, DPRNN
from opacus.layers.dp_rnn import DPRNNBase
from torch import nn

from fedsim.dp.fast_lstm import FastDPLSTM
from fedsim.errors import FedsimError

# each layer type, and the Opacus layer that computes the same function in cells
SWAPS: dict[type[nn.Module], type[DPRNNBase]] = {
    FastDPLSTM: DPLSTM,
    nn.LSTM: DPLSTM,
    nn.GRU: DPGRU,
    nn.RNN: DPRNN,
}


def vectorizable(model: nn.Module) -> nn.Module:
    """``model`` itself, or a copy with every layer of ``SWAPS`` replaced by its DP RNN."""
    if not any(type(m) in SWAPS for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    if type(model) in SWAPS:
        return dp_rnn(model)
    _swap_children(model)
    return model


def _swap_children(module: nn.Module) -> None:
    for name, child in module.named_children():
        if type(child) in SWAPS:
            setattr(module, name, dp_rnn(child))
        else:
            _swap_children(child)


def dp_rnn(layer: nn.Module) -> DPRNNBase:
    """Opacus's DP RNN for ``layer``: the same sizes, weights, state_dict keys and mode."""
    if getattr(layer, "proj_size", 0):
        raise FedsimError(
            f"vectorized cohort training does not support {type(layer).__name__} with "
            "proj_size (Opacus's DP RNNs, which vmap can batch, have none); set "
            "clients-per-worker = 1"
        )
    dropout = layer.dropout.p if isinstance(layer.dropout, nn.Dropout) else layer.dropout
    options = {"nonlinearity": layer.nonlinearity} if isinstance(layer, nn.RNN) else {}
    rnn = SWAPS[type(layer)](
        layer.input_size,
        layer.hidden_size,
        num_layers=layer.num_layers,
        bias=layer.bias,
        batch_first=layer.batch_first,
        dropout=dropout,
        bidirectional=layer.bidirectional,
        **options,
    )
    with_rnn_names(rnn)
    state = layer.state_dict(keep_vars=True)  # nn.LSTM's keys, FastDPLSTM's too
    rnn.load_state_dict(state)
    rnn.to(next(iter(state.values())))  # its device and dtype
    own = dict(rnn.named_parameters())  # nn.LSTM's names come first
    for key, value in state.items():
        own[key].requires_grad_(value.requires_grad)  # a frozen layer stays frozen
    # many forwards call nn.RNNBase's flatten_parameters (cuDNN's weight layout); cells
    # have no such layout, so for them it does nothing
    rnn.flatten_parameters = _no_layout
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
    (:func:`fedsim.dp.vectorize.vectorizable`); a subclass of theirs is refused.
    """
    name = type(model).__name__
    for layer in vectorizable(model).modules():
        kind = type(layer).__name__
        if isinstance(layer, nn.RNNBase | FastDPLSTM):
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
