"""Seeded partitioners: pure functions from labels to one index array per client.

Every partitioner returns disjoint index arrays that together cover the dataset, and the
same seed gives the same partition on any machine.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedsim.errors import FedsimError

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


PARTITIONERS: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "shards": shards,
}


def partition(
    labels: np.ndarray,
    num_clients: int,
    *,
    method: str,
    seed: int,
    alpha: float = 0.5,
    shards_per_client: int = 2,
) -> list[np.ndarray]:
    """Split sample indices among clients with a named, seeded partitioner."""
    if num_clients > len(labels):
        raise FedsimError(
            f"num-clients ({num_clients}) exceeds the {len(labels)} training samples; "
            "lower num-clients"
        )
    rng = np.random.default_rng(seed)
    if method == "dirichlet":
        return dirichlet(labels, num_clients, rng, alpha=alpha)
    if method == "shards":
        return shards(labels, num_clients, rng, shards_per_client=shards_per_client)
    return PARTITIONERS[method](labels, num_clients, rng)


def label_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    """Count of each class among ``labels``, as plain ints."""
    return np.bincount(labels, minlength=num_classes).astype(int).tolist()
