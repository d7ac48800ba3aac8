"""Runs that survive: dropouts, failing clients, kill and resume, Ctrl-C."""

import os
import subprocess
import sys

import pytest

from fedsim.results import read_csv
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
SMALL = ["num-clients=4", "clients-per-round=4", "num-rounds=2", "batch-size=64"]


def sets(*items):
    return [a for s in items for a in ("--set", s)]


def cli(*args, cwd):
    cmd = [sys.executable, "-m", "fedsim.experiments.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def test_raising_and_nan_clients_are_left_out_with_reasons(tmp_path):
    cmd = [sys.executable, "-m", "tests.fault_app", str(tmp_path / "run"), *SMALL, "min-clients=2"]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    for row in read_csv(tmp_path / "run" / "rounds.csv")[1:]:
        assert "1: disk full on client 1" in row["dropped"]
        assert "2: returned non-finite (NaN or infinite) weights" in row["dropped"]
        assert float(row["accuracy"]) > 0  # NaNs never reached the global model


def test_too_few_clients_fails_with_reasons(tmp_path):
    cmd = [sys.executable, "-m", "tests.fault_app", str(tmp_path / "run"), *SMALL, "min-clients=3"]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "2 of 4 clients replied, min-clients is 3" in result.stderr
    assert not (tmp_path / "run").exists()
