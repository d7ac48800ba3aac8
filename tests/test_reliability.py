"""Runs that never mix, hang or lie (issue 16): run folders, resume integrity, early errors.

None of these starts Ray: each failure must be found before the engine starts. The
signal tests, which need a real run, are in tests/test_signals.py.
"""

import errno
import importlib.abc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fedsim
import fedsim.experiments
from fedsim import results
from fedsim.config import parse_config, rooted
from fedsim.data import load_dataset
from fedsim.errors import FedsimError, RunInterrupted
from fedsim.experiments import api, console, procs, raystart, rundir
from fedsim.experiments import run as runner
from fedsim.experiments.raystart import check_ray_address
from fedsim.experiments.run import resume_target, run_experiment
from fedsim.results import RoundRow
from fedsim.server import privacy
from fedsim.server.state import RunState, load_checkpoint, save_checkpoint


def _row(n: int, cohort: int) -> RoundRow:
    return RoundRow(n, 0.5, 1.0, float(n), 0.1, cohort, 0, "", "", float(n), None, None)


def unfinished_run(out: Path, *, drop_charge: bool = False) -> Path:
    """A staging folder with the checkpoint of a 2-client run after round 1."""
    config = parse_config({"num-clients": 2, "clients-per-round": 2, "noise-multiplier": 1.0})
    state = RunState(config, infos=[])
    state.rows = [_row(0, 0), _row(1, 2)]
    state.participation = [
        {"round": 0, "clients": "", "dropped": ""},
        {"round": 1, "clients": "0 1", "dropped": ""},
    ]
    spent = privacy.prescribed_spend(100, noise_multiplier=1.0, batch_size=32, epochs=1)
    for client in (0,) if drop_charge else (0, 1):
        privacy.record(state.ledger, client, 1, spent)
    staging = rundir.staging_dir(out)
    staging.mkdir(parents=True)
    save_checkpoint(staging, state.to_checkpoint())
    return staging


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    first = rundir.claim_default(tmp_path, "digits-cnn")
    second = rundir.claim_default(tmp_path, "digits-cnn")
    assert first.run_dir != second.run_dir and second.run_dir.name.endswith("-2")
    assert first.staging.is_dir() and second.staging.is_dir()


def test_a_folder_being_written_is_refused_with_the_pid(tmp_path):
    held = rundir.claim_new(tmp_path / "run")
    with pytest.raises(
        FedsimError, match=rf"being written by another fedsim run \(pid {os.getpid()}"
    ):
        run_experiment(parse_config({}), out=tmp_path / "run")
    held.release()


def test_a_second_resume_is_refused_while_the_first_runs(tmp_path):
    unfinished_run(tmp_path / "run")
    held = rundir.claim_resume(tmp_path / "run")
    target, config = resume_target(tmp_path / "run")
    with pytest.raises(FedsimError, match="being written by another fedsim run"):
        run_experiment(config, out=target, resume=True)
    held.release()


def test_force_replaces_only_a_finished_run_or_an_empty_folder(tmp_path):
    thesis = tmp_path / "p" / "thesis.txt"
    thesis.parent.mkdir()
    thesis.write_text("x")
    with pytest.raises(FedsimError, match=r"holds 'thesis.txt'"):
        run_experiment(parse_config({}), out=tmp_path / "p", force=True)
    assert thesis.read_text() == "x"
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / results.SUMMARY).write_text("{}")
    with pytest.raises(FedsimError, match=r"no fedsim summary\.json"):
        rundir.check_replaceable(fake, force=True)
    (tmp_path / "empty").mkdir()
    rundir.check_replaceable(tmp_path / "empty", force=True)


def test_an_unwritable_out_is_refused_before_the_engine_and_nothing_is_left(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "ro").mkdir(mode=0o500)
    cases = {
        tmp_path / "file" / "sub" / "run": "a part of the path is a file, not a folder",
        Path("/proc/fedsim-run"): "(No such file or directory|permission denied)",
    }
    if os.geteuid() != 0:  # root writes anywhere
        cases[tmp_path / "ro" / "run"] = "permission denied"
    for out, why in cases.items():
        with pytest.raises(FedsimError, match=f"cannot write {out}: {why}; choose another"):
            rundir.check_new(out)
    rundir.check_new(tmp_path / "new" / "run")  # a folder that can be made: nothing made
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "ro"]
    assert list((tmp_path / "ro").iterdir()) == []


@pytest.mark.parametrize("where", [".", "file/sub", "/"])
def test_unusable_out_folders_get_one_line(tmp_path, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FedsimError, match=r"already exists|not a folder|cannot be a results"):
        run_experiment(parse_config({}), out=Path(where))


