"""The server's part of a one-run audit: count the canaries, then score the final model.

The server is the auditor. Sample unit: clients append their included canaries to their
training data (``fedsim.clients.task``); the server counts them in every client's size,
since σ is solved and the ledger charged on those sizes, and after the last round it
scores each canary by the final global model's loss (``fedsim.dp.canaries``). User unit:
canary clients take part inside DP-FedAvg (``server.user_dp``), and each is scored by
the cosine between the model's change over the run and its direction
(``fedsim.dp.user_canaries``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedsim.config import FedsimConfig
from fedsim.data import Dataset, label_counts
from fedsim.dp import Canaries, UserCanaries, audit_record, canary_set, gaussian_estimate
from fedsim.messages import ClientInfo
from fedsim.models import model_kwargs
from fedsim.server.user_dp import flatten, to_numpy

SAMPLE_METHOD = "one-run (Steinke, Nasr & Jagielski 2023), loss of the final model, black-box"
SAMPLE_KIND = "uniform-noise images with uniform random labels"
USER_METHOD = (
    "one-run (Steinke, Nasr & Jagielski 2023) over canary clients (Andrew et al. 2024): "
    "cosine of the model's change with each canary's direction"
)
USER_KIND = "clients whose every update is one random unit direction at the clip norm"


def run_canaries(config: FedsimConfig, dataset: Dataset) -> Canaries | None:
    """The run's canaries, or None where ``audit-canaries`` is 0."""
    if "sample" not in config.audit_units:
        return None
    return canary_set(config, dataset.x_test, model_kwargs(dataset)["num_classes"])


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


def model_vector(state: dict[str, torch.Tensor]) -> np.ndarray:
    """A model's numbers as one vector, laid out as user-level DP's updates are."""
    return flatten(to_numpy(ArrayRecord({k: v.detach().cpu() for k, v in state.items()})))


def user_canaries(config: FedsimConfig, dim: int) -> UserCanaries | None:
    """The run's canary clients for a model of ``dim`` numbers, or None: no user audit."""
    if "user" not in config.audit_units:
        return None
    return UserCanaries(count=config.audit_canaries, seed=config.seed, dim=dim)


def audit_final_model(
    config: FedsimConfig, dataset: Dataset, model: nn.Module, *, device: str, start: np.ndarray
) -> dict[str, dict[str, Any]] | None:
    """summary.json's ``audit``: a record per audited unit; None without canaries.

    ``start``: :func:`model_vector` of the initial global model.
    """
    records = {}
    canaries = run_canaries(config, dataset)
    if canaries is not None:
        losses = canary_losses(model, canaries, device=device)
        records["sample"] = audit_record(
            -losses, canaries.included, config, unit="sample", method=SAMPLE_METHOD,
            kind=SAMPLE_KIND,
        )  # fmt: skip
    clients = user_canaries(config, len(start))
    if clients is not None:
        scores = clients.scores(model_vector(model.state_dict()) - start)
        record = audit_record(
            scores, clients.included(), config, unit="user", method=USER_METHOD, kind=USER_KIND
        )
        # Andrew et al.'s point estimate: no confidence, and it may exceed the true ε
        record["estimate"] = gaussian_estimate(scores, clients.included(), delta=config.delta)
        records["user"] = record
    return records or None
