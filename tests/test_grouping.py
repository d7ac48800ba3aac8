"""clients-per-worker: a worker trains a group of clients at once, equal to one by one."""

import math
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict

from fedsim import results
from fedsim.clients import client_app, local
from fedsim.config import check_deployment, parse_config
from fedsim.errors import FedsimError
from fedsim.experiments.run import preflight
from fedsim.messages import (
    decode_train_report,
    encode_group_reply,
    encode_train_reply,
    model_arrays,
    named_group,
    split_group_reply,
    train_content,
)
from fedsim.models import build_model
from fedsim.server.federation import run_federation
from fedsim.server.grouping import GroupedGrid
from fedsim.server.rounds import screen_replies

DIGITS = {"input_shape": (1, 8, 8), "num_classes": 10}
SMALL = {"num-clients": 6, "clients-per-round": 6, "num-rounds": 2, "max-samples": 90}


def start_state(seed=0, model="cnn"):
    torch.manual_seed(seed)
    return build_model(model, **DIGITS).state_dict()


def smooth_cnn(*, input_shape, num_classes, **_):
    """The digits ``cnn`` with tanh and average pooling: nothing where rounding picks a side.

    With ReLU and max pooling, a near-tie in a pooling window (or a value near 0) can go
    either way when vmap batches the convolutions over clients, and the sample's gradient
    then flows through another input (``fedsim.dp.cohort``'s docstring): a valid gradient,
    but not the one-by-one path's to 1e-5.
    """
    channels, height, width = input_shape
    return torch.nn.Sequential(
        torch.nn.Conv2d(channels, 16, 3, padding=1), torch.nn.GroupNorm(4, 16), torch.nn.Tanh(),
        torch.nn.AvgPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.GroupNorm(8, 32), torch.nn.Tanh(),
        torch.nn.AvgPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * (height // 4) * (width // 4), 64),
        torch.nn.Tanh(), torch.nn.Linear(64, num_classes),
    )  # fmt: skip


SMOOTH = "tests.test_grouping:smooth_cnn"


@pytest.mark.parametrize(
    "values",
    [
        {"dp": "sample", "noise-multiplier": 1.1, "local-epochs": 2},
        {"dp": "none", "momentum": 0.5},
        {"dp": "sample", "noise-multiplier": 0.8, "proximal-mu": 0.1, "strategy": "fedprox"},
    ],
)
def test_a_group_trains_each_client_as_one_by_one(values):
    config = parse_config({**SMALL, "batch-size": 16, "model": SMOOTH, **values})
    state, clients = start_state(model=SMOOTH), [4, 0, 2]
    group = local.train_group(config, clients, 3, state)
    assert list(group) == clients
    for pid in clients:
        alone, report = local.train_round(config, pid, 3, state)
        grouped, grouped_report = group[pid]
        assert grouped_report == report  # size and the ledger's (σ, q, steps)
        for key, value in alone.items():
            torch.testing.assert_close(grouped[key], value, rtol=1e-4, atol=1e-5)


def test_group_messages_and_replies_round_trip(flower_run):
    config = parse_config({**SMALL, "noise-multiplier": 1.0, "client-dropout": 0.5})
    reply = train_reply(config, 1)
    content = encode_group_reply({1: reply, 3: "dropped out", 5: "dropped out"})
    split = split_group_reply(content, [1, 3, 5])
    assert split[3] == split[5] == "dropped out"
    assert decode_train_report(split[1]) == decode_train_report(reply)
    assert model_arrays(split[1]).object_id == model_arrays(reply).object_id
    with pytest.raises(FedsimError, match="no 'errors' record"):
        split_group_reply(RecordDict(), [1])


def train_reply(config, pid):
    state, report = local.train_round(config, pid, 1, start_state())
    return encode_train_reply(ArrayRecord(state), report)


SIMULATED_TRAIN = partial(client_app.train, deployment=False)


class LoopbackGrid:
    """A grid whose nodes are this process: a pushed message is answered at once.

    ``train`` answers it; an exception of ``errors`` becomes an error reply, as Flower's
    engine makes one of a ClientApp's exception, and any other fails the test.
    """

    def __init__(
        self,
        nodes: int,
        train: Callable[[Message, Context], Message] = SIMULATED_TRAIN,
        errors: tuple[type[Exception], ...] = (FedsimError,),
    ) -> None:
        self.nodes, self.replies, self.pushed = list(range(100, 100 + nodes)), {}, []
        self.train, self.errors = train, errors

    def get_node_ids(self):
        return self.nodes

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = mid = str(uuid.uuid4())
            self.pushed.append(msg)
            context = Context(1, msg.metadata.dst_node_id, {}, RecordDict(), {})
            try:
                reply = self.train(msg, context)
            except self.errors as exc:
                reply = msg.create_error_reply(error=_error(str(exc)))
            self.replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(m) for m in list(message_ids) if m in self.replies]


def _error(reason):
    return Error(0, reason)


def run(tmp_path: Path, values: dict, name: str):
    config = parse_config({**SMALL, "secure-noise": False, **values})
    inner = LoopbackGrid(config.simulation_workers)
    summary = run_federation(
        inner, config, run_dir=tmp_path / name, on_round=lambda row: None, node_per_client=False
    )
    return summary, inner.pushed


