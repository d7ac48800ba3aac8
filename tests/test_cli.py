"""The command line: bad input gets one line, exit status 2, and no results folder."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT


def fedsim(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "fedsim.experiments.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "model=resnet"], "unknown model 'resnet'"),
        (["--set", "target-epsilon=0"], "target-epsilon"),
        (["--set", "dirichlet-alpha=0", "--set", "partition=dirichlet"], "dirichlet-alpha"),
        (
            ["--set", "num-clients=5000", "--set", "clients-per-round=2"],
            "exceeds the 1437 training samples",
        ),
        (["--set", "data-dir=/no/such/folder"], "data-dir /no/such/folder is not a folder"),
        (["--set", "dataset=mnist"], "needs data-dir"),
        (["--set", "num-rnds=3"], "did you mean 'num-rounds'"),
        (["--config", "missing.toml"], "does not exist"),
        (["--set", "client-gpus=1"], "no CUDA GPU is visible"),
    ],
)
def test_bad_input_one_line_no_traceback(tmp_path, args, needle):
    result = fedsim("run", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "results").exists()


def test_existing_results_never_overwritten(tmp_path):
    out = tmp_path / "done"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    result = fedsim("run", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 2 and "already exists" in result.stderr
    assert (out / "summary.json").read_text() == "{}"


def test_report_rejects_non_results(tmp_path):
    result = fedsim("report", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "no summary.json" in result.stderr


def test_usage_error_exit_code(tmp_path):
    assert fedsim("fly", cwd=tmp_path).returncode == 2
