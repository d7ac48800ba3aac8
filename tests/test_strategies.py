"""Flower's strategies in fedsim's cohorts: configuration, aggregation, state, refusals."""

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx

from fedsim.config import parse_config
from fedsim.dp import seeded_root
from fedsim.errors import FedsimError
from fedsim.messages import ARRAYS, CONFIG, METRICS, PARTITION_KEY, WEIGHT_KEY, named_partition
from fedsim.server.algorithms import COMMON, algorithm_state, build_algorithm, restore_algorithm
from fedsim.server.rounds import keep_schema
from fedsim.server.strategy import Cohorts, OwnStrategy
from fedsim.server.user_dp import UserLevelDP


def arrays(value):
    return ArrayRecord({"w": Array(np.asarray(value, dtype=np.float32))})


def reply(client, value, weight=1):
    metrics = MetricRecord({PARTITION_KEY: client, WEIGHT_KEY: weight})
    return SimpleNamespace(
        content=RecordDict({ARRAYS: arrays(value), METRICS: metrics}),
        has_error=lambda: False,
        has_content=lambda: True,
        metadata=SimpleNamespace(src_node_id=client),
    )


GRID = SimpleNamespace(get_node_ids=lambda: [11, 12, 13])
pytestmark = pytest.mark.usefixtures("flower_run")


def test_each_builtin_gets_the_keys_that_apply_to_it():
    adam = build_algorithm(
        parse_config({"strategy": "fedadam", "server-lr": 0.05, "server-momentum": 0.8})
    )
    assert isinstance(adam, FedAdam) and (adam.eta, adam.beta_1, adam.tau) == (0.05, 0.8, 1e-3)
    avgm = build_algorithm(parse_config({"strategy": "fedavgm", "server-momentum": 0.9}))
    assert isinstance(avgm, FedAvgM) and avgm.server_momentum == 0.9
    prox = build_algorithm(parse_config({"strategy": "fedprox", "proximal-mu": 0.1}))
    assert isinstance(prox, FedProx) and prox.proximal_mu == 0.1


def test_cohorts_carry_the_strategys_config_to_each_sampled_client():
    prox = build_algorithm(parse_config({"strategy": "fedprox", "proximal-mu": 0.1}))
    cohorts = Cohorts(prox, num_clients=3, nodes=[11, 12, 13], bound=True,
                      clients_per_round=2, root=seeded_root(0))  # fmt: skip
    run = ConfigRecord({"lr": 0.5, "proximal-mu": 0.1})
    messages = list(cohorts.configure_train(4, arrays([0.0]), run, GRID))
    assert len(messages) == 2
    clients = [named_partition(m.content) for m in messages]
    assert len(set(clients)) == 2 and [m.metadata.dst_node_id - 11 for m in messages] == clients
    for m in messages:
        assert m.content[CONFIG]["proximal-mu"] == 0.1 and m.content[CONFIG]["lr"] == 0.5


class Scheduled(FedAvg):
    """Per-round settings in the train config, Flower's usual way."""

    def __init__(self, change):
        super().__init__()
        self.change = change

    def configure_train(self, server_round, arrays, config, grid):
        self.change(config)  # in place, as FedAvg adds the round number
        return super().configure_train(server_round, arrays, config, grid)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda c: c.__setitem__("dp", "none"), "changed 'dp' from 'sample' to 'none'"),
        (lambda c: c.__setitem__("local-epochs", 3), "changed 'local-epochs' from 1 to 3"),
        (lambda c: c.pop("secure-noise"), "dropped key 'secure-noise'"),
        (lambda c: c.__setitem__("warmup", 1), "added key 'warmup'"),
    ],
)
def test_a_strategy_that_changes_the_runs_config_is_refused(change, needle):
    run = ConfigRecord(parse_config({"dp": "sample", "noise-multiplier": 1.0}).to_flat())
    own = OwnStrategy(Scheduled(change), "mine:Scheduled")
    cohorts = Cohorts(own, num_clients=3, nodes=[11, 12, 13], bound=True,
                      clients_per_round=2, root=seeded_root(0))  # fmt: skip
    before = dict(run)
    with pytest.raises(FedsimError, match=rf"^strategy 'mine:Scheduled' {needle} in round 2's"):
        cohorts.configure_train(2, arrays([0.0]), run, GRID)
    assert dict(run) == before  # the run's config, untouched for later rounds
    # the same strategy, changing nothing, passes: the round number it adds is its own
    plain = Cohorts(Scheduled(lambda c: None), num_clients=3, nodes=[11, 12, 13], bound=True,
                    clients_per_round=2, root=seeded_root(0))  # fmt: skip
    assert len(list(plain.configure_train(2, arrays([0.0]), run, GRID))) == 2


