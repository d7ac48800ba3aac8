"""The LSTM recurrence, with dL/d(gate pre-activations) of every step as its input's gradient.

``lstm_recurrence(gates_x, w_hh, h0, c0, lengths)`` runs ``g_t = gates_x_t + h_{t-1} W_hh^T``
and the cell for every step. Its backward returns dL/d(g_t) of every step as the gradient of
``gates_x``, which is what the per-sample gradients of ``FastDPLSTM`` are made of. ``W_hh``'s
gradient comes from one matrix product over the whole sequence instead of one per step.

Two ways run it, with the same results up to rounding:

- a loop: one autograd node whose forward and hand-written backward step through time in
  Python, about 8 operators a step forward and 15 back. On a CPU it is the faster one.
- ``fused``: torch's own LSTM kernel (cuDNN on a GPU, one call for the whole sequence) with
  an identity input weight and no biases. Its input *is* ``gates_x``, so autograd's gradient
  of that input is dL/d(gates). The identity costs a ``(4H, 4H)`` product a step, which a
  GPU does in one batched call; on a GPU the loop's thousands of kernel launches cost more.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from fedsim.dp.per_sample import outer_sum


def lstm_recurrence(
    gates_x: Tensor,
    w_hh: Tensor,
    h0: Tensor,
    c0: Tensor,
    lengths: Tensor | None,
    token: Tensor | None = None,
    *,
    fused: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run the LSTM cell over ``gates_x`` (``(B, T, 4H)``, gates i, f, g, o).

    ``w_hh`` gets no gradient here; pass ``token = hidden_weight_grad(...)`` to route
    dL/d(gates) to the node that computes it. ``fused`` runs torch's LSTM kernel instead of
    the loop (see the module notes); ``None``: on CUDA tensors only.

    Returns
    -------
    tuple
        ``output`` (``(B, T, H)``, 0 at padded steps), ``h_n`` and ``c_n`` (``(B, H)``, the
        states after each sequence's last valid step).

    """
    if gates_x.is_cuda if fused is None else fused:
        if token is not None:  # a zero: its node receives dL/d(gates) for W_hh
            gates_x = gates_x + token
        return _fused_recurrence(gates_x, w_hh.detach(), h0, c0, lengths)
    return _Recurrence.apply(gates_x, w_hh.detach(), h0, c0, lengths, token)


def _fused_recurrence(
    gates: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor, lengths: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.lstm`` on ``gates`` with ``W_ih = I``, no biases: (output, h_n, c_n)."""
    weights = [torch.eye(gates.shape[2], dtype=gates.dtype, device=gates.device), w_hh]
    hx = (h0.unsqueeze(0).contiguous(), c0.unsqueeze(0).contiguous())  # (layers, B, H)
    with warnings.catch_warnings():
        # cuDNN copies weights that are not views of one buffer into one (a few small
        # kernels) and warns every call; a buffer of our own would need the same copy
        warnings.filterwarnings("ignore", message="RNN module weights are not part")
        if lengths is None:
            out, h_n, c_n = torch.lstm(gates, hx, weights, False, 1, 0.0, True, False, True)
            return out, h_n[0], c_n[0]
        # packed like nn.LSTM packs: padded steps neither move the state nor get a gradient
        packed = pack_padded_sequence(gates, lengths, batch_first=True, enforce_sorted=False)
        order, undo = packed.sorted_indices, packed.unsorted_indices
        hx = (hx[0][:, order], hx[1][:, order]) if order is not None else hx
        data, h_n, c_n = torch.lstm(
            packed.data, packed.batch_sizes, hx, weights, False, 1, 0.0, True, False
        )
    out, _ = pad_packed_sequence(
        PackedSequence(data, packed.batch_sizes, order, undo),
        batch_first=True,
        total_length=gates.shape[1],
    )
    if undo is not None:
        h_n, c_n = h_n[:, undo], c_n[:, undo]
    return out, h_n[0], c_n[0]


def hidden_weight_grad(
    w_hh: Tensor, h_prev: Tensor, shape: torch.Size, reverse_lengths: Tensor | bool | None
) -> Tensor:
    """A zero stand-in of shape ``shape`` whose gradient becomes ``W_hh``'s.

    Pass it to ``lstm_recurrence`` as ``token``. ``h_prev`` (``(B, T + 1, H)``, in the input's
    time order) must hold ``h_{t-1}`` of every step by the time of the backward.
    ``reverse_lengths`` is ``False`` for a forward direction, else the ``lengths`` (or
    ``None``) the recurrence's input was reversed with. Being its own node, this runs only
    when ``W_hh``'s gradient is asked for.
    """
    return _HiddenWeightGrad.apply(w_hh, h_prev, shape, reverse_lengths)


class _HiddenWeightGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w_hh, h_prev, shape, reverse_lengths):
        ctx.h_prev = h_prev  # filled after this forward, so not a saved tensor
        ctx.reverse_lengths = reverse_lengths
        return w_hh.new_zeros(()).expand(shape)

    @staticmethod
    def backward(ctx, d_gates):
        if ctx.reverse_lengths is not False:
            d_gates = reverse_padded(d_gates, ctx.reverse_lengths)
        return outer_sum(d_gates, ctx.h_prev[:, :-1]), None, None, None


def reverse_padded(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Reverse each sequence of a batch-first tensor within its own length."""
    if lengths is None:
        return x.flip(1)
    steps = torch.arange(x.shape[1])
    valid = steps < lengths[:, None]
    index = torch.where(valid, lengths[:, None] - 1 - steps, steps).to(x.device)
    return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[2]))


