"""Multi-head attention with per-sample gradients: ``nn.MultiheadAttention``'s drop-in.

``nn.MultiheadAttention`` keeps its input projection in one parameter used inside a fused
function, so no per-sample rule sees its inputs; Opacus refuses it. Opacus's own
``DPMultiheadAttention`` is no drop-in with ``batch_first=True`` in Opacus 1.6: its output
``view``s a (batch·heads, T, head) tensor as (batch, T, width), which permutes positions
and heads within each sample (0.66 off ``nn.MultiheadAttention`` on random inputs).

Here the projections are ``nn.Linear`` layers, fed batch-first, whose per-sample
gradients every mode computes exactly (fedsim's linear rule under ``fast``); the
attention between them has no parameters, so its dropout needs no replaying. Where key
and value are as wide as the query (``kdim = vdim = embed_dim``, the usual case) the input
projection is one ``nn.Linear(E, 3E)`` saved under ``nn.MultiheadAttention``'s keys
(``in_proj_weight``, ``in_proj_bias``), so the layer is a drop-in for the state_dict too:
``build_model(dp=True)`` swaps it in (:func:`dp_attention`) and a plain server model
averages what it trains. Otherwise it has three projections of its own.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedsim.dp.time_first import batch_first_inside
from fedsim.errors import FedsimError

PACKED = ("weight", "bias")  # in_proj.weight <-> nn.MultiheadAttention's in_proj_weight


class DPMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention(embed_dim, num_heads, dropout, bias, kdim, vdim, batch_first)``.

    ``add_bias_kv`` and ``add_zero_attn`` are not supported. Loads an
    ``nn.MultiheadAttention`` state_dict; with ``kdim = vdim = embed_dim`` it also saves
    one, with the others its three projections.
    """

    # what nn.TransformerEncoderLayer reads before it picks its fused inference path:
    # without an in_proj_bias it keeps to the plain path, which calls this module
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        if add_bias_kv or add_zero_attn:
            raise FedsimError("DPMultiheadAttention does not support add_bias_kv or add_zero_attn")
        if embed_dim % num_heads:
            raise FedsimError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.batch_first = batch_first
        self.packed = (kdim or embed_dim) == embed_dim and (vdim or embed_dim) == embed_dim
        if self.packed:  # nn.MultiheadAttention's in_proj_weight, as one layer
            self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        else:
            self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
            self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
            self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.register_state_dict_post_hook(_saved_as_nn)
        self.register_load_state_dict_pre_hook(_loaded_from_nn)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attention of ``query`` over ``key``/``value``; (output, weights or None)."""
        q, k, v = self._project(query, key, value)  # (B, T, E), (B, S, E), (B, S, E)
        batch, length, _ = q.shape
        heads, width = self.num_heads, self.embed_dim // self.num_heads

        def split(t: Tensor) -> Tensor:  # (B, T, E) -> (B, heads, T, width)
            return t.reshape(batch, -1, heads, width).transpose(1, 2)

        q, k, v = split(q), split(k), split(v)
        mask = _additive_mask(attn_mask, key_padding_mask, is_causal, q, k)
        scores = q @ k.transpose(-2, -1) / width**0.5  # (B, heads, T, S)
        if mask is not None:
            scores = scores + mask
        weights = nn.functional.dropout(scores.softmax(-1), self.dropout, self.training)
        out = (weights @ v).transpose(1, 2).reshape(batch, length, self.embed_dim)
        out = self.out_proj(out)  # (B, T, E)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(1) if average_attn_weights else weights

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, ...]:
        """Batch-first q, k, v: each projection sees one sample's rows."""
        same = (query is key, key is value)  # before the transposes make new tensors
        if not self.batch_first:  # (T, B, E) -> (B, T, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if not self.packed:
            return self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if all(same):  # self-attention
            return self.in_proj(query).chunk(3, -1)
        # one call on the inputs side by side, so the layer runs once a forward pass (as
        # every per-sample mode needs); the blocks not kept get no gradient
        inputs = [query, key] if same[1] else [query, key, value]
        rows = [t.shape[1] for t in inputs]
        parts = self.in_proj(torch.cat(inputs, 1)).split(rows, 1)  # (B, T + S (+ S), 3E)
        wide = [part.chunk(3, -1) for part in parts]
        return wide[0][0], wide[1][1], wide[-1][2]


def _additive_mask(
    attn_mask: Tensor | None, key_padding_mask: Tensor | None, is_causal: bool, q: Tensor, k: Tensor
) -> Tensor | None:
    """The masks as one additive (B or 1, heads or 1, T, S) mask; True in a bool mask hides."""
    batch, heads, length, source = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(length, source, dtype=torch.bool, device=q.device).triu(1)
    mask = None
    if attn_mask is not None:
        mask = _additive(attn_mask, q.dtype)
        mask = mask.view(batch, heads, length, source) if mask.dim() == 3 else mask
    if key_padding_mask is not None:
        padding = _additive(key_padding_mask, q.dtype).view(batch, 1, 1, source)
        mask = padding if mask is None else mask + padding
    return mask


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(dtype)


