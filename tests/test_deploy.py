"""Flower's deployment engine with real processes on loopback, and a Ray cluster.

Every process a test starts carries an environment tag under that test's tmp_path; each
test checks, also when it fails (fixture finalizers), that no tagged process is left.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedsim.experiments.certs import make_certificates, make_supernode_keys
from fedsim.experiments.deploy import app_sources
from fedsim.experiments.localfed import CONNECTION, LocalFederation, flower_bin
from fedsim.experiments.procs import TAG_VAR, free_port, spawn, stop_tree, tagged
from fedsim.results import read_csv
from tests.conftest import ROOT, cli_runs, once_per_session
from tests.test_api import readme_example
from tests.test_data import fake_mnist

pytestmark = pytest.mark.slow
RESULT_FILES = ("summary.json", "rounds.csv", "privacy.json", "partition.csv", "model.pt")


def leftovers(prefix) -> list[int]:
    """Live processes tagged with a tag under ``prefix``."""
    return tagged(str(prefix), prefix=True)


def assert_all_stopped(prefix, within=15.0):
    deadline = time.monotonic() + within
    while leftovers(prefix) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = {pid: _cmdline(pid) for pid in leftovers(prefix)}
    assert not left, f"processes left running: {left}"


def _cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return "?"


def fedsim(*args, tmp_path, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "fedsim.experiments.cli", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=deploy_env(tmp_path),
    )


def check_results(out, num_rounds):
    for name in RESULT_FILES:
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy_unit"] == "sample" and summary["accountant"] == "rdp"
    assert 0 < summary["epsilon"] <= summary["config"]["target-epsilon"]
    rounds = read_csv(out / "rounds.csv")
    assert [int(r["round"]) for r in rounds] == list(range(num_rounds + 1))
    return summary, rounds


def deploy_env(tmp_path):
    """The venv's bin NOT on PATH (fedsim deploy must cope), temporary files in tmp_path."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path)}


def kill_supernode(tmp_path, name):
    """SIGKILL a SuperNode of a running ``fedsim deploy`` and all it started: a crash."""
    needle = f"/{name}".encode()
    killed = 0
    for pid in leftovers(tmp_path):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if any(e.startswith(TAG_VAR.encode()) and e.endswith(needle) for e in environ):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        except (OSError, ProcessLookupError):
            continue
    assert killed, f"no process of {name} found"


