"""Flower ClientApp: decode a message, call a plain function, encode the reply."""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedsim.clients.task import client_info, client_tensors, model_spec
from fedsim.clients.training import train_local
from fedsim.config import FedsimConfig, check_deployment
from fedsim.dp import (
    Purpose,
    dp_randomness,
    numpy_generator,
    secure_root,
    seeded_root,
    stream_seed,
)
from fedsim.errors import FedsimError
from fedsim.messages import (
    TrainReport,
    decode_config,
    encode_client_info,
    encode_train_reply,
    model_arrays,
    named_partition,
)
from fedsim.models import build_model, run_device


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
    info = client_info(config, partition_id(context, config), local_dir=local_data_dir(context))
    return Message(encode_client_info(info), reply_to=msg)


def train(msg: Message, context: Context, *, deployment: bool) -> Message:
    """Train the received global model on the local partition for one round."""
    config, server_round = decode_config(msg.content)
    if deployment:
        check_deployment(config)
    pid = train_partition(context, config, named_partition(msg.content))
    state = model_arrays(msg.content).to_torch_state_dict()
    new_state, report = train_round(
        config, pid, server_round, state, local_dir=local_data_dir(context)
    )
    simulate_faults(config, pid, server_round)
    return Message(encode_train_reply(ArrayRecord(new_state), report), reply_to=msg)


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


def train_round(
    config: FedsimConfig,
    pid: int,
    server_round: int,
    state: dict[str, torch.Tensor],
    *,
    local_dir: str | None = None,
) -> tuple[dict[str, torch.Tensor], TrainReport]:
    """One client's local training in one round.

    Its randomness comes from streams keyed by (round, client) under a root that is
    fresh from the operating system with ``secure-noise``, or the config's seed otherwise.
    """
    torch.set_num_threads(max(1, int(config.client_cpus)))
    device = run_device(config.client_gpus)
    root = secure_root() if config.secure_noise else seeded_root(config.seed)
    key = {"server_round": server_round, "client": pid}
    # dropout and other non-DP randomness; torch's global seed keeps only 32 bits of it
    torch.manual_seed(int.from_bytes(stream_seed(root, purpose=Purpose.LOCAL, **key)[:8], "little"))
    randomness = dp_randomness(root, **key, device=device, secure=config.secure_noise)
    x, y = client_tensors(config, pid, device=device, local_dir=local_dir)
    spec = model_spec(config, local_dir=local_dir)
    model = build_model(config.model, **spec, dp=config.dp_sample)
    try:
        model.load_state_dict(state)
    except RuntimeError:
        if local_dir is None:
            raise
        raise FedsimError(
            f"this node's data ({config.dataset} in {local_dir}) has input shape "
            f"{spec['input_shape']} and {spec['num_classes']} classes, which do not fit the "
            "server's model; give every node data of the server's dataset format"
        ) from None
    _, spent = train_local(
        model,
        x,
        y,
        epochs=config.local_epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        momentum=config.momentum,
        noise_multiplier=config.noise_multiplier if config.dp_sample else None,
        max_grad_norm=config.max_grad_norm,
        grad_sample=config.grad_sample,
        device=device,
        all_positions=config.next_char_loss == "all",
        randomness=randomness,
        proximal_mu=config.proximal_mu,
    )
    new_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return new_state, TrainReport(pid, len(y), spent)


def simulate_faults(config: FedsimConfig, pid: int, server_round: int) -> None:
    """Be a straggler or drop out, as configured, after training on local data.

    Dropping out *after* training is the worst case for privacy: the data was used but
    the server never sees the spend, so the server charges the prescribed one. Faults
    are part of an experiment's design, not of a DP mechanism: always seeded.
    """
    seed = stream_seed(
        seeded_root(config.seed), purpose=Purpose.FAULTS, server_round=server_round, client=pid
    )
    straggle, drop = numpy_generator(seed).random(2)
    if straggle < config.straggler_prob:
        time.sleep(config.straggler_delay)
    if drop < config.client_dropout:
        raise FedsimError(f"dropped out (simulated, client-dropout={config.client_dropout:g})")


# the component that SuperNodes and `flwr run` load (pyproject.toml); `fedsim run` uses
# simulation_app, whose clients follow the run's secure-noise
app = build_client_app(deployment=True)
simulation_app = build_client_app(deployment=False)
