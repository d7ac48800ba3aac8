"""An LSTM whose per-sample gradients cost a few batched products, not a hook per time step.

Opacus's ``DPLSTM`` unrolls the sequence into ``RNNLinear`` calls, so its hooks compute and
accumulate per-sample gradients once per time step. ``FastDPLSTM`` keeps the parameters of
each layer and direction in one ``LSTMGates`` module. Its forward computes the input part of
the gate pre-activations for the whole sequence, ``x W_ih^T + b``; the recurrence adds
``h_{t-1} W_hh^T`` to it step by step. So the gradient Opacus captures at that module's output
is dL/d(gate pre-activations) of every step, and the per-sample gradients of all four
parameters are sums over time of outer products, one ``bmm`` each (``fedsim.lstm_grad``).

Opacus's ``DPOptimizer`` and accountant stay in charge: the module is registered with
``register_grad_sampler`` (``grad_sample_mode="hooks"``) and ``register_norm_sampler``
(``grad_sample_mode="ghost"``). State dicts use ``nn.LSTM``'s names (``weight_ih_l0``, ...),
so weights move freely between ``nn.LSTM``, ``DPLSTM`` and ``FastDPLSTM``.
"""

from __future__ import annotations

import functools
import math

import torch
from opacus.grad_sample import register_grad_sampler, register_norm_sampler
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from fedsim.dp.lstm_recurrence import hidden_weight_grad, lstm_recurrence, reverse_padded
from fedsim.dp.per_sample import gram64, weight_norms
from fedsim.errors import FedsimError


class LSTMGates(nn.Module):
    """The parameters of one LSTM layer in one direction, as in ``nn.LSTM``.

    ``forward(x, h_prev)`` returns ``x W_ih^T + b_ih + b_hh`` for the whole sequence
    (``(B, T, 4H)``, gates in ``nn.LSTM``'s order i, f, g, o). ``h_prev`` is not read here: it
    is an empty ``(B, T + 1, H)`` buffer that the caller fills once the recurrence has run:
    column t < T with ``h_{t-1}`` of step t, the last with the final state. Passing it in makes
    Opacus's forward hook keep it (a detached alias) as an activation, which the grad sampler
    needs for ``W_hh``. Its extra column lets the sampler detect a time-first layout.
    """

    def __init__(self, input_size: int, hidden_size: int, *, bias: bool = True) -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size)) if bias else None
        self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size)) if bias else None
        bound = 1.0 / math.sqrt(hidden_size)  # nn.LSTM's initialisation
        for param in self.parameters():
            nn.init.uniform_(param, -bound, bound)

    def forward(self, x: Tensor, h_prev: Tensor) -> Tensor:
        """``x W_ih^T + b_ih + b_hh``; ``h_prev`` is only captured (see the class notes)."""
        if hasattr(self, "ft_compute_sample_grad"):
            # functorch would differentiate this forward alone and miss W_hh's gradient
            raise FedsimError(
                "FastDPLSTM needs Opacus grad_sample_mode 'hooks' or 'ghost', not 'functorch'"
            )
        bias = None
        if self.bias_ih is not None and self.bias_hh is not None:
            bias = self.bias_ih + self.bias_hh
        return nn.functional.linear(x, self.weight_ih, bias)