def test_deploy_tls_auth_node_data_own_parts_and_a_supernode_killed_mid_run(tmp_path):
    """One deployment, as a user's across machines: TLS, SuperNode auth, each node's own
    data folder, the README's own model from the folder it runs in, FedProx, and one
    SuperNode crashing while round 1 trains."""
    sizes = {"server": 40, "a": 120, "b": 80}
    for name, n in sizes.items():
        (tmp_path / name).mkdir()
        fake_mnist(tmp_path / name, n=n)
    (tmp_path / "nets.py").write_text(readme_example()[0])
    # round-timeout well above a round's time on a loaded machine: the SuperLink itself
    # reports the dead node after two missed heartbeats (Flower's interval is 30 s)
    args = ["deploy", "--tls", "--auth", "--node-data-dir", "a", "--node-data-dir", "b"]
    args += ["--out", "out", "--timeout", "500", "--set", "dataset=mnist data-dir=server"]
    args += ["--set", "num-rounds=2", "--set", "round-timeout=120", "--set", "min-clients=1"]
    args += ["--set", "model='nets:MLP' strategy='fedprox' proximal-mu=0.01"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedsim.experiments.cli", *args],
        cwd=tmp_path,
        env=deploy_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    try:
        while not (line := proc.stdout.readline()).startswith("round   0/2"):
            assert line, "".join(lines) + proc.stderr.read()
            lines.append(line)
        kill_supernode(tmp_path, "supernode-1")  # while round 1 trains
        out, err = proc.communicate(timeout=500)
    finally:
        stop_tree(proc)
    stdout = "".join(lines) + line + out
    assert proc.returncode == 0, stdout + err
    assert re.search(r"SuperLink at 127\.0\.0\.1:\d+ \(TLS, SuperNode auth\), 2 SuperNodes", stdout)
    assert "supernode-1 exited (code -9)" in stdout and "rounds go on without it" in stdout
    summary, rounds = check_results(tmp_path / "out", 2)
    assert summary["num_clients"] == 2
    assert (summary["config"]["model"], summary["config"]["strategy"]) == ("nets:MLP", "fedprox")
    # each node trained on all of its own data, not on a partition of the server's
    partition = read_csv(tmp_path / "out" / "partition.csv")
    assert [int(r["num_examples"]) for r in partition] == [sizes["a"], sizes["b"]]
    assert [r["clients"] for r in rounds[1:]] == ["0 1", "0 1"]
    # reported by the SuperLink after two missed heartbeats, before round-timeout
    assert all(r["dropped"].startswith("1: Error: Node Unavailable") for r in rounds[1:]), rounds
    # the dead client is charged its full prescribed spend for every round it was sent
    ledger = json.loads((tmp_path / "out" / "privacy.json").read_text())
    clients = ledger["units"]["sample"]["clients"]
    assert [e["round"] for e in clients["1"]] == [1, 2]
    assert [e["round"] for e in clients["0"]] == [1, 2]
    # deployed clients draw secure noise and keep their label counts to themselves
    assert summary["noise"]["kind"] == "secure" and summary["engine"] == "deployment"
    assert summary["training"] == {"per_sample": "fast", "device": None}  # each node's own
    assert {r["labels"] for r in partition} == {"unknown"}
    # every process stopped, the work folder removed, no partial results left
    assert not (tmp_path / "out" / "private" / "checkpoint.pt").exists()
    assert_all_stopped(tmp_path)
    assert not list(tmp_path.glob("fedsim-deploy-*")) and not list(tmp_path.glob(".*.partial"))


def _ctrl_c_reaches_it():
    # a shell's background job (`pytest ... &`) inherits SIGINT ignored, and so would the
    # deploy started here: a Ctrl-C test must give it the terminal's default
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("after", [0.0, 12.0])  # as the run is submitted; while it starts
def test_deploy_interrupted_stops_everything(tmp_path, after):
    args = [
        sys.executable,
        "-m",
        "fedsim.experiments.cli",
        "deploy",
        "--num-nodes",
        "2",
        "--out",
        "out",
    ]
    proc = subprocess.Popen(
        args,
        cwd=tmp_path,
        env=deploy_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ctrl_c_reaches_it,
    )
    try:
        first = proc.stdout.readline()
        assert "SuperLink at" in first, first + proc.stderr.read()
        time.sleep(after)
        assert leftovers(tmp_path)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
        assert "interrupted" in proc.stderr.read()
    finally:
        stop_tree(proc)
    assert_all_stopped(tmp_path)
    assert not list(tmp_path.glob("fedsim-deploy-*")) and not list(tmp_path.glob("*out*"))


BAD_DEPLOYS = [
    (["--auth", "--no-tls"], "--auth needs --tls"),
    (["--num-nodes", "2", "--set", "num-clients=3"], "disagrees with num-clients"),
    (["--node-data-dir", "x", "--num-nodes", "2"], "1 --node-data-dir for 2 SuperNodes"),
    (["--set", "ray-address=nowhere"], "ray-address"),
    (["--set", "secure-noise=false"], "secure-noise = false is refused"),
]


@pytest.fixture(scope="module")
def bad_deploys(tmp_path_factory):
    """Every BAD_DEPLOYS case in one process, each in its own empty folder; their
    temporary files (none should be left) go to one more."""
    base, results = once_per_session(tmp_path_factory, "bad-deploys", _bad_deploys)
    return [*(base / f"bad{i}" for i in range(len(BAD_DEPLOYS))), base / "tmp"], results


def _bad_deploys(base):
    folders = [base / f"bad{i}" for i in range(len(BAD_DEPLOYS))]
    for folder in (*folders, base / "tmp"):
        folder.mkdir()
    cases = [(["deploy", *args], cwd) for (args, _), cwd in zip(BAD_DEPLOYS, folders, strict=True)]
    return cli_runs(cases, deploy_env(base / "tmp"))


@pytest.mark.parametrize(("index", "needle"), [(i, n) for i, (_, n) in enumerate(BAD_DEPLOYS)])
def test_deploy_bad_input_one_line(bad_deploys, index, needle):
    folders, results = bad_deploys
    code, stdout, stderr = results[index]
    assert code == 2, stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], stderr
    assert not list(folders[index].iterdir()) and not list(folders[-1].iterdir())


