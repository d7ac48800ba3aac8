"""Clients that raise or send NaNs: left out with reasons, or the run stops and says why."""

import os
import subprocess
import sys

import pytest

from fedsim.config import load_config
from fedsim.errors import FedsimError
from fedsim.results import read_csv
from fedsim.server.federation import run_federation
from tests import fault_app
from tests.conftest import ROOT, once_per_session
from tests.test_grouping import LoopbackGrid

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
# client-cpus=2: one Ray worker hosts the clients, 12 s less CPU a run on 2 cores
SMALL = ["num-clients=4", "clients-per-round=4", "num-rounds=2", "batch-size=64", "client-cpus=2"]


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory):
    """A real run of the fault app, where min-clients 2 lets it go on."""
    base, made = once_per_session(tmp_path_factory, "faults", _fault_run)
    return base, subprocess.CompletedProcess([], *made)


def _fault_run(base):
    cmd = [sys.executable, "-m", "tests.fault_app", str(base / "run"), *SMALL, "min-clients=2"]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    return [done.returncode, done.stdout, done.stderr]


@pytest.mark.slow
def test_raising_and_nan_clients_are_left_out_with_reasons(fault_run):
    base, result = fault_run
    assert result.returncode == 0, result.stdout + result.stderr
    private = read_csv(base / "run" / "private" / "participation.csv")[1:]
    for row, kept in zip(read_csv(base / "run" / "rounds.csv")[1:], private, strict=True):
        # under sample-level DP the error's text, which could quote data, stays private
        assert "1: error: withheld" in row["dropped"] and "disk full" not in row["dropped"]
        assert "1: error: disk full on client 1" in kept["dropped"]
        assert "2: returned non-finite (NaN or infinite) weights" in row["dropped"]
        assert float(row["accuracy"]) > 0  # NaNs never reached the global model


@pytest.mark.parametrize("dp", ["sample", "none"])
def test_too_few_clients_fails_with_reasons(tmp_path, flower_run, dp):
    """min-clients 3, the same clients in this process: round 1 stops the run, saying why.

    Under sample-level DP the line (which a sweep keeps with its results) says that
    client 1 raised, not what: an error's text can quote the client's data.
    """
    config = load_config(None, [*SMALL, "min-clients=3", "secure-noise=false", f"dp='{dp}'"])
    grid = LoopbackGrid(config.simulation_workers, train=fault_app.train, errors=(Exception,))
    with pytest.raises(FedsimError) as info:
        run_federation(grid, config, run_dir=tmp_path, on_round=print, node_per_client=False)
    line = str(info.value)
    assert "round 1: 2 of 4 clients replied, min-clients is 3" in line and "\n" not in line
    assert ("client 1: error: disk full on client 1" in line) is (dp == "none")
    assert ("client 1: error: withheld" in line) is (dp == "sample")
    assert "client 2: returned non-finite (NaN or infinite) weights" in line
