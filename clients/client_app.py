"""Flower ClientApp: decode a message, call a plain function, encode the reply."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedsim.clients.local import simulate_faults, train_group, train_round
from fedsim.clients.task import client_info
from fedsim.config import FedsimConfig, check_deployment
from fedsim.errors import FedsimError
from fedsim.messages import (
    decode_config,
    dropout_reason,
    encode_client_info,
    encode_group_reply,
    encode_train_reply,
    model_arrays,
    named_group,
    named_partition,
)


def build_client_app(*, deployment: bool) -> ClientApp:
    """A ClientApp; ``deployment`` for SuperNodes, which never trust the server's seed.

    Under the deployment engine the server is not trusted: a config with
    ``secure-noise = false`` is refused, so the client's DP noise and Poisson masks always
    come from its own operating system. In a simulation the run's config decides, so
    seeded runs can be repeated.
    """
    app = ClientApp()

    @app.query()
    def _query(msg: Message, context: Context) -> Message:
        return query(msg, context, deployment=deployment)

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return train(msg, context, deployment=deployment)

    return app


def query(msg: Message, context: Context, *, deployment: bool) -> Message:
    """Report this client's partition id and size, and its label counts if shared."""
    config, _ = decode_config(msg.content)
    if deployment:
        check_deployment(config)
    pid = partition_id(context, config)
    with errors_stay_on_the_node(config, deployment=deployment):
        info = client_info(config, pid, local_dir=local_data_dir(context))
    return Message(encode_client_info(info), reply_to=msg)


def train(msg: Message, context: Context, *, deployment: bool) -> Message:
    """Train the received global model on the local partition for one round.

    A group message (``clients-per-worker``) names several clients: they train at once,
    and the reply holds each one's update, or why it dropped out.
    """
    config, server_round = decode_config(msg.content)
    if deployment:
        check_deployment(config)
    state = model_arrays(msg.content).to_torch_state_dict()
    group = named_group(msg.content)
    if group is not None:
        if local_data_dir(context) is not None:
            raise FedsimError("this node holds its own data; it trains one client, not a group")
        return Message(
            encode_group_reply(train_clients(config, group, server_round, state)), reply_to=msg
        )
    pid = train_partition(context, config, named_partition(msg.content))
    with errors_stay_on_the_node(config, deployment=deployment):
        new_state, report = train_round(
            config, pid, server_round, state, local_dir=local_data_dir(context)
        )
    if simulate_faults(config, [pid], server_round):
        raise FedsimError(dropout_reason(config.client_dropout))
    return Message(encode_train_reply(ArrayRecord(new_state), report), reply_to=msg)


@contextmanager
def errors_stay_on_the_node(config: FedsimConfig, *, deployment: bool) -> Iterator[None]:
    """Under sample-level DP on SuperNodes, an error's text does not reach the server.

    Flower sends the server each exception's message, and one raised while loading,
    checking or training on the node's data can quote its values (a label range, a
    token id). The server is not trusted then, so it gets the exception's type only;
    the whole message stays in this SuperNode's log (Flower logs the chained error).
    """
    if not (deployment and config.dp_sample):
        yield
        return
    try:
        yield
    except Exception as exc:  # any error here may quote the data
        raise FedsimError(
            f"this node failed on its own data ({type(exc).__name__}); under sample-level "
            "DP the server is not trusted with the message: see this SuperNode's log"
        ) from exc


def train_clients(
    config: FedsimConfig, clients: list[int], server_round: int, state: dict[str, torch.Tensor]
) -> dict[int, RecordDict | str]:
    """A group's replies: each client's encoded update, or why it has none."""
    trained = train_group(config, clients, server_round, state)
    dropped = simulate_faults(config, clients, server_round)
    replies: dict[int, RecordDict | str] = {}
    for pid, result in trained.items():
        if pid in dropped:
            replies[pid] = dropout_reason(config.client_dropout)
        elif isinstance(result, str):  # it failed, alone
            replies[pid] = result
        else:
            replies[pid] = encode_train_reply(ArrayRecord(result[0]), result[1])
    return replies


def partition_id(context: Context, config: FedsimConfig) -> int:
    """This node's partition id, checked against the run's client count."""
    node = context.node_config
    if "partition-id" not in node:
        raise FedsimError("this SuperNode has no partition-id; start it with --node-config")
    count = int(node.get("num-partitions", config.num_clients))
    if count != config.num_clients:
        raise FedsimError(
            f"node has num-partitions={count} but the run has num-clients="
            f"{config.num_clients}; make them equal"
        )
    return int(node["partition-id"])


def train_partition(context: Context, config: FedsimConfig, named: int | None) -> int:
    """The partition to train: the one the message names, else this node's own.

    In a simulation the nodes are workers and every message names its client. A node
    with its own data trains only that, so it refuses any other client's id.
    """
    if named is None:
        return partition_id(context, config)
    if local_data_dir(context) is not None and named != partition_id(context, config):
        raise FedsimError(
            f"asked to train client {named}, but this node holds only its own data "
            f"(partition-id {partition_id(context, config)})"
        )
    return named


def local_data_dir(context: Context) -> str | None:
    """This node's own data folder, from ``--node-config 'data-dir=...'``, or None.

    It overrides the run's ``data-dir`` on this node only: the client trains on all of
    the local dataset instead of a partition of the shared one.
    """
    value = context.node_config.get("data-dir", "")
    return str(value) if value != "" else None


# the component that SuperNodes and `flwr run` load (pyproject.toml); `fedsim run` uses
# simulation_app, whose clients follow the run's secure-noise
app = build_client_app(deployment=True)
simulation_app = build_client_app(deployment=False)
