"""Sequence models: LEAF's LSTM and a small Transformer, for images, text and characters.

Both pass Opacus's ``ModuleValidator`` as built with ``dp=True``. The recurrent layer is
chosen in one place, :func:`lstm_layer`; attention is built from ``nn.Linear``.
Sequence models read an image (C, H, W) as a sequence of its H rows of C·W values,
and text as token ids, embedded.
"""

from __future__ import annotations

import torch
from opacus.layers import DPLSTM
from torch import nn

from fedsim.data import IMAGE, NEXT_CHAR, PAD_ID, TEXT_CLASSIFICATION
from fedsim.dp import FastDPLSTM, with_rnn_names
from fedsim.errors import FedsimError

# LEAF's Shakespeare model: an 8-dim character embedding, 2 LSTM layers of 256 units.
# Words get a 64-dim embedding; image rows a linear map to 64 values.
LSTM_HIDDEN, LSTM_LAYERS = 256, 2
INPUT_DIM = {NEXT_CHAR: 8, TEXT_CLASSIFICATION: 64, IMAGE: 64}
# A small pre-norm encoder: 2 blocks, width 64, 4 heads, feed-forward 128.
TF_WIDTH, TF_HEADS, TF_LAYERS, TF_FF = 64, 4, 2, 128


def lstm_layer(input_size: int, hidden_size: int, num_layers: int, *, dp: bool) -> nn.Module:
    """The one place that picks the recurrent layer (batch-first, nn.LSTM's state_dict).

    Training without DP uses ``nn.LSTM``, which has no per-sample gradients. DP-SGD uses
    ``FastDPLSTM``: per-sample gradients (or norms) from whole-sequence products instead
    of Opacus's ``DPLSTM`` per-step hooks, equal to Opacus's within 1e-5 in float64
    (tests/test_fast_lstm.py) and many times faster (docs/benchmarks.md). Both give
    ``nn.LSTM``'s state_dict keys, so DP clients average with a plain server model.
    """
    if not dp:
        return nn.LSTM(input_size, hidden_size, num_layers=num_layers, batch_first=True)
    return FastDPLSTM(input_size, hidden_size, num_layers=num_layers, batch_first=True)


def opacus_lstm_layer(input_size: int, hidden_size: int, num_layers: int) -> nn.Module:
    """Opacus's ``DPLSTM`` with ``nn.LSTM``'s state_dict keys: the reference layer."""
    return with_rnn_names(DPLSTM(input_size, hidden_size, num_layers=num_layers, batch_first=True))


