"""Message keys and payload types shared by ``clients/`` and ``server/``.

This module is the whole contract between the two sides: neither imports the other.
A train message carries the global model under ``ARRAYS`` and the resolved experiment
config under ``CONFIG``; a train reply carries the local model, its example count (the
FedAvg weight) and, under ``PRIVACY``, what the client's DP-SGD spent. A group message
(``clients-per-worker`` > 1, simulations only) names several clients; its reply holds
each client's reply under keys suffixed by the client's id, or why that client failed.
A client sends nothing else about its data: no training loss, and its label counts only
where the run sets ``share-label-counts``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsim.config import FedsimConfig, parse_config
from fedsim.errors import FedsimError

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
PRIVACY = "privacy"
ROUND_KEY = "server-round"
# in a train message: the client (partition) to train, so simulation nodes are workers
PARTITION_KEY = "partition-id"
# in a group train message: the clients one worker trains together
GROUP_KEY = "partition-ids"
GROUP_ERRORS = "errors"  # in a group reply: {client id: why it has no reply}
WEIGHT_KEY = "num-examples"
LABELS_KEY = "label-counts"
# a simulated dropout's reason starts so: the server tells it from the client's own errors
DROPOUT = "dropped out (simulated"


@dataclass(frozen=True)
class ClientInfo:
    """What a client reports about its data when the server asks (a query message)."""

    partition_id: int
    num_examples: int
    label_counts: tuple[int, ...] | None  # None: not shared (share-label-counts = false)


@dataclass(frozen=True)
class PrivacySpent:
    """DP-SGD steps a client took in one round: a run of equal (σ, q) steps per entry.

    Entries mirror Opacus's accountant history ``(noise_multiplier, sample_rate, steps)``.
    Empty when the client trained without DP.
    """

    noise_multiplier: tuple[float, ...] = ()
    sample_rate: tuple[float, ...] = ()
    steps: tuple[int, ...] = ()


@dataclass(frozen=True)
class TrainReport:
    """Metadata of one client's local training in one round."""

    partition_id: int
    num_examples: int
    spent: PrivacySpent


def encode_config(config: FedsimConfig, server_round: int = 0) -> RecordDict:
    """Server -> client: the resolved config (and round) that the client needs."""
    record = ConfigRecord({**config.to_flat(), ROUND_KEY: server_round})
    return RecordDict({CONFIG: record})


def decode_config(content: RecordDict) -> tuple[FedsimConfig, int]:
    """Client side of :func:`encode_config`: validated config and server round."""
    values = dict(content[CONFIG])
    server_round = _int(values, ROUND_KEY) if ROUND_KEY in values else 0
    values.pop(ROUND_KEY, None)
    values.pop(PARTITION_KEY, None)
    values.pop(GROUP_KEY, None)
    return parse_config(values), server_round


def train_content(
    arrays: ArrayRecord, template: ConfigRecord, server_round: int, client: int
) -> RecordDict:
    """Server -> client: the global model, and the round's config naming the client.

    ``template`` is the config the strategy made for this round, the run's own (checked
    by the server's ``Cohorts``); each message gets its own copy, as it names a client.
    """
    config = ConfigRecord({**template, ROUND_KEY: server_round, PARTITION_KEY: client})
    return RecordDict({ARRAYS: arrays, CONFIG: config})


def group_content(content: RecordDict, clients: list[int]) -> RecordDict:
    """One train message's content, made to name ``clients`` (a group) instead of one."""
    config = ConfigRecord({k: v for k, v in content.config_records[CONFIG].items()})
    config.pop(PARTITION_KEY, None)
    config[GROUP_KEY] = clients
    return RecordDict({ARRAYS: model_arrays(content), CONFIG: config})


def named_group(content: RecordDict) -> list[int] | None:
    """The clients a group train message names, or None: not a group message."""
    config = content[CONFIG]
    return [int(c) for c in _numbers(config, GROUP_KEY)] if GROUP_KEY in config else None


def encode_group_reply(replies: Mapping[int, RecordDict | str]) -> RecordDict:
    """Client -> server reply to a group message: each client's reply, or why it failed.

    ``replies[c]`` is what :func:`encode_train_reply` made for client c, or a reason.
    """
    out, errors = RecordDict(), ConfigRecord()
    for client, reply in replies.items():
        if isinstance(reply, str):
            errors[str(client)] = reply
            continue
        for key, record in reply.items():
            out[f"{key}/{client}"] = record
    out[GROUP_ERRORS] = errors
    return out


