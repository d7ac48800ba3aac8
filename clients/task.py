"""A client's data, loaded once per worker process and reused every round.

A client trains either on its partition of the run's dataset (``data-dir`` of the run
config, split as in simulation) or, where its SuperNode was started with
``--node-config 'data-dir=...'``, on every training example of its own local dataset.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch

from fedsim.config import FedsimConfig
from fedsim.data import (
    Dataset,
    check_node_folder,
    label_counts,
    load_dataset,
    partition_dataset,
)
from fedsim.dp import Canaries, canary_seed, make_canaries
from fedsim.errors import FedsimError
from fedsim.messages import ClientInfo
from fedsim.models import model_kwargs


@lru_cache(maxsize=4)
def _dataset(name: str, data_dir: str) -> Dataset:
    return load_dataset(name, data_dir)


def preload(name: str, data_dir: str) -> None:
    """Load a dataset into this process's cache, where its clients will find it."""
    _dataset(name, data_dir)


@lru_cache(maxsize=4)
def _partitions(config: FedsimConfig) -> tuple[np.ndarray, ...]:
    # keyed by the whole (frozen) config: within a run it changes at most once, when
    # the server fixes σ, and recomputing a partition is cheap next to loading data
    return tuple(partition_dataset(_dataset(config.dataset, config.data_dir), config))


def client_data(
    config: FedsimConfig, partition_id: int, *, local_dir: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Training arrays ``(x, y)`` of one client, cached across rounds in this process.

    Parameters
    ----------
    config
        The run's config (dataset, partitioning, seed).
    partition_id
        This client's id in 0..num-clients-1.
    local_dir
        The node's own data folder: the client then trains on all of that dataset's
        training split, and ``partition_id`` only names it.

    """
    _check_partition(config, partition_id)
    if local_dir is not None:
        _no_canaries_here(config)
        check_node_folder(config.dataset)
        local = _dataset(config.dataset, local_dir)
        return local.x_train, local.y_train
    dataset = _dataset(config.dataset, config.data_dir)
    idx = _partitions(config)[partition_id]
    x, y = dataset.x_train[idx], dataset.y_train[idx]
    if "sample" in config.audit_units:  # this client's included canaries join its data
        canaries = _canaries(config.dataset, config.data_dir, *_canary_key(config))
        x_in, y_in = canaries.for_client(partition_id)
        x, y = np.concatenate([x, x_in]), np.concatenate([y, y_in])
    return x, y


def _canary_key(config: FedsimConfig) -> tuple[int, int, int]:
    # what the canaries depend on besides the data: not σ, which the server fixes later
    return config.seed, config.audit_canaries, config.num_clients


@lru_cache(maxsize=2)
def _canaries(name: str, data_dir: str, seed: int, count: int, num_clients: int) -> Canaries:
    dataset = _dataset(name, data_dir)
    classes = model_kwargs(dataset)["num_classes"]
    return make_canaries(
        canary_seed(seed), count, num_clients=num_clients, public_images=dataset.x_test,
        num_classes=classes,
    )  # fmt: skip


def _no_canaries_here(config: FedsimConfig) -> None:
    if "sample" in config.audit_units:
        raise FedsimError(
            "audit-canaries needs the run's shared dataset, but this node trains on its own "
            "data-dir; set audit-canaries = 0 or start the node without data-dir"
        )


@lru_cache(maxsize=2)
def _on_device(name: str, data_dir: str, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = _dataset(name, data_dir)
    return torch.as_tensor(dataset.x_train).to(device), torch.as_tensor(dataset.y_train).to(device)


def client_tensors(
    config: FedsimConfig, partition_id: int, *, device: str, local_dir: str | None = None
) -> tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]:
    """:func:`client_data`, on ``device``: on a GPU, gathered there from a copy of the data.

    A worker copies the training split to its GPU once and keeps it: the clients it
    trains change every round, and a gather on the GPU costs far less than a copy.
    """
    if device == "cpu" or local_dir is not None or "sample" in config.audit_units:
        return client_data(config, partition_id, local_dir=local_dir)
    _check_partition(config, partition_id)
    x, y = _on_device(config.dataset, config.data_dir, device)
    idx = torch.as_tensor(_partitions(config)[partition_id]).to(device)
    return x[idx], y[idx]


def _check_partition(config: FedsimConfig, partition_id: int) -> None:
    if not 0 <= partition_id < config.num_clients:
        raise FedsimError(
            f"partition-id {partition_id} is outside 0..{config.num_clients - 1}; "
            "start as many SuperNodes as num-clients, with distinct partition ids"
        )


def client_info(
    config: FedsimConfig, partition_id: int, *, local_dir: str | None = None
) -> ClientInfo:
    """Size of a client's data, and its label counts where ``share-label-counts`` is on."""
    _, y = client_data(config, partition_id, local_dir=local_dir)
    if not config.share_label_counts:
        return ClientInfo(partition_id, len(y), None)
    num_classes = model_spec(config, local_dir=local_dir)["num_classes"]
    return ClientInfo(partition_id, len(y), tuple(label_counts(y, num_classes)))


def model_spec(config: FedsimConfig, *, local_dir: str | None = None) -> dict[str, Any]:
    """Keywords of ``build_model`` for the dataset this client reads: shape, classes, task."""
    return model_kwargs(
        _dataset(config.dataset, config.data_dir if local_dir is None else local_dir)
    )