def test_a_read_only_out_folder_gets_one_line(tmp_path, monkeypatch):
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(FedsimError, match="read-only file system; choose another --out"):
        run_experiment(parse_config({}), out=tmp_path / "ro" / "run")


def test_a_full_disk_keeps_the_checkpoint_and_says_how_to_resume(tmp_path, monkeypatch):
    def full(config, dataset, staging, *args):
        save_checkpoint(staging, {"x": torch.zeros(1)})
        raise OSError(errno.ENOSPC, "No space left on device", str(staging / "rounds.csv"))

    monkeypatch.setattr(runner, "_simulate", full)
    with pytest.raises(FedsimError, match="the disk is full; fix that, then: fedsim run --resume"):
        run_experiment(parse_config({}), out=tmp_path / "run")
    assert (tmp_path / ".run.partial" / results.CHECKPOINT).is_file()


@pytest.mark.parametrize(
    "failure",
    [RunInterrupted("stopped by SIGTERM", signal.SIGTERM),
     OSError(errno.ENOSPC, "No space left on device")],
)  # fmt: skip
def test_a_stop_before_the_first_checkpoint_says_run_it_again_and_leaves_nothing(
    tmp_path, monkeypatch, failure
):
    """Nothing was saved: a resume command would only be refused."""

    def stopped(*args):
        raise failure

    monkeypatch.setattr(runner, "_simulate", stopped)
    with pytest.raises((RunInterrupted, FedsimError)) as caught:
        run_experiment(parse_config({}), out=tmp_path / "run")
    assert "run it again" in str(caught.value) and "--resume" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_a_run_that_fails_after_a_checkpoint_says_where_its_rounds_are(tmp_path, monkeypatch):
    def fails(config, dataset, staging, *args):
        save_checkpoint(staging, {"x": torch.zeros(1)})
        raise FedsimError("round 2: the strategy's aggregate_train returned no model")

    monkeypatch.setattr(runner, "_simulate", fails)
    with pytest.raises(FedsimError, match=r"returned no model \(the rounds before it are kept"):
        run_experiment(parse_config({}), out=tmp_path / "run")
    assert (tmp_path / ".run.partial" / results.CHECKPOINT).is_file()


def test_an_emptied_ledger_is_never_resumed_into_a_lower_epsilon(tmp_path):
    unfinished_run(tmp_path / "run", drop_charge=True)
    with pytest.raises(FedsimError, match="ledger lacks client 1 in round 1"):
        resume_target(tmp_path / "run")


@pytest.mark.parametrize("damage", ["flip", "truncate", "random", "no-ledger"])
def test_a_damaged_checkpoint_is_refused_with_one_line(tmp_path, damage):
    staging = unfinished_run(tmp_path / "run")
    path = staging / results.CHECKPOINT
    data = path.read_bytes()
    if damage == "flip":
        path.write_bytes(data[:-10] + bytes([data[-10] ^ 1]) + data[-9:])
    elif damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "random":
        path.write_bytes(os.urandom(4096))
    else:
        state = load_checkpoint(staging)
        del state["ledger"]
        save_checkpoint(staging, state)
    with pytest.raises(FedsimError, match="cannot be trusted") as err:
        resume_target(tmp_path / "run")
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value)


def test_an_unreachable_ray_address_fails_within_seconds():
    started = time.monotonic()
    with pytest.raises(FedsimError, match="nothing answers there"):
        check_ray_address(f"127.0.0.1:{procs.free_port()}")
    assert time.monotonic() - started < raystart.RAY_CONNECT_TIMEOUT_S + 1