class SequenceInput(nn.Module):
    """Inputs as (N, T, features) plus the index of each sample's last real position.

    Images (N, C, H, W) become H rows of C·W values (a linear map to ``dim``); token ids
    (N, T) are embedded, and positions after the last non-padding token are padding.
    """

    def __init__(self, *, input_shape: tuple[int, ...], task: str, vocab_size: int, dim: int):
        super().__init__()
        self.task = task
        if task == IMAGE:
            channels, _, width = input_shape
            self.encode: nn.Module = nn.Linear(channels * width, dim)
        else:
            if vocab_size < 2:
                raise FedsimError(f"task {task} needs a vocabulary; got vocab_size={vocab_size}")
            self.encode = nn.Embedding(vocab_size, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return features (N, T, dim), a mask of real positions (N, T) and last index (N,)."""
        if self.task == IMAGE:
            rows = x.permute(0, 2, 1, 3).flatten(2)  # (N, C, H, W) -> (N, H, C·W)
            n, t = rows.shape[:2]
            mask = torch.ones(n, t, dtype=torch.bool, device=x.device)
            last = torch.full((n,), t - 1, dtype=torch.long, device=x.device)
            return self.encode(rows), mask, last
        tokens = x.long()
        mask = tokens != PAD_ID
        mask[:, 0] = True  # an all-padding text still has one position to read
        last = (mask.long().cumsum(1) * mask).argmax(1)  # right-padded: the last real token
        return self.encode(tokens), mask, last


class LSTMNet(nn.Module):
    """Input -> 2-layer LSTM -> the output at the last real position -> classes."""

    def __init__(
        self,
        *,
        input_shape: tuple[int, ...],
        num_classes: int,
        task: str,
        vocab_size: int = 0,
        dp: bool = False,
    ):
        super().__init__()
        dim = INPUT_DIM[task]
        self.inputs = SequenceInput(
            input_shape=input_shape, task=task, vocab_size=vocab_size, dim=dim
        )
        self.lstm = lstm_layer(dim, LSTM_HIDDEN, LSTM_LAYERS, dp=dp)
        self.head = nn.Linear(LSTM_HIDDEN, num_classes)

    def forward(self, x: torch.Tensor, *, all_positions: bool = False) -> torch.Tensor:
        """Logits (N, num_classes), or (N, num_classes, T) at every position if asked."""
        features, _, last = self.inputs(x)
        out, _ = self.lstm(features)  # (N, T, hidden); causal, so padding after `last` is moot
        if all_positions:
            return self.head(out).transpose(1, 2)
        return self.head(out[torch.arange(len(out), device=out.device), last])


class SelfAttention(nn.Module):
    """Multi-head self-attention from ``nn.Linear`` layers, which Opacus supports."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attend where the boolean ``mask`` (N, 1, T or 1, T) allows."""
        n, t, width = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, width // self.heads).unbind(2)
        attended = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        )
        return self.out(attended.transpose(1, 2).reshape(n, t, width))


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block: x + attn(LN x), then x + FF(LN x)."""

    def __init__(self, width: int, heads: int, ff: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ff = nn.Sequential(nn.Linear(width, ff), nn.GELU(), nn.Linear(ff, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One block over (N, T, width)."""
        x = x + self.attn(self.norm1(x), mask)
        return x + self.ff(self.norm2(x))


class TransformerNet(nn.Module):
    """Input + learned positions -> encoder blocks -> pooled -> classes.

    Next-char attends causally (each position sees itself and what precedes it) and
    reads the last position, which sees the whole window; classification attends to all
    real positions and averages them.
    """

    def __init__(
        self,
        *,
        input_shape: tuple[int, ...],
        num_classes: int,
        task: str,
        vocab_size: int = 0,
        dp: bool = False,
    ):
        super().__init__()
        del dp  # attention built from nn.Linear is already DP-compatible
        self.task = task
        length = input_shape[1] if task == IMAGE else input_shape[0]
        self.inputs = SequenceInput(
            input_shape=input_shape, task=task, vocab_size=vocab_size, dim=TF_WIDTH
        )
        self.positions = nn.Embedding(length, TF_WIDTH)
        self.blocks = nn.ModuleList(
            EncoderBlock(TF_WIDTH, TF_HEADS, TF_FF) for _ in range(TF_LAYERS)
        )
        self.norm = nn.LayerNorm(TF_WIDTH)
        self.head = nn.Linear(TF_WIDTH, num_classes)

    def forward(self, x: torch.Tensor, *, all_positions: bool = False) -> torch.Tensor:
        """Logits (N, num_classes), or (N, num_classes, T) at every position if asked."""
        features, mask, last = self.inputs(x)
        t = features.shape[1]
        steps = torch.arange(t, device=x.device).expand(len(x), -1)
        h = features + self.positions(steps)
        attend = mask[:, None, None, :]  # (N, 1, 1, T): real keys only
        if self.task == NEXT_CHAR:
            attend = attend & torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        for block in self.blocks:
            h = block(h, attend)
        h = self.norm(h)
        if all_positions:
            return self.head(h).transpose(1, 2)
        if self.task == NEXT_CHAR:
            pooled = h[torch.arange(len(h), device=h.device), last]
        else:
            weights = mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * weights).sum(1) / weights.sum(1)
        return self.head(pooled)
