"""The loss the clients train, per sample: what every per-sample mode and check clips.

A sample's loss is its cross-entropy (``fast_clip.per_sample_cross_entropy``, the mean
over positions where there are several); next-character windows that train every
position (``next-char-loss = all``) predict each position's next character.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedsim.dp.fast_clip import per_sample_cross_entropy


def next_char_targets(x: Tensor, y: Tensor) -> Tensor:
    """``(N, T)`` targets of a window that trains every position: its next characters."""
    return torch.cat([x[:, 1:].long(), y[:, None]], dim=1)


def logits_and_targets(
    model: nn.Module, x: Tensor, y: Tensor, all_positions: bool = False
) -> tuple[Tensor, Tensor]:
    """The training forward's logits and their targets, as the clients train.

    ``(B, C)`` and ``(B,)``; with ``all_positions`` (every position of a next-character
    window) ``(B, C, T)`` and ``(B, T)``.
    """
    if not all_positions:
        return model(x), y
    return model(x, all_positions=True), next_char_targets(x, y)


def per_sample_loss(model: nn.Module, x: Tensor, y: Tensor, all_positions: bool) -> Tensor:
    """The training forward's loss of each sample, ``(B,)``: :func:`logits_and_targets`'s."""
    return per_sample_cross_entropy(*logits_and_targets(model, x, y, all_positions))
