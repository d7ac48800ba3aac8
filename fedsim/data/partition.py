"""Seeded partitioners: pure functions from labels to one index array per client.

Every partitioner returns disjoint index arrays that together cover the dataset, and the
same seed gives the same partition on any machine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from fedsim.errors import FedsimError, blamed
from fedsim.registry import PARTITIONS, is_import_path, resolve

if TYPE_CHECKING:
    from fedsim.config import FedsimConfig
    from fedsim.data.dataset import Dataset

MAX_DIRICHLET_TRIES = 100


def iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle and split into ``num_clients`` near-equal parts."""
    return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), num_clients)]


def dirichlet(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, *, alpha: float
) -> list[np.ndarray]:
    """Label skew: each class is spread over clients in Dirichlet(α) proportions.

    Small α gives each client few classes. Draws repeat until every client has at least
    one sample, as an empty client cannot train.
    """
    for _ in range(MAX_DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for cls in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            cuts = np.cumsum(rng.dirichlet(np.full(num_clients, alpha)))[:-1] * len(idx)
            for client, chunk in enumerate(np.split(idx, cuts.astype(int))):
                parts[client].append(chunk)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in result) > 0:
            return result
    raise FedsimError(
        f"dirichlet partition left a client empty in {MAX_DIRICHLET_TRIES} draws; "
        f"raise dirichlet-alpha ({alpha}) or lower num-clients ({num_clients})"
    )


def shards(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, *, shards_per_client: int
) -> list[np.ndarray]:
    """Pathological non-IID split of McMahan et al. (2017).

    Sort by label, cut into ``num_clients × shards_per_client`` shards and deal each
    client ``shards_per_client`` random shards, so a client sees few classes.
    """
    num_shards = num_clients * shards_per_client
    if num_shards > len(labels):
        raise FedsimError(
            f"shards: {num_shards} shards exceed {len(labels)} samples; "
            "lower num-clients or shards-per-client"
        )
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, num_shards)
    dealt = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in dealt]


def natural(
    client_ids: np.ndarray | None, num_clients: int, rng: np.random.Generator, *, min_samples: int
) -> list[np.ndarray]:
    """One client per natural user (LEAF): all of that user's samples.

    Users with fewer than ``min_samples`` samples are left out. With fewer clients than
    eligible users, a seeded sample of users takes part. Clients are in user order.
    """
    if client_ids is None:
        raise FedsimError("partition natural needs a dataset whose samples name their users")
    order = np.argsort(client_ids, kind="stable")  # each user's indices stay sorted
    users, starts, counts = np.unique(client_ids[order], return_index=True, return_counts=True)
    eligible = np.flatnonzero(counts >= min_samples)
    if num_clients > len(eligible):
        raise FedsimError(
            f"num-clients ({num_clients}) exceeds the {len(eligible)} users with at least "
            f"{min_samples} samples (of {len(users)}); lower num-clients or min-samples"
        )
    chosen = np.sort(rng.choice(eligible, num_clients, replace=False))
    return [order[starts[u] : starts[u] + counts[u]] for u in chosen]


PARTITIONERS: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "shards": shards,
    "natural": natural,
}


def partition(
    labels: np.ndarray,
    num_clients: int,
    *,
    method: str,
    seed: int,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    client_ids: np.ndarray | None = None,
    min_samples: int = 1,
    max_samples: int = 0,
) -> list[np.ndarray]:
    """Split sample indices among clients with a named, seeded partitioner.

    Parameters
    ----------
    client_ids
        Each sample's natural user, for ``natural``.
    min_samples
        ``natural`` only: users with fewer samples take no part.
    max_samples
        Above 0, a client with more samples keeps a seeded random ``max_samples`` of them.

    """
    rng = np.random.default_rng(seed)
    if method == "natural":
        parts = natural(client_ids, num_clients, rng, min_samples=min_samples)
    elif num_clients > len(labels):
        raise FedsimError(
            f"num-clients ({num_clients}) exceeds the {len(labels)} training samples; "
            "lower num-clients"
        )
    elif method == "dirichlet":
        parts = dirichlet(labels, num_clients, rng, alpha=alpha)
    elif method == "shards":
        parts = shards(labels, num_clients, rng, shards_per_client=shards_per_client)
    else:
        parts = PARTITIONERS[method](labels, num_clients, rng)
    if max_samples > 0:  # drawn after the split, so the split itself does not change
        parts = [cap(p, max_samples, rng) for p in parts]
    return parts


def partition_dataset(dataset: Dataset, config: FedsimConfig) -> list[np.ndarray]:
    """The training-sample indices of each client, as ``config`` asks.

    ``partition`` names a built-in partitioner, or the import path of your own: called
    as ``fn(dataset, num_clients, rng)`` with a seeded ``numpy`` generator, it returns
    one array of training-sample indices per client, disjoint.
    """
    if is_import_path(config.partition):
        rng = np.random.default_rng(config.seed)
        split = resolve(config.partition, PARTITIONS, "partition")
        with blamed(f"partition '{config.partition}' failed", "fix the partition function"):
            raw = split(dataset, config.num_clients, rng)
        parts = check_parts(raw, config, len(dataset.y_train))
        return [cap(p, config.max_samples, rng) for p in parts] if config.max_samples else parts
    return partition(
        dataset.y_train,
        config.num_clients,
        method=config.partition,
        seed=config.seed,
        alpha=config.dirichlet_alpha,
        shards_per_client=config.shards_per_client,
        client_ids=dataset.client_ids,
        min_samples=config.min_samples,
        max_samples=config.max_samples,
    )


def check_parts(parts: object, config: FedsimConfig, size: int) -> list[np.ndarray]:
    """A custom partitioner's result as index arrays, or one line saying what is wrong."""
    where = f"partition '{config.partition}'"
    if not isinstance(parts, list | tuple) or len(parts) != config.num_clients:
        raise FedsimError(f"{where} must return a list of {config.num_clients} index arrays")
    arrays = [np.asarray(p) for p in parts]
    if any(a.ndim != 1 or a.dtype.kind not in "iu" for a in arrays):
        raise FedsimError(f"{where} must return 1-d integer arrays of sample indices")
    joined = np.concatenate(arrays) if arrays else np.zeros(0, int)
    if len(joined) and (joined.min() < 0 or joined.max() >= size):
        raise FedsimError(f"{where} returned indices outside 0..{size - 1}")
    if len(np.unique(joined)) != len(joined):
        raise FedsimError(f"{where} gave a sample to two clients; parts must be disjoint")
    if min(len(a) for a in arrays) == 0:
        raise FedsimError(f"{where} left a client without samples; every client needs some")
    return [np.sort(a.astype(np.int64)) for a in arrays]


def cap(indices: np.ndarray, max_samples: int, rng: np.random.Generator) -> np.ndarray:
    """A seeded random ``max_samples`` of ``indices`` (sorted), or all if fewer."""
    if len(indices) <= max_samples:
        return indices
    return np.sort(rng.choice(indices, max_samples, replace=False))


def label_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    """Count of each class among ``labels``, as plain ints."""
    return np.bincount(labels, minlength=num_classes).astype(int).tolist()


def natural_users(
    dataset: Dataset, config: FedsimConfig, parts: list[np.ndarray] | None = None
) -> list[str] | None:
    """The user (e.g. speaking role) behind each client of a natural partition.

    ``parts``: the partition, where the caller has already computed it.
    """
    if config.partition != "natural" or dataset.users is None or dataset.client_ids is None:
        return None
    if parts is None:
        parts = partition_dataset(dataset, config)
    return [dataset.users[dataset.client_ids[part[0]]] for part in parts]