def _saved_as_nn(module: DPMultiheadAttention, state: dict, prefix: str, _: object) -> None:
    """``in_proj.weight`` saved as ``nn.MultiheadAttention``'s ``in_proj_weight``, in its order.

    In place: this layer's entries are the last in ``state`` when its hook runs.
    """
    if module.packed:
        entries = {key: state.pop(key) for key in [k for k in state if k.startswith(prefix)]}
        for kind in PACKED:
            if f"{prefix}in_proj.{kind}" in entries:
                state[f"{prefix}in_proj_{kind}"] = entries.pop(f"{prefix}in_proj.{kind}")
        state.update(entries)  # out_proj's, after in_proj's as in nn.MultiheadAttention


def _loaded_from_nn(module: DPMultiheadAttention, state: dict, prefix: str, *_: object) -> None:
    """An ``nn.MultiheadAttention`` state_dict (or this layer's own) in this layer's keys."""
    for kind in ("bias_k", "bias_v"):
        state.pop(f"{prefix}{kind}", None)
    if module.packed:
        for kind in PACKED:
            parts = [state.pop(f"{prefix}{n}_proj.{kind}", None) for n in "qkv"]
            if all(part is not None for part in parts):  # fedsim < 2026-11-27: three layers
                state[f"{prefix}in_proj_{kind}"] = torch.cat(parts)
            if f"{prefix}in_proj_{kind}" in state:
                state[f"{prefix}in_proj.{kind}"] = state.pop(f"{prefix}in_proj_{kind}")
        return
    for kind in PACKED:
        packed = state.pop(f"{prefix}in_proj_{kind}", None)
        if packed is not None:
            for name, part in zip("qkv", packed.chunk(3), strict=True):
                state[f"{prefix}{name}_proj.{kind}"] = part
    for name in "qkv":  # kdim or vdim other than embed_dim: separate weights
        separate = state.pop(f"{prefix}{name}_proj_weight", None)
        if separate is not None:
            state[f"{prefix}{name}_proj.weight"] = separate


def replace_attention(model: nn.Module, *, same_keys: bool = False) -> nn.Module:
    """``model`` with every ``nn.MultiheadAttention`` a :class:`DPMultiheadAttention`.

    In place, weights, frozen flags, device, dtype and mode included; returns ``model``.
    Each replacement computes what the layer it replaces computed. ``same_keys``: only
    those it can replace under the same state_dict keys (key and value as wide as the
    query; no ``bias_k``, ``bias_v`` or zero attention), leaving the others as they are.
    """
    for name, child in model.named_children():
        if isinstance(child, nn.MultiheadAttention):
            if not same_keys or _same_keys(child):
                setattr(model, name, _drop_in(child))
        else:
            replace_attention(child, same_keys=same_keys)
    return model


def dp_attention(model: nn.Module) -> nn.Module:
    """``model`` with the ``nn.MultiheadAttention`` layers it can swap under the same keys.

    What ``build_model(dp=True)`` applies; in place, returns ``model``. torch's time-first
    encoder and decoder layers first become ones that run batch-first inside
    (:func:`fedsim.dp.time_first.batch_first_inside`).
    """
    return replace_attention(batch_first_inside(model), same_keys=True)


def _same_keys(layer: nn.MultiheadAttention) -> bool:
    plain = layer.bias_k is None and not layer.add_zero_attn
    return plain and layer._qkv_same_embed_dim and type(layer) is nn.MultiheadAttention


def _drop_in(layer: nn.MultiheadAttention) -> DPMultiheadAttention:
    drop_in = DPMultiheadAttention(
        layer.embed_dim, layer.num_heads, dropout=layer.dropout,
        bias=layer.in_proj_bias is not None, add_bias_kv=layer.bias_k is not None,
        add_zero_attn=layer.add_zero_attn, kdim=layer.kdim, vdim=layer.vdim,
        batch_first=layer.batch_first,
    )  # fmt: skip
    drop_in.load_state_dict(layer.state_dict())
    sources = dict(layer.named_parameters())
    for name, parameter in drop_in.named_parameters():  # a frozen layer stays frozen
        parameter.requires_grad_(sources[_nn_name(name, layer)].requires_grad)
    return drop_in.to(layer.out_proj.weight).train(layer.training)


def _nn_name(name: str, layer: nn.MultiheadAttention) -> str:
    """The ``nn.MultiheadAttention`` parameter behind a drop-in's ``name`` (``q_proj.bias``)."""
    owner, kind = name.split(".")
    if owner == "out_proj":
        return name
    if kind == "bias" or layer._qkv_same_embed_dim:  # nn packs its biases in any case
        return f"in_proj_{kind}"
    return f"{owner}_{kind}"  # q_proj_weight, ...
