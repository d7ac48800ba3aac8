"""Evaluation of a model on held-out arrays, shared by server and clients."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def evaluate(
    model: nn.Module, x: np.ndarray, y: np.ndarray, *, batch_size: int = 1024, device: str = "cpu"
) -> tuple[float, float]:
    """Return (mean cross-entropy loss, accuracy) of ``model`` on ``(x, y)``."""
    model.eval()
    model.to(device)
    total_loss, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        xb = torch.from_numpy(x[start : start + batch_size]).to(device)
        yb = torch.from_numpy(y[start : start + batch_size]).to(device)
        logits = model(xb)
        total_loss += nn.functional.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(dim=1) == yb).sum().item()
    return total_loss / len(x), correct / len(x)