class FastDPLSTM(nn.Module):
    """A multi-layer LSTM for DP-SGD with the interface of ``nn.LSTM`` / Opacus ``DPLSTM``.

    Parameters
    ----------
    input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional
        As in ``nn.LSTM`` (``proj_size`` is not supported).
    fused
        Run each layer's recurrence in torch's LSTM kernel (cuDNN on a GPU) instead of
        fedsim's loop (``fedsim.dp.lstm_recurrence``); ``None``: on CUDA tensors only.
        The same function, gradients and per-sample gradients either way, up to rounding.

    Notes
    -----
    ``forward(input, hx=None, *, lengths=None)`` returns ``(output, (h_n, c_n))`` like
    ``nn.LSTM``. ``input`` is a padded tensor or a ``PackedSequence``. ``lengths`` (``(B,)``
    integers) marks a padded tensor's valid steps: outputs at padded steps are 0, ``h_n`` and
    ``c_n`` are the states after each sequence's last valid step, and padded steps add
    nothing to any gradient, exactly as packing would. Wrap with Opacus at its default
    ``batch_first=True`` whatever this module's ``batch_first``.

    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        *,
        fused: bool | None = None,
    ) -> None:
        super().__init__()
        if num_layers < 1 or hidden_size < 1 or not 0.0 <= dropout < 1.0:
            raise FedsimError(
                "FastDPLSTM needs num_layers >= 1, hidden_size >= 1, 0 <= dropout < 1"
            )
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.bidirectional = bias, batch_first, bidirectional
        self.num_directions = 2 if bidirectional else 1
        self.fused = fused
        self.dropout = nn.Dropout(dropout)
        self.cells = nn.ModuleDict()
        for layer in range(num_layers):
            width = input_size if layer == 0 else hidden_size * self.num_directions
            for suffix in self._suffixes():
                self.cells[f"l{layer}{suffix}"] = LSTMGates(width, hidden_size, bias=bias)
        self.register_state_dict_post_hook(_to_lstm_names)
        self.register_load_state_dict_pre_hook(_from_lstm_names)

    def flatten_parameters(self) -> None:
        """``nn.LSTM``'s, which many forwards call: a no-op, no weights are kept fused."""

    def _suffixes(self) -> tuple[str, ...]:
        return ("", "_reverse") if self.bidirectional else ("",)

    def forward(
        self,
        input: Tensor | PackedSequence,
        hx: tuple[Tensor, Tensor] | None = None,
        *,
        lengths: Tensor | None = None,
    ) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
        """Run the LSTM; see the class notes for shapes and ``lengths``."""
        x, lengths, packed = self._as_padded(input, lengths)
        batch, states = x.shape[0], self.num_layers * self.num_directions
        if hx is None:
            zeros = x.new_zeros(states, batch, self.hidden_size)
            hx = (zeros, zeros)
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outputs = []
            for direction, suffix in enumerate(self._suffixes()):
                k = layer * self.num_directions + direction
                out, h, c = self._run(f"l{layer}{suffix}", x, hx[0][k], hx[1][k], lengths)
                outputs.append(out)
                h_n.append(h)
                c_n.append(c)
            x = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
            if layer < self.num_layers - 1:
                x = self.dropout(x)
        state = (torch.stack(h_n), torch.stack(c_n))
        if packed is not None and lengths is not None:  # a packed input has lengths
            return _repack(x, lengths, packed), state
        return (x if self.batch_first else x.transpose(0, 1)), state

    def _as_padded(
        self, input: Tensor | PackedSequence, lengths: Tensor | None
    ) -> tuple[Tensor, Tensor | None, PackedSequence | None]:
        """Batch-first padded input and its lengths (``None``: every step is valid)."""
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise FedsimError("FastDPLSTM: pass lengths or a PackedSequence, not both")
            x, lengths = pad_packed_sequence(input, batch_first=True)
            return x, lengths, input
        x = input if self.batch_first else input.transpose(0, 1)
        if x.dim() != 3 or x.shape[2] != self.input_size:
            raise FedsimError(
                f"FastDPLSTM expects input of shape (batch, time, {self.input_size}) "
                f"(time first unless batch_first), got {tuple(input.shape)}"
            )
        if lengths is not None:
            lengths = torch.as_tensor(lengths, dtype=torch.long).cpu()
            if lengths.shape != (x.shape[0],) or bool(
                (lengths < 1).any() | (lengths > x.shape[1]).any()
            ):
                raise FedsimError(
                    f"FastDPLSTM: lengths must be {x.shape[0]} integers in 1..{x.shape[1]}"
                )
        return x, lengths, None

    def _run(
        self, name: str, x: Tensor, h0: Tensor, c0: Tensor, lengths: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One layer in one direction: (output (B, T, H), h_n, c_n)."""
        cell: LSTMGates = self.cells[name]  # type: ignore[assignment]  # ModuleDict is untyped
        reverse = name.endswith("_reverse")
        h_prev = x.new_empty(x.shape[0], x.shape[1] + 1, self.hidden_size)
        gates_x = cell(x, h_prev)
        if reverse:
            gates_x = reverse_padded(gates_x, lengths)
        # W_hh's gradient comes from its own node (see hidden_weight_grad), so that a
        # backward that does not ask for parameter gradients skips it
        token = hidden_weight_grad(
            cell.weight_hh, h_prev, gates_x.shape, lengths if reverse else False
        )
        out, h_n, c_n = lstm_recurrence(
            gates_x, cell.weight_hh.detach(), h0, c0, lengths, token, fused=self.fused
        )
        with torch.no_grad():  # h_{t-1} of every step, in the time order of cell's output
            shifted = torch.cat([h0.unsqueeze(1), out[:, :-1]], dim=1)
            h_prev[:, :-1] = reverse_padded(shifted, lengths) if reverse else shifted
            h_prev[:, -1] = h_n
        if reverse:
            out = reverse_padded(out, lengths)
        return out, h_n, c_n


def _repack(x: Tensor, lengths: Tensor, like: PackedSequence) -> PackedSequence:
    """Pack a batch-first output in the same batch order as the packed input ``like``."""
    order = like.sorted_indices
    if order is None:
        packed = pack_padded_sequence(x, lengths, batch_first=True)
    else:
        packed = pack_padded_sequence(x[order], lengths[order.cpu()], batch_first=True)
    return PackedSequence(packed.data, packed.batch_sizes, order, like.unsorted_indices)


def _lstm_key(key: str) -> str:
    """``l0_reverse.weight_ih`` -> ``weight_ih_l0_reverse`` (``nn.LSTM``'s names)."""
    cell, _, param = key.partition(".")
    return f"{param}_{cell}"


def _to_lstm_names(module: FastDPLSTM, state_dict: dict, prefix: str, _meta: object) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "cells.")]:
        state_dict[prefix + _lstm_key(key.removeprefix(prefix + "cells."))] = state_dict.pop(key)