def _valid_mask(lengths: Tensor | None, batch: int, steps: int, like: Tensor) -> Tensor | None:
    """``(T, B, 1)`` 1/0 of valid steps, or ``None`` when every step is valid."""
    if lengths is None or batch == 0 or int(lengths.min()) == steps:
        return None
    valid = torch.arange(steps)[:, None] < lengths[None, :]
    return valid.to(device=like.device, dtype=like.dtype).unsqueeze(2)


_sigmoid_backward = torch.ops.aten.sigmoid_backward.grad_input  # g * y * (1 - y), fused
_tanh_backward = torch.ops.aten.tanh_backward.grad_input  # g * (1 - y * y), fused


class _Recurrence(torch.autograd.Function):
    """Steps are stored time-major so that every step reads and writes contiguous rows."""

    @staticmethod
    def forward(ctx, gates_x, w_hh, h0, c0, lengths, token):
        batch, steps, four_h = gates_x.shape
        hidden = four_h // 4
        mask = _valid_mask(lengths, batch, steps, gates_x)
        acts = gates_x.new_empty(steps, batch, four_h)  # sigmoid i, f; tanh g; sigmoid o
        hs = gates_x.new_empty(steps + 1, batch, hidden)  # h_0 .. h_T
        cs = gates_x.new_empty(steps + 1, batch, hidden)  # c_0 .. c_T
        tanh_c = gates_x.new_empty(steps, batch, hidden)
        hs[0], cs[0] = h0, c0
        w_t = w_hh.t()
        for t in range(steps):
            a = acts[t]
            torch.addmm(gates_x[:, t], hs[t], w_t, out=a)
            a[:, : 2 * hidden].sigmoid_()
            a[:, 2 * hidden : 3 * hidden].tanh_()
            a[:, 3 * hidden :].sigmoid_()
            i, f, g, o = a.chunk(4, dim=1)
            c = torch.mul(f, cs[t], out=cs[t + 1]).addcmul_(i, g)
            torch.mul(o, torch.tanh(c, out=tanh_c[t]), out=hs[t + 1])
            if mask is not None:  # padded steps keep the state
                cs[t + 1] = torch.lerp(cs[t], cs[t + 1], mask[t])
                hs[t + 1] = torch.lerp(hs[t], hs[t + 1], mask[t])
        out = hs[1:] if mask is None else hs[1:] * mask
        ctx.save_for_backward(w_hh, cs, tanh_c, acts)
        ctx.mask = mask
        return out.transpose(0, 1), hs[steps].clone(), cs[steps].clone()

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn):
        w_hh, cs, tanh_c, acts = ctx.saved_tensors
        mask = ctx.mask
        steps, four_h = acts.shape[0], acts.shape[2]
        hidden = four_h // 4
        d_gates = torch.empty_like(acts)
        d_h = torch.zeros_like(cs[0]) if d_hn is None else d_hn.clone()
        d_c = torch.zeros_like(cs[0]) if d_cn is None else d_cn.clone()
        for t in reversed(range(steps)):
            i, f, g, o = acts[t].chunk(4, dim=1)
            if mask is not None:  # a padded step passes the state's gradient through
                keep_h, keep_c = d_h * (1 - mask[t]), d_c * (1 - mask[t])
            if d_out is not None:
                d_h = d_h + d_out[:, t]
            if mask is not None:
                d_h, d_c = d_h * mask[t], d_c * mask[t]
            d_c = d_c + _tanh_backward(d_h * o, tanh_c[t], grad_input=torch.empty_like(d_c))
            dg = d_gates[t]
            torch.mul(d_c, g, out=dg[:, :hidden])
            torch.mul(d_c, cs[t], out=dg[:, hidden : 2 * hidden])
            torch.mul(d_c, i, out=dg[:, 2 * hidden : 3 * hidden])
            torch.mul(d_h, tanh_c[t], out=dg[:, 3 * hidden :])
            for part, y, fn in (
                (slice(0, 2 * hidden), acts[t], _sigmoid_backward),
                (slice(2 * hidden, 3 * hidden), acts[t], _tanh_backward),
                (slice(3 * hidden, four_h), acts[t], _sigmoid_backward),
            ):
                fn(dg[:, part], y[:, part], grad_input=dg[:, part])
            d_c = d_c * f
            d_h = dg @ w_hh
            if mask is not None:
                d_h, d_c = d_h + keep_h, d_c + keep_c
        d_gates = d_gates.transpose(0, 1)
        return d_gates, None, d_h, d_c, None, d_gates
