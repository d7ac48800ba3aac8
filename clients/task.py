"""A client's data: its partition, loaded once per worker process and reused every round."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from fedsim.config import FedsimConfig
from fedsim.data import Dataset, load_dataset
from fedsim.errors import FedsimError
from fedsim.messages import ClientInfo
from fedsim.models import model_kwargs
from fedsim.partition import label_counts, partition_dataset


@lru_cache(maxsize=4)
def _dataset(name: str, data_dir: str) -> Dataset:
    return load_dataset(name, data_dir)


@lru_cache(maxsize=4)
def _partitions(config: FedsimConfig) -> tuple[np.ndarray, ...]:
    # keyed by the whole (frozen) config: within a run it changes at most once, when
    # the server fixes σ, and recomputing a partition is cheap next to loading data
    return tuple(partition_dataset(_dataset(config.dataset, config.data_dir), config))


def client_data(config: FedsimConfig, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Training arrays ``(x, y)`` of one client, cached across rounds in this process."""
    if not 0 <= partition_id < config.num_clients:
        raise FedsimError(
            f"partition-id {partition_id} is outside 0..{config.num_clients - 1}; "
            "start as many SuperNodes as num-clients, with distinct partition ids"
        )
    dataset = _dataset(config.dataset, config.data_dir)
    idx = _partitions(config)[partition_id]
    return dataset.x_train[idx], dataset.y_train[idx]


def client_info(config: FedsimConfig, partition_id: int) -> ClientInfo:
    """Size and label counts of a client's partition, for the server's records."""
    _, y = client_data(config, partition_id)
    num_classes = _dataset(config.dataset, config.data_dir).num_classes
    return ClientInfo(partition_id, len(y), tuple(label_counts(y, num_classes)))


def model_spec(config: FedsimConfig) -> dict[str, Any]:
    """Keywords of ``build_model`` for the configured dataset: shape, classes, task, vocab."""
    return model_kwargs(_dataset(config.dataset, config.data_dir))
