"""Real Flower + Ray simulations through the `fedsim` command."""

import json
import os
import re
import signal
import subprocess
import time

import dp_accounting
import opacus
import pytest
import torch
from dp_accounting import rdp

from fedsim.dp.accounting import RDP_ORDERS
from fedsim.results import read_csv
from tests.conftest import once_per_session, session_processes, start_fedsim

pytestmark = pytest.mark.slow
SMALL = [
    "num-clients=3",
    "clients-per-round=2",
    "num-rounds=3",
    "batch-size=64",
    "target-epsilon=4",
    "client-dropout=0.3",
    "client-cpus=2",  # one Ray worker hosts the clients: 12 s less CPU a run on 2 cores
]


def start_run(out, *sets):
    args = [a for s in (*SMALL, *sets) for a in ("--set", s)]
    return start_fedsim("run", "--out", str(out), *args, cwd=out.parent)


def finish(proc):
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout + stderr
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def fedsim_run(out, *sets):
    return finish(start_run(out, *sets))


def start_resume(out):
    return start_fedsim("run", "--resume", str(out), cwd=out.parent)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    base, stdout = once_per_session(tmp_path_factory, "sim", _small_run)
    return base, subprocess.CompletedProcess([], 0, stdout, "")


def _small_run(base):
    return fedsim_run(base / "a").stdout


def test_results_complete_and_no_partial_left(small_run):
    base, first = small_run
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
    assert summary["training"] == {"per_sample": "fast", "device": "cpu"}
    assert summary["noise"]["kind"] == "seeded" and "seed (0" in summary["noise"]["meaning"]
    software = summary["software"]
    assert software["torch"] == torch.__version__ and software["opacus"] == opacus.__version__
    assert software["flwr"].startswith("1.42.") and software["fedsim"] and software["dp-accounting"]
    rounds = read_csv(out / "rounds.csv")
    assert [int(r["round"]) for r in rounds] == [0, 1, 2, 3]
    assert [len(r["clients"].split()) for r in rounds[1:]] == [2, 2, 2]
    partition = read_csv(out / "partition.csv")
    assert sum(int(r["num_examples"]) for r in partition) == 1437
    # one progress line per round, and none of Ray's or Flower's log lines
    progress = [line for line in first.stdout.splitlines() if re.match(r"round +\d+/\d+ ", line)]
    assert len(progress) == 4
    assert "INFO" not in first.stdout


def test_summary_epsilon_equals_independent_composition(small_run):
    base, _ = small_run
    summary = json.loads((base / "a" / "summary.json").read_text())
    ledger = json.loads((base / "a" / "privacy.json").read_text())
    assert ledger["accountant"] == summary["accountant"] == "rdp"
    epsilons = []
    for entries in ledger["units"]["sample"]["clients"].values():
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
    for client, entries in ledger["units"]["sample"]["clients"].items():
        trained = [int(r["round"]) for r in rounds if client in r["clients"].split()]
        assert [e["round"] for e in entries] == trained


def test_dropout_finishes_and_records_dropped_clients(small_run):
    out = small_run[0] / "a"
    rounds = read_csv(out / "rounds.csv")[1:]
    dropped = {int(r["round"]): r["dropped"] for r in rounds if r["dropped"]}
    assert dropped, "with seed 0, 30% dropout drops someone in these rounds"
    assert all("dropped out (simulated, client-dropout=0.3)" in d for d in dropped.values())
    ledger = json.loads((out / "privacy.json").read_text())["units"]["sample"]["clients"]
    # a dropped client trained before dropping: its spend is in the ledger all the same
    for r, text in dropped.items():
        for client in re.findall(r"(\d+): dropped out", text):
            assert r in [e["round"] for e in ledger[client]]


def run_until(args, round_no, signals, cwd, *, group=True):
    """Start ``fedsim ARGS``; once ``round_no`` is printed, send ``signals`` half a second
    apart to its process group (as a terminal's Ctrl-C does) or, not ``group``, to the
    command alone (as ``kill PID`` or a batch scheduler does). The process, the seconds
    it took to end after the first signal, and what was left of its session."""
    proc = start_fedsim(*args, cwd=cwd, new_session=True)
    sent = time.monotonic()
    try:
        for line in proc.stdout:
            if line.startswith(f"round {round_no:>3}/"):
                sent = time.monotonic()
                for sig in signals:  # apart: at once, a second would be the first again
                    (os.killpg if group else os.kill)(proc.pid, sig)
                    time.sleep(0.5)
                break
        proc.wait(timeout=120)
    finally:
        seconds = time.monotonic() - sent
        leftovers = session_processes(proc.pid, grace=30)  # Ray's exit
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
    return proc, seconds, leftovers