def test_the_strategy_aggregates_replies_in_client_order_with_its_optimizer():
    avgm = build_algorithm(parse_config({"strategy": "fedavgm", "server-momentum": 0.5}))
    cohorts = Cohorts(avgm, num_clients=2, nodes=[11, 12], bound=True,
                      clients_per_round=2, root=seeded_root(0))  # fmt: skip
    w = arrays([0.0])
    cohorts.configure_train(1, w, ConfigRecord({}), GRID)
    new, _ = cohorts.aggregate_train(1, [reply(1, [4.0], 3), reply(0, [0.0], 1)])
    assert new["w"].numpy().tolist() == [3.0]  # FedAvg weighted by examples: (0 + 3·4) / 4
    cohorts.configure_train(2, new, ConfigRecord({}), GRID)
    again, _ = cohorts.aggregate_train(2, [reply(0, [3.0]), reply(1, [3.0])])
    assert again["w"].numpy().tolist() == [4.5]  # no change, but momentum 0.5 · 3 carries on


def test_under_user_dp_the_strategy_sees_only_the_noised_average():
    avgm = build_algorithm(parse_config({"strategy": "fedavgm", "server-momentum": 0.5}))
    dp = UserLevelDP(
        Cohorts(avgm, num_clients=4, nodes=[1], bound=False, clients_per_round=2,
                root=seeded_root(0)),
        ledger=[], sample_rate=0.5, noise_multiplier=1e-9, clip_norm=10.0,
        expected_cohort=2.0, root=seeded_root(0),
    )  # fmt: skip
    dp.configure_train(1, arrays([0.0]), ConfigRecord({}), GRID)
    new, _ = dp.aggregate_train(1, [reply(0, [1.0], 50), reply(1, [3.0], 1)])
    assert new["w"].numpy() == pytest.approx([2.0])  # unweighted sum / expected cohort
    dp.configure_train(2, new, ConfigRecord({}), GRID)
    again, _ = dp.aggregate_train(2, [])  # an empty cohort: no update, momentum goes on
    assert again["w"].numpy() == pytest.approx([3.0])


def test_the_strategys_state_survives_a_checkpoint():
    config = parse_config({"strategy": "fedadam", "server-lr": 0.1, "server-momentum": 0.9})
    first = build_algorithm(config)
    rounds = [[1.0, 2.0], [2.0, -1.0], [0.5, 0.5]]
    w = arrays([0.0, 0.0])
    for r, value in enumerate(rounds[:2], start=1):
        first.configure_train(r, w, ConfigRecord({}), GRID)
        w, _ = first.aggregate_train(r, [reply(0, value)])
    buf = io.BytesIO()
    torch.save(algorithm_state(first), buf)
    resumed = build_algorithm(config)
    restore_algorithm(resumed, torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    for strategy in (first, resumed):
        strategy.configure_train(3, w, ConfigRecord({}), GRID)
    a, _ = first.aggregate_train(3, [reply(0, rounds[2])])
    b, _ = resumed.aggregate_train(3, [reply(0, rounds[2])])
    assert a["w"].numpy().tolist() == b["w"].numpy().tolist()


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"server-momentum": 0.9}, "server-momentum does not apply to strategy fedavg"),
        ({"strategy": "fedadam", "proximal-mu": 0.1}, "proximal-mu does not apply"),
        ({"strategy": "flwr.serverapp.strategy:FedMedian", "dp": "user"}, "not aggregate by a sum"),
        ({"strategy": "flwr.serverapp.strategy:Krum", "dp": "both"}, "not aggregate by a sum"),
        ({"strategy": "flwr.serverapp.strategy:DifferentialPrivacyServerSideFixedClipping"},
         "Flower's DP wrappers"),
        ({"strategy": "fedsgd"}, "unknown strategy 'fedsgd'"),
    ],
)  # fmt: skip
def test_strategies_that_do_not_fit_are_refused_in_one_line(values, needle):
    with pytest.raises(FedsimError, match=needle) as info:
        parse_config(values)
    assert "\n" not in str(info.value)
    # a robust aggregation is fine where only clients add noise
    parse_config({"strategy": "flwr.serverapp.strategy:FedMedian", "dp": "sample"})


