"""A client's data: its partition, loaded once per worker process and reused every round."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from fedsim.config import FedsimConfig
from fedsim.data import Dataset, load_dataset
from fedsim.errors import FedsimError
from fedsim.messages import ClientInfo
from fedsim.partition import label_counts, partition


@lru_cache(maxsize=4)
def _dataset(name: str, data_dir: str) -> Dataset:
    return load_dataset(name, data_dir)


@lru_cache(maxsize=4)
def _partitions(
    name: str, data_dir: str, num_clients: int, method: str, seed: int, alpha: float, spc: int
) -> tuple[np.ndarray, ...]:
    labels = _dataset(name, data_dir).y_train
    parts = partition(
        labels, num_clients, method=method, seed=seed, alpha=alpha, shards_per_client=spc
    )
    return tuple(parts)


def client_data(config: FedsimConfig, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Training arrays ``(x, y)`` of one client, cached across rounds in this process."""
    if not 0 <= partition_id < config.num_clients:
        raise FedsimError(
            f"partition-id {partition_id} is outside 0..{config.num_clients - 1}; "
            "start as many SuperNodes as num-clients, with distinct partition ids"
        )
    dataset = _dataset(config.dataset, config.data_dir)
    parts = _partitions(
        config.dataset,
        config.data_dir,
        config.num_clients,
        config.partition,
        config.seed,
        config.dirichlet_alpha,
        config.shards_per_client,
    )
    idx = parts[partition_id]
    return dataset.x_train[idx], dataset.y_train[idx]


def client_info(config: FedsimConfig, partition_id: int) -> ClientInfo:
    """Size and label counts of a client's partition, for the server's records."""
    _, y = client_data(config, partition_id)
    num_classes = _dataset(config.dataset, config.data_dir).num_classes
    return ClientInfo(partition_id, len(y), tuple(label_counts(y, num_classes)))


def model_spec(config: FedsimConfig) -> tuple[tuple[int, ...], int]:
    """(input_shape, num_classes) of the configured dataset."""
    dataset = _dataset(config.dataset, config.data_dir)
    return dataset.input_shape, dataset.num_classes