def without_seconds(path):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_csv(path)]


@pytest.fixture(scope="module")
def reference(small_run):
    return without_seconds(small_run[0] / "a" / "rounds.csv")


PUBLISHABLE = ("summary.json", "rounds.csv", "privacy.json", "partition.csv")


def test_user_level_run_publishes_no_cohort(tmp_path):
    out = tmp_path / "user"
    user = ["dp='user'", "num-clients=20", "clients-per-round=5", "secure-noise=true"]
    fedsim_run(out, *user, "client-dropout=0", "audit-canaries=200")
    private = read_csv(out / "private" / "participation.csv")[1:]
    cohorts = [r["clients"] for r in private]
    assert [int(r["cohort"]) for r in private] == [len(c.split()) for c in cohorts]
    rounds = read_csv(out / "rounds.csv")
    assert all(r[k] == "" for r in rounds for k in ("clients", "dropped", "seconds", "cohort"))
    assert all(float(r["seconds"]) >= 0 for r in read_csv(out / "private" / "participation.csv"))
    for name in PUBLISHABLE:
        text = (out / name).read_text()
        for ids in (c.split() for c in cohorts if len(c.split()) > 1):  # no cohort appears
            assert " ".join(ids) not in text and json.dumps([int(i) for i in ids]) not in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["client_with_max_epsilon"] is None
    assert summary["noise"]["kind"] == "secure"
    # the canary clients audit the user unit; they are in no cohort count
    audit = summary["audit"]["user"]
    assert 0 <= audit["epsilon"] <= summary["epsilon"] and audit["canaries"] == 200
    assert audit["estimate"] is not None and audit["correct"] <= audit["guesses"]
    units = json.loads((out / "privacy.json").read_text())["units"]
    assert all("clients" not in unit for unit in units.values())


def test_stopped_and_aborted_runs_resume_to_the_uninterrupted_result(tmp_path, reference):
    """SIGTERM to the command after round 1, as a batch scheduler sends it; the resumed run
    gets Ctrl-C twice at a terminal as round 3 trains, and aborts: as a crash, nothing is
    tidied. Resumed again, the run ends with the rounds of the uninterrupted one,
    accuracies and all: the same seed, the same run."""
    out = tmp_path / "run"
    args = ["run", "--out", str(out), *(a for s in SMALL for a in ("--set", s))]
    stopped, seconds, leftovers = run_until(args, 1, [signal.SIGTERM], tmp_path, group=False)
    stderr = stopped.stderr.read()
    assert stopped.returncode == 143, stderr
    # Ray's C++ core runs by now: had it taken the SIGTERM, it would dump its stack, exit 134
    assert stderr.startswith("fedsim: stopped by SIGTERM") and "SIGTERM received" not in stderr
    assert f"continue with: fedsim run --resume {out}" in stderr
    assert seconds < 15, f"took {seconds:.1f} s to stop"
    assert leftovers == [], "Ray or worker processes outlived the run"
    assert not out.exists()
    twice = [signal.SIGINT, signal.SIGINT]  # Ctrl-C twice
    aborted, seconds, leftovers = run_until(["run", "--resume", str(out)], 2, twice, tmp_path)
    stdout, stderr = aborted.stdout.read(), aborted.stderr.read()
    assert aborted.returncode == 130, stderr
    assert "fedsim: SIGINT: stopping now" in stdout and "Traceback" not in stdout + stderr
    assert seconds < 15, f"took {seconds:.1f} s to stop"
    assert leftovers == [], "Ray or worker processes outlived the run"
    assert (tmp_path / ".run.partial" / "private" / "checkpoint.pt").exists()
    assert not out.exists()
    finish(start_resume(out))
    assert without_seconds(out / "rounds.csv") == reference
    assert not (tmp_path / ".run.partial").exists()
    assert not (out / "private" / "checkpoint.pt").exists()


def test_natural_partition_text_run_records_users_and_vocab(tmp_path, shared_data):
    """DP on Shakespeare by role: one client per speaker, the vocabulary saved."""
    out = tmp_path / "roles"
    fedsim_run(
        out,
        "model='transformer'",
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
    clients = ledger["units"]["sample"]["clients"]
    assert sum(len(v) for v in clients.values()) == 2  # 2 clients in the one round