def _from_lstm_names(module: FastDPLSTM, state_dict: dict, prefix: str, *_args: object) -> None:
    for cell_name, cell in module.cells.items():
        for param_name, _ in cell.named_parameters():
            lstm_key = f"{prefix}{param_name}_{cell_name}"
            if lstm_key in state_dict:
                state_dict[f"{prefix}cells.{cell_name}.{param_name}"] = state_dict.pop(lstm_key)


def _gates_inputs(activations: list[Tensor], backprops: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(x, h_prev, dL/d gates), all ``(B, T, .)``, from what Opacus captured."""
    x, hs = activations
    if hs.shape[1] != backprops.shape[1] + 1 or x.shape[:2] != backprops.shape[:2]:
        raise FedsimError(
            "FastDPLSTM's per-sample gradients need Opacus's batch_first=True (the default "
            "of make_private), whatever the LSTM's own batch_first"
        )
    return x.to(backprops.dtype), hs[:, :-1].to(backprops.dtype), backprops


@register_grad_sampler(LSTMGates)
def lstm_gates_grad_sample(
    layer: LSTMGates, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradients: sums over time of outer products, one ``bmm`` per weight."""
    x, h_prev, d_gates = _gates_inputs(activations, backprops)
    d_t = d_gates.transpose(1, 2)
    grads = {}
    if layer.weight_ih.requires_grad:
        grads[layer.weight_ih] = torch.bmm(d_t, x)
    if layer.weight_hh.requires_grad:
        grads[layer.weight_hh] = torch.bmm(d_t, h_prev)
    for bias in (layer.bias_ih, layer.bias_hh):
        if bias is not None and bias.requires_grad:
            grads[bias] = d_gates.sum(dim=1)
    return grads


@register_norm_sampler(LSTMGates)
def lstm_gates_norm_sample(
    layer: LSTMGates, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradient norms for ghost clipping (Gram matrices where cheaper)."""
    x, h_prev, d_gates = _gates_inputs(activations, backprops)
    norms = {}
    g_gram = functools.cache(lambda: gram64(d_gates))
    for weight, a in ((layer.weight_ih, x), (layer.weight_hh, h_prev)):
        if weight.requires_grad:
            norms[weight] = weight_norms(a, d_gates, g_gram)
    for bias in (layer.bias_ih, layer.bias_hh):
        if bias is not None and bias.requires_grad:
            norms[bias] = torch.linalg.vector_norm(d_gates.sum(dim=1), dim=1)
    return norms
