"""Evaluation of a model on held-out data, shared by server and clients."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def run_device(client_gpus: float) -> str:
    """Where a run trains and evaluates: ``cuda`` where it asks for GPUs and sees one."""
    return "cuda" if client_gpus > 0 and torch.cuda.is_available() else "cpu"


def device_name(device: str) -> str:
    """``device`` as a results file records it: ``cpu``, or ``cuda`` and the card's name."""
    if torch.device(device).type != "cuda":
        return device
    return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    *,
    batch_size: int = 1024,
    device: str = "cpu",
) -> tuple[float, float]:
    """Return (mean cross-entropy loss, accuracy) of ``model`` on ``(x, y)``.

    Sums stay on ``device`` and are read once at the end, so that a GPU never waits for
    the host between batches; tensors already on ``device`` are not copied.
    """
    model.eval()
    model.to(device)
    xs, ys = torch.as_tensor(x).to(device), torch.as_tensor(y).to(device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for start in range(0, len(ys), batch_size):
        logits = model(xs[start : start + batch_size])  # (B, C)
        yb = ys[start : start + batch_size]
        total += nn.functional.cross_entropy(logits, yb, reduction="sum").double()
        correct += (logits.argmax(dim=1) == yb).sum()
    return float(total) / len(ys), int(correct) / len(ys)
