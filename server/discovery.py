"""Who the clients are: the Flower nodes that connected, and what each holds."""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from fedsim.config import FedsimConfig
from fedsim.data import Dataset, label_counts
from fedsim.errors import FedsimError
from fedsim.messages import ClientInfo, decode_client_info, encode_config
from fedsim.models import model_kwargs

CONNECT_TIMEOUT_S = 300.0


def wait_for_nodes(grid: Grid, count: int) -> list[int]:
    """The sorted ids of the first ``count`` Flower nodes, once that many are connected."""
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while len(nodes := sorted(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise FedsimError(
                f"only {len(nodes)} of {count} clients connected in "
                f"{CONNECT_TIMEOUT_S:.0f} s; start more SuperNodes or lower num-clients"
            )
        time.sleep(0.5)
    return nodes[:count]


def partition_infos(
    dataset: Dataset, parts: list[np.ndarray], *, share_labels: bool
) -> list[ClientInfo]:
    """Every client's size (and label counts, if shared), from the server's copy of the data."""
    num_classes = model_kwargs(dataset)["num_classes"]
    return [
        ClientInfo(
            c,
            len(idx),
            tuple(label_counts(dataset.y_train[idx], num_classes)) if share_labels else None,
        )
        for c, idx in enumerate(parts)
    ]


def discover_clients(grid: Grid, config: FedsimConfig) -> dict[int, tuple[int, ClientInfo]]:
    """Ask every node for its partition; map partition id -> (node id, info)."""
    nodes = wait_for_nodes(grid, config.num_clients)
    content = encode_config(config)
    replies = grid.send_and_receive(
        [Message(content, node, MessageType.QUERY) for node in nodes], timeout=CONNECT_TIMEOUT_S
    )
    found: dict[int, tuple[int, ClientInfo]] = {}
    for msg in replies:
        if msg.has_error():
            raise FedsimError(f"node {msg.metadata.src_node_id} failed: {msg.error.reason}")
        info = decode_client_info(msg.content)
        found[info.partition_id] = (msg.metadata.src_node_id, info)
    if sorted(found) != list(range(config.num_clients)):
        raise FedsimError(
            f"clients reported partition ids {sorted(found)}; expected each of "
            f"0..{config.num_clients - 1} exactly once"
        )
    return found
