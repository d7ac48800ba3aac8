"""The server's part of a one-run audit: count the canaries, then score the final model.

The server is the auditor. Clients append their included canaries to their training data
(``fedsim.clients.task``); the server counts them in every client's size, since σ is
solved and the ledger charged on those sizes, and after the last round it scores each
canary by the final global model's loss (``fedsim.dp.canaries``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from fedsim.config import FedsimConfig
from fedsim.data import Dataset, label_counts
from fedsim.dp import Canaries, audit_record, canary_set
from fedsim.messages import ClientInfo
from fedsim.models import model_kwargs


def run_canaries(config: FedsimConfig, dataset: Dataset) -> Canaries | None:
    """The run's canaries, or None where ``audit-canaries`` is 0."""
    if config.audit_canaries == 0:
        return None
    return canary_set(config, dataset.x_train, model_kwargs(dataset)["num_classes"])


def with_canaries(
    infos: list[ClientInfo], config: FedsimConfig, dataset: Dataset
) -> list[ClientInfo]:
    """``infos`` with each client's included canaries counted in (sizes and label counts)."""
    canaries = run_canaries(config, dataset)
    if canaries is None:
        return infos
    out = []
    for info in infos:
        _, y = canaries.for_client(info.partition_id)
        counts = info.label_counts
        if counts is not None:
            counts = tuple(np.add(counts, label_counts(y, len(counts))).tolist())
        out.append(ClientInfo(info.partition_id, info.num_examples + len(y), counts))
    return out


@torch.no_grad()
def canary_losses(
    model: nn.Module, canaries: Canaries, *, device: str, batch_size: int = 1024
) -> np.ndarray:
    """The cross-entropy loss of ``model`` on each canary."""
    model.eval()
    x = torch.as_tensor(canaries.x).to(device)
    y = torch.as_tensor(canaries.y).to(device)
    losses = [
        nn.functional.cross_entropy(
            model(x[i : i + batch_size]), y[i : i + batch_size], reduction="none"
        )
        for i in range(0, len(y), batch_size)
    ]
    return torch.cat(losses).double().cpu().numpy()


def audit_final_model(
    config: FedsimConfig, dataset: Dataset, model: nn.Module, *, device: str
) -> dict[str, Any] | None:
    """summary.json's ``audit`` record for the final ``model``; None without canaries."""
    canaries = run_canaries(config, dataset)
    if canaries is None:
        return None
    return audit_record(canaries, canary_losses(model, canaries, device=device), config)