def test_a_grouped_run_gives_the_one_by_one_run_result(tmp_path, flower_run):
    alone, sent_alone = run(tmp_path, {"noise-multiplier": 1.0}, "alone")
    grouped, sent_grouped = run(tmp_path, {"noise-multiplier": 1.0, "clients-per-worker": 4}, "g")
    assert len(sent_alone) == 12 and len(sent_grouped) == 4  # 6 clients a round, 2 rounds
    assert [named_group(m.content) for m in sent_grouped[:2]] == [[0, 2, 4], [1, 3, 5]]
    assert grouped["accuracy"] == pytest.approx(alone["accuracy"], abs=1e-3)
    assert grouped["epsilon"] == alone["epsilon"]  # the same ledger, entry for entry


def test_a_client_that_drops_out_of_a_group_leaves_the_others(tmp_path, flower_run):
    values = {"noise-multiplier": 1.0, "clients-per-worker": 3, "client-dropout": 0.4}
    summary, _ = run(tmp_path, values, "drop")
    failed = summary["failed_per_round"]
    assert failed and all(0 < n < 6 for n in failed.values())  # some, never whole groups


def test_screening_sees_a_failed_group_as_each_of_its_clients_failing(flower_run):
    class Broken(LoopbackGrid):
        def push_messages(self, messages):
            ids = []
            for msg in messages:
                msg.metadata.__dict__["_message_id"] = mid = str(uuid.uuid4())
                self.replies[mid] = msg.create_error_reply(error=_error("out of memory"))
                ids.append(mid)
            return ids

    config = parse_config({**SMALL, "noise-multiplier": 1.0})
    arrays = ArrayRecord(start_state())
    template = ConfigRecord(config.to_flat())
    grid = GroupedGrid(Broken(2), 3)
    messages = [
        Message(train_content(arrays, template, 1, c), 100 + c % 2, "train") for c in range(6)
    ]
    ids = list(grid.push_messages(messages))
    good, dropped = screen_replies(messages, list(grid.pull_messages(ids)), 1.0)
    assert not good and dropped == dict.fromkeys(range(6), "error: out of memory")


def test_groups_are_refused_where_they_cannot_work():
    # the LSTM trains in groups as Opacus's DPLSTM (fedsim.dp.vectorizable)
    parse_config({"model": "lstm", "dataset": "shakespeare", "clients-per-worker": 2})
    with pytest.raises(FedsimError, match="under the deployment engine each SuperNode"):
        check_deployment(parse_config({"clients-per-worker": 2, "secure-noise": True}))


def batch_norm_net(*, input_shape, num_classes, **_):
    """A model of a user's own that vmap cannot train per client: BatchNorm mixes samples."""
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.BatchNorm1d(math.prod(input_shape)),
        torch.nn.Linear(math.prod(input_shape), num_classes),
    )  # fmt: skip


def test_preflight_refuses_a_model_of_your_own_that_cannot_be_grouped():
    config = parse_config({"model": "tests.test_grouping:batch_norm_net", "clients-per-worker": 2})
    with pytest.raises(FedsimError, match="does not support Sequential: its BatchNorm1d"):
        preflight(config)
    one_by_one = config.model_copy(update={"clients_per_worker": 1})
    with pytest.raises(FedsimError, match="mixes the samples of a batch"):  # DP-SGD cannot either
        preflight(one_by_one)
    preflight(one_by_one.model_copy(update={"dp": "none"}))


@pytest.mark.parametrize("dp", ["sample", "user"])
def test_a_round_with_too_few_replies_stops_only_where_cohorts_are_public(tmp_path, flower_run, dp):
    """Under user-level DP a stop would tell of the failures, which can come from a
    client's data: the failed clients count as zero and the round is released."""
    # with seed 1 all six clients drop out of round 1
    values = {"dp": dp, "noise-multiplier": 1.0, "user-noise-multiplier": 1.0,
              "client-dropout": 0.99, "num-rounds": 1, "seed": 1}  # fmt: skip
    if dp == "sample":
        values.pop("user-noise-multiplier")
        with pytest.raises(FedsimError, match=r"0 of 6 clients replied.*dropped out"):
            run(tmp_path, values, dp)
        return
    summary, _ = run(tmp_path, values, dp)
    assert summary["failed_per_round"] is None and summary["num_rounds"] == 1
    private = results.read_csv(tmp_path / dp / results.PARTICIPATION)
    assert private[1]["failed"] == private[1]["cohort"] != "0"  # every sampled client failed


def test_a_client_that_raises_takes_no_other_client_of_its_group_with_it(monkeypatch):
    """Else one client's data could zero out the others' updates (k times the clip norm
    under user-level DP): the group trains again one client at a time."""
    config = parse_config({**SMALL, "batch-size": 16, "model": SMOOTH, "noise-multiplier": 1.1})
    original = local.client_tensors

    def broken_for_client_0(config, pid, **kwargs):
        if pid == 0:
            raise FedsimError("client 0's data does not load")
        return original(config, pid, **kwargs)

    monkeypatch.setattr(local, "client_tensors", broken_for_client_0)
    state = start_state(model=SMOOTH)
    group = local.train_group(config, [4, 0, 2], 3, state)
    assert group[0] == "client 0's data does not load"
    for pid in (4, 2):
        alone, report = local.train_round(config, pid, 3, state)
        grouped, grouped_report = group[pid]
        assert grouped_report == report
        for key, value in alone.items():
            torch.testing.assert_close(grouped[key], value, rtol=1e-4, atol=1e-5)