def test_the_submitted_app_holds_every_package_source_and_nothing_else(tmp_path):
    """`fedsim deploy` submits a copy: the packages' modules and configs, no .venv or docs."""
    app = app_sources(tmp_path / "app")
    copied = {p.relative_to(app).as_posix() for p in app.rglob("*") if p.is_file()}
    folders = ("fedsim", "clients", "server", "experiments")
    sources = {
        p.relative_to(ROOT).as_posix()
        for folder in folders
        for p in (ROOT / folder).rglob("*")
        if p.suffix in (".py", ".toml") and "__pycache__" not in p.parts
    }
    assert copied == sources | {"pyproject.toml"}
    assert (app / "pyproject.toml").read_text() == (ROOT / "pyproject.toml").read_text()


def test_missing_flower_tools_named(tmp_path, monkeypatch):
    from fedsim.errors import FedsimError

    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with pytest.raises(FedsimError, match=r"flower-superlink, .*flwr not found in"):
        flower_bin()


@pytest.fixture
def secure_link(tmp_path):
    """A SuperLink with TLS and SuperNode authentication, and three key pairs."""
    certs = make_certificates(tmp_path / "certs")
    keys = make_supernode_keys(tmp_path / "keys", 3)
    work = tmp_path / "work"
    work.mkdir()
    try:
        with LocalFederation(work, certs=certs, auth=True) as fed:
            fed.start_superlink()
            yield fed, keys
    finally:
        assert_all_stopped(tmp_path)


def node_status(fed):
    out = fed.flwr("supernode", "ls", CONNECTION, "--format", "json").stdout
    return [n["status"] for n in json.loads(out[out.index("{") :])["nodes"]]


def test_unregistered_supernode_is_refused(secure_link):
    fed, keys = secure_link
    fed.register(keys[0][1])
    fed.start_supernode("registered", {"partition-id": 0}, keys[0][0])
    stranger = fed.start_supernode("stranger", {"partition-id": 1}, keys[1][0])
    assert stranger.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in (fed.work / "stranger.log").read_text()
    assert fed.procs["registered"].poll() is None
    deadline = time.monotonic() + 60
    while node_status(fed) != ["online"] and time.monotonic() < deadline:
        time.sleep(1)
    assert node_status(fed) == ["online"]


def test_tls_superlink_rejects_plaintext(secure_link, tmp_path):
    fed, _ = secure_link
    config = fed.work / "home-cli" / "config.toml"
    config.write_text(re.sub(r"root-certificates = .*", "insecure = true", config.read_text()))
    with pytest.raises(Exception, match="flwr supernode failed"):
        fed.flwr("supernode", "ls", CONNECTION, timeout=60)


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head of this test's own (``ray start --head --block``), stopped afterwards."""
    # Ray's socket paths must stay short: its temp folder goes directly under /tmp
    temp = Path(tempfile.mkdtemp(prefix="fedsim-ray-", dir="/tmp"))
    port = free_port()
    args = [str(flower_bin() / "ray"), "start", "--head", "--block", "--port", str(port)]
    args += ["--node-ip-address", "127.0.0.1", "--temp-dir", str(temp), "--num-cpus", "2"]
    args += ["--include-dashboard=false", "--disable-usage-stats"]
    args += ["--ray-client-server-port", str(free_port())]
    args += ["--dashboard-agent-listen-port", str(free_port())]
    head = spawn(args, tmp_path / "ray.log", dict(os.environ), f"{tmp_path}/ray")
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in (tmp_path / "ray.log").read_text():
            assert head.poll() is None, (tmp_path / "ray.log").read_text()
            assert time.monotonic() < deadline, "the Ray head did not start in 120 s"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", temp
    finally:
        stop_tree(head, f"{tmp_path}/ray")
        assert_all_stopped(tmp_path)
        shutil.rmtree(temp, ignore_errors=True)


def test_simulation_on_existing_ray_cluster(ray_head, tmp_path):
    address, temp = ray_head
    drivers = list(temp.glob("session_latest/logs/python-core-driver-*"))
    result = fedsim(
        "run", "--out", "out", "--set", "num-clients=2", "--set", "clients-per-round=2",
        "--set", "num-rounds=1", "--set", f"ray-address='{address}'",
        "--set", "client-cpus=2",  # one worker for both clients: 13 s less CPU on 2 cores
        tmp_path=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    check_results(tmp_path / "out", 1)
    # the run's driver and its client workers ran in this cluster, not in a Ray of its own
    assert len(list(temp.glob("session_latest/logs/python-core-driver-*"))) == len(drivers) + 1
    assert list(temp.glob("session_latest/logs/worker-*-01000000-*.out"))