class _Interrupting(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "fedsim.experiments.cli":
            raise KeyboardInterrupt
        return None


def test_ctrl_c_while_the_command_imports_exits_130_with_one_line(monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "fedsim.experiments.cli", raising=False)
    monkeypatch.delattr(fedsim.experiments, "cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_Interrupting(), *sys.meta_path])
    assert console.command() == 130
    assert capsys.readouterr().err == "fedsim: interrupted\n"


def test_the_command_exits_with_its_status_after_the_exit_handlers(tmp_path):
    ran = tmp_path / "ran"
    script = (
        "import atexit, pathlib, sys\n"
        "from fedsim.experiments import console\n"
        f"atexit.register(pathlib.Path({str(ran)!r}).write_text, 'handlers ran')\n"
        "print('flushed', end=''); print('too', end='', file=sys.stderr)\n"
        "console.leave(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert (done.returncode, done.stdout, done.stderr) == (3, "flushed", "too")
    assert ran.read_text() == "handlers ran"


def test_log_lines_quoted_in_messages_carry_no_colour_codes(tmp_path):
    log = tmp_path / "supernode.log"
    log.write_text("\x1b[92mINFO \x1b[0m:      Starting\n\x1b[91mERROR \x1b[0m: gone\n")
    assert procs.tail(log) == "ERROR : gone"


def test_a_transient_error_listing_proc_is_retried(monkeypatch):
    """EBADF on '/proc' once failed a finished run in its last cleanup (exit 1)."""
    env = {**os.environ, "FEDSIM_TEST_TAG": "transient"}
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], env=env)
    listdir, failures = os.listdir, []

    def flaky(path, fail=2):
        if path == "/proc" and len(failures) < fail:
            failures.append(path)
            raise OSError(errno.EBADF, "Bad file descriptor", "/proc")
        return listdir(path)

    monkeypatch.setattr(procs.os, "listdir", flaky)
    try:
        assert child.pid in procs.descendants(os.getpid())
        assert procs.tagged("transient", var="FEDSIM_TEST_TAG") == [child.pid]
        assert len(failures) == 2
        # an error that persists is raised, not taken for an empty process table
        monkeypatch.setattr(procs.os, "listdir", lambda path: flaky(path, fail=100))
        with pytest.raises(OSError):
            procs.live_pids()
    finally:
        child.kill()
        child.wait()


def test_a_run_that_fails_before_a_checkpoint_leaves_no_folder_it_made(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise FedsimError("the engine failed")

    monkeypatch.setattr(runner, "_simulate", fail)
    config = parse_config({"out-dir": str(tmp_path / "results" / "mine")})
    with pytest.raises(FedsimError, match="the engine failed"):
        run_experiment(config)
    assert list(tmp_path.iterdir()) == []  # results/ and results/mine made, then removed
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "keep.txt").write_text("a user's")
    with pytest.raises(FedsimError):
        run_experiment(config)
    assert [p.name for p in (tmp_path / "results").iterdir()] == ["keep.txt"]


def test_resuming_a_run_that_left_no_checkpoint_says_so(tmp_path):
    (tmp_path / ".run.partial").mkdir()
    with pytest.raises(FedsimError, match=r"\.run\.partial holds no checkpoint, so nothing"):
        resume_target(tmp_path / "run")
    with pytest.raises(FedsimError, match="no unfinished run to resume at"):
        resume_target(tmp_path / "other")


def test_a_run_records_its_data_dir_absolute(tmp_path, monkeypatch):
    """A resume from another folder must read the run's own files, not whatever a
    relative data-dir names there, and the record must say which files they were."""
    monkeypatch.chdir(tmp_path)
    assert rooted(parse_config({"data-dir": "mydata"})).data_dir == str(tmp_path / "mydata")
    assert rooted(parse_config({"data-dir": "hf:owner/name"})).data_dir == "hf:owner/name"
    assert rooted(parse_config({})).data_dir == ""
    seen = []
    monkeypatch.setattr(api, "run_experiment", lambda cfg, **kw: seen.append(cfg) or tmp_path)
    monkeypatch.setattr(api, "load_run", lambda folder: folder)
    (tmp_path / "mydata").mkdir()
    fedsim.run(data_dir="mydata")
    assert seen[0].data_dir == str(tmp_path / "mydata")
    with pytest.raises(FedsimError, match=r"data-dir nothere \(from .*\) is not a folder"):
        load_dataset("digits", "nothere")


@pytest.mark.parametrize("dp", ["sample", "user"])
def test_a_target_no_noise_reaches_is_refused_before_any_folder_or_engine(tmp_path, dp):
    values = {"dp": dp, "target-epsilon": 1e-4, "user-target-epsilon": 1e-4}
    with pytest.raises(FedsimError, match="needs a noise multiplier above 10000"):
        run_experiment(parse_config(values), out=tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


def test_a_finished_run_that_cannot_be_renamed_keeps_its_results(tmp_path, monkeypatch):
    """The checkpoint goes before the rename: a failed rename must not read as a run
    that failed before its first checkpoint, whose folder is removed."""

    def finished(config, dataset, staging, *args):
        save_checkpoint(staging, {"x": torch.zeros(1)})
        (staging / results.ROUNDS).write_text("round\n0\n")

    monkeypatch.setattr(runner, "_simulate", finished)
    (tmp_path / "run").mkdir()  # an earlier run, to be replaced with --force ...
    (tmp_path / "run" / results.SUMMARY).write_text('{"config": {}, "guarantees": []}')
    (tmp_path / ".run.old").mkdir()  # ... past a leftover that blocks the swap
    (tmp_path / ".run.old" / "x").write_text("x")
    with pytest.raises(FedsimError, match=r"the finished run is whole in .*\.run\.partial"):
        run_experiment(parse_config({}), out=tmp_path / "run", force=True)
    assert (tmp_path / ".run.partial" / results.ROUNDS).read_text() == "round\n0\n"
