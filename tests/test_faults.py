"""Runs that survive: dropouts, failing clients, kill and resume, Ctrl-C."""

import os
import subprocess
import sys

import pytest

from fedsim.results import read_csv
from tests.conftest import ROOT, once_per_session

pytestmark = pytest.mark.slow
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
# client-cpus=2: one Ray worker hosts the clients, 12 s less CPU a run on 2 cores
SMALL = ["num-clients=4", "clients-per-round=4", "num-rounds=2", "batch-size=64", "client-cpus=2"]


def sets(*items):
    return [a for s in items for a in ("--set", s)]


def cli(*args, cwd):
    cmd = [sys.executable, "-m", "fedsim.experiments.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def fault_runs(tmp_path_factory):
    """Both runs of the fault app at once: min-clients 2 (goes on) and 3 (stops)."""
    base, made = once_per_session(tmp_path_factory, "faults", _fault_runs)
    return base, {int(k): subprocess.CompletedProcess([], *v) for k, v in made.items()}


def _fault_runs(base):
    procs = {}
    for need in (2, 3):
        cmd = [sys.executable, "-m", "tests.fault_app", str(base / f"run{need}"), *SMALL]
        procs[need] = subprocess.Popen(
            [*cmd, f"min-clients={need}"], cwd=ROOT, env=ENV, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
    outputs = {need: proc.communicate(timeout=600) for need, proc in procs.items()}
    return {need: [procs[need].returncode, *outputs[need]] for need in procs}


def test_raising_and_nan_clients_are_left_out_with_reasons(fault_runs):
    base, results = fault_runs
    assert results[2].returncode == 0, results[2].stdout + results[2].stderr
    for row in read_csv(base / "run2" / "rounds.csv")[1:]:
        assert "1: disk full on client 1" in row["dropped"]
        assert "2: returned non-finite (NaN or infinite) weights" in row["dropped"]
        assert float(row["accuracy"]) > 0  # NaNs never reached the global model


def test_too_few_clients_fails_with_reasons(fault_runs):
    base, results = fault_runs
    assert results[3].returncode != 0
    assert "2 of 4 clients replied, min-clients is 3" in results[3].stderr
    assert not (base / "run3").exists()
