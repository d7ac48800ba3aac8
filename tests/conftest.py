import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FEDSIM_SHARED_DATA", ROOT.parent / "shared" / "data"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Real simulations first, each module's tests still in their order.

    pytest-xdist's worksteal hands each worker a contiguous share of this list and lets
    an idle worker take the end of another's queue. The minutes-long runs (the longest,
    a deployment that waits a minute on Flower's heartbeat) then start early, while the
    other worker has short tests to run beside them, not last with nothing beside them.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable


@pytest.fixture(autouse=True)
def torch_seeded() -> None:
    """Every test starts from the same global torch generator, whatever its worker ran
    before: under xdist's worksteal that differs from run to run, and a test whose
    random inputs came from it failed once that way (test_clip_check's ghost case)."""
    torch.manual_seed(0)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (set FEDSIM_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture
def flower_run():
    """A Flower run's identity, as a ServerApp's process has one: messages need it."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def once_per_session(
    tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], Any]
) -> tuple[Path, Any]:
    """(folder, result) of ``make(folder)``, made once per test session.

    pytest-xdist may split a module between its workers, and each would run the module's
    fixtures again: a minute or more for a fixture that runs simulations. Here the first
    worker to ask makes it; the others wait for it and read the same folder and result
    (JSON). A ``make`` that fails is tried again by the next worker that asks.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's, shared by its workers
    folder, made = root / name, root / f"{name}.made.json"
    with (root / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not made.is_file():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed make left
            folder.mkdir()
            made.write_text(json.dumps(make(folder)))
    return folder, json.loads(made.read_text())


def start_fedsim(*args: str, cwd: Path, new_session: bool = False) -> subprocess.Popen:
    """``fedsim ARGS`` from this checkout as a process of its own, its output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "fedsim.experiments.cli", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=new_session,
    )


def session_processes(sid: int, grace: float) -> list[int]:
    """Live processes of session ``sid`` (a run started with ``new_session``), after up to
    ``grace`` s for ones being ended to go.

    Zombies are dead: a container's init may never reap the ones orphaned here.
    """
    deadline = time.monotonic() + grace
    while True:
        ps = subprocess.run(["ps", "-eo", "pid=,sid=,stat="], capture_output=True, text=True)
        rows = (line.split() for line in ps.stdout.splitlines())
        alive = [int(p) for p, s, stat in rows if int(s) == sid and not stat.startswith("Z")]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


# Runs `fedsim ARGS` for many (args, folder) cases in one Python process, each with its
# own stdout and stderr: the engine's imports (torch, Flower, Ray: about 10 s on 2 cores)
# are paid once, not once per bad-input case. Each case is still the command's own main().
_MANY_CLI_RUNS = """
import contextlib, io, json, os, sys
from fedsim.experiments.cli import main
results = []
for args, cwd in json.load(sys.stdin):
    os.chdir(cwd)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as exc:
            code = exc.code
    results.append([code, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def cli_runs(cases: list[tuple[list[str], Path]], env: dict[str, str]) -> list[tuple]:
    """(exit status, stdout, stderr) of ``fedsim *args`` run in ``cwd``, for every case."""
    payload = json.dumps([[list(args), str(cwd)] for args, cwd in cases])
    proc = subprocess.run(
        [sys.executable, "-c", _MANY_CLI_RUNS],
        input=payload,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    return [tuple(r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]
