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


def test_help_and_config_errors_need_neither_torch_nor_flower():
    code = (
        "import sys, contextlib, io\n"
        "from fedsim.experiments.cli import main\n"
        "quiet = contextlib.redirect_stdout(io.StringIO())\n"
        "with quiet, contextlib.redirect_stderr(io.StringIO()):\n"
        "    codes = [main(['run', '--set', 'model=nope']), main(['keys'])]\n"
        "    for args in (['--help'], ['run', '--help']):\n"
        "        with contextlib.suppress(SystemExit):\n"
        "            main(args)\n"
        "print(codes, sorted({'torch', 'flwr', 'opacus', 'ray'} & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "[2, 0] []", out.stdout + out.stderr


def test_keys_lists_every_key_with_default_and_meaning(tmp_path):
    from fedsim.config import FedsimConfig

    lines = fedsim("keys", cwd=tmp_path).stdout.splitlines()
    keys = {line.split()[0]: line for line in lines}
    assert set(keys) == {f.alias for f in FedsimConfig.model_fields.values()}
    assert keys["num-rounds"].split()[1] == "30" and "rounds" in keys["num-rounds"]
    readme = (ROOT / "README.md").read_text()
    assert all(f"`{key}`" in readme for key in keys), "every key is in the README's table"


def test_one_set_holds_several_pairs():
    from fedsim.config import load_config

    config = load_config(None, ["num-rounds=3 data-dir='/my data' name=\"x1\"", "lr=0.1"])
    assert (config.num_rounds, config.data_dir, config.name, config.lr) == (
        3,
        "/my data",
        "x1",
        0.1,
    )