def test_the_global_model_keeps_its_arrays_names_and_dtypes():
    def model(w, steps):
        return ArrayRecord(
            {"w": Array(np.asarray(w, np.float32)), "steps": Array(np.asarray(steps, np.int64))}
        )

    def answer(client, record):
        message = reply(client, [0.0])
        message.content[ARRAYS] = record
        return message

    fedavg = build_algorithm(parse_config({}))
    mean, _ = fedavg.aggregate_train(1, [answer(0, model([1.0], 4)), answer(1, model([2.0], 7))])
    assert mean["steps"].dtype == "float64"  # Flower averages a step counter as a float
    kept = keep_schema(mean, model([0.0], 0))
    assert kept["steps"].numpy().dtype == np.int64 and kept["steps"].numpy() == 5
    assert kept["w"].numpy().tolist() == [1.5]
    same = model([3.0], 1)
    assert keep_schema(same, model([0.0], 0)) is same  # nothing to cast: no copy
    with pytest.raises(FedsimError, match=r"missing \['steps'\], extra \['v'\]"):
        other = {"w": Array(np.zeros(1, np.float32)), "v": Array(np.zeros(1, np.float32))}
        keep_schema(ArrayRecord(other), model([0.0], 0))


def test_an_error_in_a_strategy_of_ones_own_names_it():
    class Buggy(FedAvgM):
        def aggregate_train(self, server_round, replies):
            raise ValueError("my aggregation bug\nwith a second line")

    own = OwnStrategy(Buggy(**COMMON), "mine:Buggy")
    needle = (
        r"^strategy 'mine:Buggy' failed in aggregate_train of round 3 "
        r"\(ValueError: my aggregation bug\); fix the strategy$"
    )
    with pytest.raises(FedsimError, match=needle):
        own.aggregate_train(3, [reply(0, [1.0])])
    # fedsim's own refusals pass through unchanged
    with pytest.raises(FedsimError, match=r"^nothing to aggregate$"):
        OwnStrategy(SimpleNamespace(aggregate_train=refuse), "x:y").aggregate_train(1, [])


def refuse(server_round, replies):
    raise FedsimError("nothing to aggregate")


def test_a_factory_s_strategy_is_checked_once_built(tmp_path, monkeypatch):
    (tmp_path / "factories16.py").write_text(
        "from flwr.serverapp.strategy import FedAvg, FedMedian\n\n\n"
        "def median(**kw):\n    return FedMedian(**kw)\n\n\n"
        "def avg(**kw):\n    return FedAvg(**kw)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    # a function: no class to check until it is called
    config = parse_config({"strategy": "factories16:median", "dp": "user"})
    with pytest.raises(FedsimError, match="factories16:median does not aggregate by a sum"):
        build_algorithm(config)
    assert build_algorithm(parse_config({"strategy": "factories16:median"})).__class__.__name__ == (
        "FedMedian")  # fmt: skip
    assert build_algorithm(parse_config({"strategy": "factories16:avg", "dp": "user"}))
