"""Simulation nodes are workers: clients are placed per message, sizes come from the data."""

import pytest
from flwr.app import Context, RecordDict

from fedsim.clients.client_app import train_partition
from fedsim.clients.task import client_info
from fedsim.config import parse_config
from fedsim.data import load_dataset
from fedsim.data.partition import partition_dataset
from fedsim.dp.randomness import seeded_root
from fedsim.errors import FedsimError
from fedsim.server.discovery import partition_infos
from fedsim.server.strategy import place, sample_clients


def test_bound_clients_go_to_their_node_and_a_cohort_spreads_over_workers():
    nodes = [101, 102, 103]
    assert place([2, 0], nodes, bound=True) == [103, 101]
    assert place([7, 40, 41, 90], nodes, bound=False) == [101, 102, 103, 101]


def test_a_simulation_needs_a_node_per_client_of_a_round_only():
    assert parse_config({"num-clients": 50, "clients-per-round": 5}).simulation_workers == 5
    assert parse_config({"num-clients": 4, "clients-per-round": 4}).simulation_workers == 4
    grouped = {"num-clients": 50, "clients-per-round": 10, "clients-per-worker": 4}
    assert parse_config(grouped).simulation_workers == 3


@pytest.mark.parametrize("share", [True, False])
def test_server_reads_the_same_sizes_and_labels_the_clients_report(share):
    config = parse_config(
        {"num-clients": 7, "partition": "dirichlet", "dirichlet-alpha": 0.3,
         "share-label-counts": share}
    )  # fmt: skip
    dataset = load_dataset(config.dataset, config.data_dir)
    infos = partition_infos(dataset, partition_dataset(dataset, config), share_labels=share)
    assert infos == [client_info(config, c) for c in range(7)]
    assert all((info.label_counts is not None) == share for info in infos)


def test_a_large_population_samples_the_right_cohort():
    root = seeded_root(3)
    chosen = sample_clients(100_000, 100, root=root, server_round=9)
    assert len(chosen) == len(set(chosen)) == 100 and max(chosen) < 100_000
    assert chosen == sample_clients(100_000, 100, root=root, server_round=9)
    poisson = sample_clients(100_000, 100, root=root, server_round=9, poisson=True)
    assert 50 < len(poisson) < 150


def _context(node_config):
    return Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={})


def test_a_node_with_its_own_data_trains_only_that():
    config = parse_config({"num-clients": 3, "clients-per-round": 3})
    worker = _context({"partition-id": 0, "num-partitions": 3})
    assert train_partition(worker, config, 2) == 2  # a simulation worker trains any client
    assert train_partition(worker, config, None) == 0  # no name: the node's own
    owner = _context({"partition-id": 0, "num-partitions": 3, "data-dir": "/data/site0"})
    assert train_partition(owner, config, 0) == 0
    with pytest.raises(FedsimError, match="holds only its own data"):
        train_partition(owner, config, 2)
