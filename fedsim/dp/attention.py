"""Multi-head attention with per-sample gradients: ``nn.MultiheadAttention``'s drop-in.

``nn.MultiheadAttention`` keeps its input projection in one parameter used inside a fused
function, so no per-sample rule sees its inputs; Opacus refuses it. Opacus's own
``DPMultiheadAttention`` is no drop-in with ``batch_first=True`` in Opacus 1.6: its output
``view``s a (batch·heads, T, head) tensor as (batch, T, width), which permutes positions
and heads within each sample (0.66 off ``nn.MultiheadAttention`` on random inputs).

Here the four projections are ``nn.Linear`` layers, fed batch-first, whose per-sample
gradients every mode computes exactly (fedsim's linear rule under ``fast``); the
attention between them has no parameters, so its dropout needs no replaying. The call,
the outputs and the masks are ``nn.MultiheadAttention``'s, and so is the model once
:func:`replace_attention` has swapped the layers in, weights included.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedsim.errors import FedsimError


class DPMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention(embed_dim, num_heads, dropout, bias, kdim, vdim, batch_first)``.

    ``add_bias_kv`` and ``add_zero_attn`` are not supported. Loading an
    ``nn.MultiheadAttention`` state_dict splits its ``in_proj`` into the three
    projections (:func:`replace_attention` does so).
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
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self._register_load_state_dict_pre_hook(_split_in_proj)

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
        if not self.batch_first:  # (T, B, E) -> (B, T, E): the projections see rows per sample
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, length, _ = query.shape
        heads, width = self.num_heads, self.embed_dim // self.num_heads

        def split(t: Tensor) -> Tensor:  # (B, T, E) -> (B, heads, T, width)
            return t.view(batch, -1, heads, width).transpose(1, 2)

        q, k, v = split(self.q_proj(query)), split(self.k_proj(key)), split(self.v_proj(value))
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


def _split_in_proj(state: dict, prefix: str, *_: object) -> None:
    """An ``nn.MultiheadAttention`` state_dict's ``in_proj`` as the three projections."""
    for kind in ("weight", "bias"):
        packed = state.pop(f"{prefix}in_proj_{kind}", None)
        if packed is not None:
            for name, part in zip("qkv", packed.chunk(3), strict=True):
                state[f"{prefix}{name}_proj.{kind}"] = part
    for name in "qkv":  # kdim or vdim other than embed_dim: separate weights
        separate = state.pop(f"{prefix}{name}_proj_weight", None)
        if separate is not None:
            state[f"{prefix}{name}_proj.weight"] = separate
    for kind in ("bias_k", "bias_v"):
        state.pop(f"{prefix}{kind}", None)


def replace_attention(model: nn.Module) -> nn.Module:
    """``model`` with every ``nn.MultiheadAttention`` a :class:`DPMultiheadAttention`.

    In place, weights included; returns ``model``. Each replacement computes what the
    layer it replaces computed.
    """
    for name, child in model.named_children():
        if isinstance(child, nn.MultiheadAttention):
            drop_in = DPMultiheadAttention(
                child.embed_dim, child.num_heads, dropout=child.dropout,
                bias=child.in_proj_bias is not None, add_bias_kv=child.bias_k is not None,
                add_zero_attn=child.add_zero_attn, kdim=child.kdim, vdim=child.vdim,
                batch_first=child.batch_first,
            )  # fmt: skip
            drop_in.load_state_dict(child.state_dict())
            setattr(model, name, drop_in.to(child.out_proj.weight))
        else:
            replace_attention(child)
    return model
