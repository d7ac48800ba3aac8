"""The command line: bad input gets one line, exit status 2, and no results folder."""

import subprocess
import sys
from pathlib import Path

import pytest

from fedsim.config import parse_config
from fedsim.errors import FedsimError
from fedsim.experiments import cli, machine
from fedsim.experiments.machine import check_machine, cpu_build_of_torch
from tests.conftest import ROOT, cli_runs, once_per_session


def fedsim(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "fedsim.experiments.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


BAD_RUNS = [
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
    (["missing.toml"], "config file missing.toml does not exist"),  # CONFIG, as --config
    (["a.toml", "--config", "b.toml"], "2 configs given (a.toml, b.toml); give one"),
    (["--config", "a.toml", "--config", "b.toml"], "2 configs given (a.toml, b.toml)"),
    (["--set", "client-gpus=1"], "no CUDA GPU is visible"),
    (["--out", "/proc/x"], "cannot write /proc/x: "),  # the folder typed, not its staging
    (["--config", "/"], "config file / is a folder; pass a .toml file"),
    (["--resume", "x", "--force"], "drop --config/--set/--out/--force"),
    (["--set", "delta=0.01"], "delta 0.01 is not below 1/n"),
]


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Every BAD_RUNS case in one process (the engine's imports paid once), each in its
    own empty folder, and a run whose --out already holds results."""
    base, results = once_per_session(tmp_path_factory, "bad-runs", _bad_runs)
    return [*(base / f"bad{i}" for i in range(len(BAD_RUNS))), base / "done"], results


def _bad_runs(base):
    folders = [base / f"bad{i}" for i in range(len(BAD_RUNS))]
    done = base / "done"
    for folder in (*folders, done / "out"):
        folder.mkdir(parents=True)
    (done / "out" / "summary.json").write_text("{}")
    cases = [(["run", *args], cwd) for (args, _), cwd in zip(BAD_RUNS, folders, strict=True)]
    cases.append((["run", "--out", str(done / "out")], done))
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    return cli_runs(cases, env)


@pytest.mark.parametrize(("index", "needle"), [(i, n) for i, (_, n) in enumerate(BAD_RUNS)])
def test_bad_input_one_line_no_traceback(bad_runs, index, needle):
    folders, results = bad_runs
    code, stdout, stderr = results[index]
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert needle in lines[0]
    assert "Traceback" not in stderr + stdout
    assert not (folders[index] / "results").exists()


def test_bad_input_as_its_own_process(tmp_path):
    # the cases above share one process; this one is the real command, exit status and all
    result = fedsim("run", "--set", "data-dir=/no/such/folder", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "fedsim: error: data-dir /no/such/folder is not a folder; "
        "set data-dir to an existing folder (--set data-dir=DIR; data_dir= in Python)"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "command",
    [
        ["run", "--set", "data-dir=/no/such/folder"],
        ["run", "--set", "num-clients=5000"],
        ["run", "--set", "dataset=mnist"],
        ["run", "--set", "client-cpus=4096"],
        ["run", "--out", "."],  # the folder it runs in: it exists
        ["deploy", "--out", "."],
        ["deploy", "--set", "num-rnds=3"],
        ["deploy", "--num-nodes", "2", "--set", "num-clients=3"],
        ["deploy", "--set", "secure-noise=false"],
        ["deploy", "--set", "data-dir=/no/such/folder"],
        ["deploy", "--node-data-dir", "/no/such/folder"],
        ["deploy", "--set", "client-cpus=4096"],
    ],
)
def test_bad_input_fails_before_ray_starts_or_the_engine_imports(tmp_path, command):
    code = (
        "import sys; from fedsim.experiments.cli import main; "
        f"code = main({command!r}); "
        "print(code, sorted({'torch', 'flwr', 'opacus', 'ray'} & set(sys.modules)))"
    )
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert out.stdout.splitlines()[-1] == "2 []", out.stdout + out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.skipif(not cpu_build_of_torch(), reason="a CUDA build of torch is asked later")
def test_gpus_asked_of_a_cpu_build_of_torch_fail_before_ray_starts(tmp_path):
    code = (
        "import sys; from fedsim.experiments.cli import main; "
        "code = main(['run', '--set', 'client-gpus=0.5']); "
        "print(code, sorted({'torch', 'ray'} & set(sys.modules)))"
    )
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert out.stdout.splitlines()[-1] == "2 []", out.stdout + out.stderr
    assert out.stderr.strip() == (
        "fedsim: error: client-gpus=0.5 but no CUDA GPU is visible (torch is a CPU build: "
        "install a CUDA build for a GPU); set client-gpus=0"
    )


def test_the_machine_check_trusts_torch_where_torch_has_answered(monkeypatch):
    gpus = parse_config({"client-gpus": 1})
    check_machine(gpus, cuda_available=lambda: True)  # torch says yes: yes, whatever its build
    with pytest.raises(FedsimError, match="no CUDA GPU is visible"):
        check_machine(gpus, cuda_available=lambda: False)
    check_machine(parse_config({}), cuda_available=lambda: 1 / 0)  # no GPUs asked: not asked
    monkeypatch.setattr(machine.importlib.metadata, "version", lambda name: "2.11.0+cu130")
    monkeypatch.setattr(machine, "why_no_cuda", lambda: None)  # a CUDA build, a GPU device
    check_machine(gpus)  # asked again once torch is imported
    monkeypatch.undo()
    monkeypatch.setattr(machine.importlib.metadata, "version", lambda name: "2.13.0+cpu")
    with pytest.raises(FedsimError, match="no CUDA GPU is visible"):
        check_machine(gpus)
    check_machine(parse_config({"client-gpus": 1, "ray-address": "auto"}))  # the cluster's


@pytest.mark.parametrize(
    ("version", "platform", "devices", "visible", "why"),
    [
        ("2.13.0+cpu", "linux", ["nvidia0"], None, "torch is a CPU build"),
        ("2.11.0", "linux", [], None, "no NVIDIA GPU device"),  # PyPI's CUDA build
        ("2.11.0+cu130", "linux", ["nvidiactl"], None, "no NVIDIA GPU device"),
        ("2.11.0+cu130", "linux", ["nvidia0", "nvidiactl"], None, None),
        ("2.11.0+cu130", "linux", ["dxg"], None, None),  # WSL 2
        ("2.11.0+cu130", "linux", ["nvidia0"], "", "hides every GPU"),
        ("2.11.0+cu130", "linux", ["nvidia0"], "-1", "hides every GPU"),
        ("2.11.0+cu130", "linux", ["nvidia0"], "1,0", None),
        ("2.11.0+rocm6.4", "linux", ["kfd"], None, None),  # ROCm: asked once torch is in
        ("2.11.0", "darwin", [], None, "macOS has no CUDA"),
        ("2.11.0+cu130", "win32", [], None, None),  # no device files to read: ask torch
    ],
)
def test_a_certainly_absent_gpu_is_known_without_torch(
    monkeypatch, tmp_path, version, platform, devices, visible, why
):
    for name in devices:
        (tmp_path / name).touch()
    monkeypatch.setattr(machine.importlib.metadata, "version", lambda name: version)
    monkeypatch.setattr(machine.sys, "platform", platform)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    found = machine.why_no_cuda(tmp_path)
    assert found is None if why is None else why in found


def test_existing_results_never_overwritten(bad_runs):
    folders, results = bad_runs
    code, _, stderr = results[-1]
    assert code == 2 and "already exists" in stderr
    assert (folders[-1] / "out" / "summary.json").read_text() == "{}"


def test_report_rejects_non_results(tmp_path):
    result = fedsim("report", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "no summary.json" in result.stderr


def test_usage_error_exit_code(tmp_path):
    assert fedsim("fly", cwd=tmp_path).returncode == 2


def test_help_and_config_errors_need_neither_torch_nor_flower(tmp_path):
    code = (
        "import sys, contextlib, io\n"
        "from fedsim.experiments.cli import main\n"
        "quiet = contextlib.redirect_stdout(io.StringIO())\n"
        "with quiet, contextlib.redirect_stderr(io.StringIO()):\n"
        "    codes = [main(['run', '--set', 'model=nope']), main(['keys'])]\n"
        f"    codes.append(main(['report', '{tmp_path}']))  # no results there\n"
        "    for args in (['--help'], ['run', '--help']):\n"
        "        with contextlib.suppress(SystemExit):\n"
        "            main(args)\n"
        "print(codes, sorted({'torch', 'flwr', 'opacus', 'ray'} & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "[2, 0, 2] []", out.stdout + out.stderr


def test_debug_is_taken_after_the_command_too(capsys):
    from fedsim.experiments.cli import main

    # an error says "rerun with --debug", which users add at the end
    for argv in (
        ["--debug", "run", "--set", "model=nope"],
        ["run", "--set", "model=nope", "--debug"],
    ):
        assert main(argv) == 2
        assert "Traceback" in capsys.readouterr().err


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


def test_a_shipped_config_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("mnist-cnn", "mnist-cnn.toml"):
        found = cli.shipped(Path(name))
        assert found == cli.SHIPPED / "mnist-cnn.toml" and found.is_file()
    (tmp_path / "mnist-cnn.toml").write_text("num-rounds = 1\n")  # a file here comes first
    assert cli.shipped(Path("mnist-cnn.toml")) == Path("mnist-cnn.toml")
    with pytest.raises(FedsimError, match=r"no shipped config has that name; .* digits-cnn"):
        cli.shipped(Path("nosuch"))
