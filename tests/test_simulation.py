"""Real Flower + Ray simulations through the `fedsim` command."""

import json
import os
import re
import subprocess
import sys

import dp_accounting
import pytest
from dp_accounting import rdp

from fedsim.results import read_csv
from server.privacy import RDP_ORDERS
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
SMALL = [
    "num-clients=3",
    "clients-per-round=2",
    "num-rounds=3",
    "batch-size=64",
    "target-epsilon=4",
]


def fedsim_run(out, *sets):
    args = [a for s in (*SMALL, *sets) for a in ("--set", s)]
    result = subprocess.run(
        [sys.executable, "-m", "experiments.cli", "run", "--out", str(out), *args],
        cwd=out.parent,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("sim")
    first = fedsim_run(base / "a")
    fedsim_run(base / "b")
    return base, first


def test_results_complete_and_no_partial_left(two_runs):
    base, first = two_runs
    out = base / "a"
    for name in (
        "summary.json",
        "rounds.csv",
        "privacy.json",
        "partition.csv",
        "accuracy_epsilon.png",
        "model.pt",
    ):
        assert (out / name).is_file(), name
    assert not [p for p in base.iterdir() if p.name.endswith(".partial")]
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "accuracy",
        "loss",
        "epsilon",
        "delta",
        "privacy_unit",
        "accountant",
        "noise_multiplier",
        "num_rounds",
        "num_clients",
        "wall_seconds",
        "config",
    ):
        assert key in summary
    assert summary["privacy_unit"] == "sample" and summary["config"]["num-clients"] == 3
    rounds = read_csv(out / "rounds.csv")
    assert [int(r["round"]) for r in rounds] == [0, 1, 2, 3]
    assert [len(r["clients"].split()) for r in rounds[1:]] == [2, 2, 2]
    partition = read_csv(out / "partition.csv")
    assert sum(int(r["num_examples"]) for r in partition) == 1437
    # one progress line per round, and none of Ray's or Flower's log lines
    progress = [line for line in first.stdout.splitlines() if re.match(r"round +\d+/\d+ ", line)]
    assert len(progress) == 4
    assert "INFO" not in first.stdout


def test_same_seed_same_accuracies(two_runs):
    base, _ = two_runs
    acc = [[r["accuracy"] for r in read_csv(base / run / "rounds.csv")] for run in "ab"]
    assert acc[0] == acc[1]


def test_summary_epsilon_equals_independent_composition(two_runs):
    base, _ = two_runs
    summary = json.loads((base / "a" / "summary.json").read_text())
    ledger = json.loads((base / "a" / "privacy.json").read_text())
    assert ledger["accountant"] == summary["accountant"] == "rdp"
    epsilons = []
    for entries in ledger["clients"].values():
        acc = rdp.RdpAccountant(RDP_ORDERS)
        for e in entries:
            event = dp_accounting.PoissonSampledDpEvent(
                e["sample_rate"], dp_accounting.GaussianDpEvent(e["noise_multiplier"])
            )
            acc.compose(event, e["steps"])
        epsilons.append(acc.get_epsilon(ledger["delta"]))
    assert summary["epsilon"] == pytest.approx(max(epsilons), rel=1e-3)
    assert summary["epsilon"] <= 4.0
    # every round a client trained in is in its ledger
    rounds = read_csv(base / "a" / "rounds.csv")[1:]
    for client, entries in ledger["clients"].items():
        trained = [int(r["round"]) for r in rounds if client in r["clients"].split()]
        assert [e["round"] for e in entries] == trained


def test_natural_partition_text_run_records_users_and_vocab(tmp_path, shared_data):
    """LSTM with DP on Shakespeare by role: DPLSTM clients, a plain-LSTM server."""
    out = tmp_path / "roles"
    fedsim_run(
        out,
        "model='lstm'",
        "dataset='shakespeare'",
        f"data-dir='{shared_data / 'tinyshakespeare'}'",
        "partition='natural'",
        "min-samples=2000",
        "max-samples=16",
        "batch-size=8",
        "num-rounds=1",
    )
    partition = read_csv(out / "partition.csv")
    assert len({r["user"] for r in partition}) == 3
    assert all(int(r["num_examples"]) == 16 for r in partition)
    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab["tokens"][:2] == ["<pad>", "<unk>"] and vocab["seq_len"] == 80
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["partition"] == "natural" and summary["epsilon"] <= 4.0
    ledger = json.loads((out / "privacy.json").read_text())
    assert sum(len(v) for v in ledger["clients"].values()) == 2  # 2 clients in the one round