def split_group_reply(content: RecordDict, clients: list[int]) -> dict[int, RecordDict | str]:
    """Server side of :func:`encode_group_reply`: client -> its reply, or why it has none."""
    errors = content.get(GROUP_ERRORS)
    if not isinstance(errors, ConfigRecord):
        raise FedsimError(f"a group reply carries no '{GROUP_ERRORS}' record: {_VERSIONS}")
    split: dict[int, RecordDict | str] = {}
    for client in clients:
        if str(client) in errors:
            split[client] = str(errors[str(client)])
            continue
        keys = (ARRAYS, METRICS, PRIVACY)
        if any(f"{key}/{client}" not in content for key in keys):
            split[client] = "the group reply has no reply for this client"
            continue
        split[client] = RecordDict({key: content[f"{key}/{client}"] for key in keys})
    return split


def average_content(arrays: ArrayRecord) -> RecordDict:
    """The user-level DP average, as the one reply a strategy aggregates after it.

    A strategy averaging this one "reply" returns it unchanged, then applies its server
    optimizer: post-processing of what the noise already protects.
    """
    metrics = MetricRecord({PARTITION_KEY: -1, WEIGHT_KEY: 1})
    return RecordDict({ARRAYS: arrays, METRICS: metrics})


def model_arrays(content: Mapping[str, object]) -> ArrayRecord:
    """The model weights a train message or reply carries (``ARRAYS``)."""
    record = content.get(ARRAYS)
    if not isinstance(record, ArrayRecord):
        raise FedsimError(f"the message carries no model weights under '{ARRAYS}'")
    return record


def message_client(content: RecordDict) -> int:
    """The client a train message names, or that a train reply is from."""
    if CONFIG in content and (named := named_partition(content)) is not None:
        return named
    return _int(content[METRICS], PARTITION_KEY)


def named_partition(content: RecordDict) -> int | None:
    """The client (partition id) a train message names, or None: the node's own."""
    config = content[CONFIG]
    return _int(config, PARTITION_KEY) if PARTITION_KEY in config else None


def encode_client_info(info: ClientInfo) -> RecordDict:
    """Client -> server reply to a query message."""
    values: dict[str, int | float | list[int] | list[float]] = {
        PARTITION_KEY: info.partition_id,
        WEIGHT_KEY: info.num_examples,
    }
    if info.label_counts is not None:
        values[LABELS_KEY] = list(info.label_counts)
    return RecordDict({METRICS: MetricRecord(values)})


def decode_client_info(content: RecordDict) -> ClientInfo:
    """Server side of :func:`encode_client_info`."""
    metrics = content[METRICS]
    labels = _numbers(metrics, LABELS_KEY) if LABELS_KEY in metrics else None
    return ClientInfo(
        partition_id=_int(metrics, PARTITION_KEY),
        num_examples=_int(metrics, WEIGHT_KEY),
        label_counts=None if labels is None else tuple(int(c) for c in labels),
    )


def encode_train_reply(arrays: ArrayRecord, report: TrainReport) -> RecordDict:
    """Client -> server reply to a train message."""
    metrics = MetricRecord({PARTITION_KEY: report.partition_id, WEIGHT_KEY: report.num_examples})
    spent = report.spent
    privacy = ConfigRecord(
        {
            "noise-multiplier": [float(s) for s in spent.noise_multiplier],
            "sample-rate": [float(q) for q in spent.sample_rate],
            "steps": [int(t) for t in spent.steps],
        }
    )
    return RecordDict({ARRAYS: arrays, METRICS: metrics, PRIVACY: privacy})


def decode_train_report(content: RecordDict) -> TrainReport:
    """Server side of :func:`encode_train_reply` (the arrays stay in the record)."""
    metrics, privacy = content[METRICS], content[PRIVACY]
    spent = PrivacySpent(
        noise_multiplier=tuple(_numbers(privacy, "noise-multiplier")),
        sample_rate=tuple(_numbers(privacy, "sample-rate")),
        steps=tuple(int(t) for t in _numbers(privacy, "steps")),
    )
    return TrainReport(
        partition_id=_int(metrics, PARTITION_KEY),
        num_examples=_int(metrics, WEIGHT_KEY),
        spent=spent,
    )


# Flower's records hold any of a dozen value types: each value is checked here, once.
def _int(record: Mapping[str, object], key: str) -> int:
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FedsimError(f"a message's {key} is {value!r}, not a number: {_VERSIONS}")
    return int(value)


def _numbers(record: Mapping[str, object], key: str) -> list[float]:
    value = record[key]
    if not isinstance(value, list) or not all(isinstance(v, int | float) for v in value):
        raise FedsimError(f"a message's {key} is {value!r}, not a list of numbers: {_VERSIONS}")
    return [float(v) for v in value]


_VERSIONS = "do the clients and the server run the same fedsim?"


def dropout_reason(rate: float) -> str:
    """Why a client that dropped out (simulated, at ``client-dropout`` ``rate``) has no reply."""
    return f"{DROPOUT}, client-dropout={rate:g})"
