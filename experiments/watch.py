"""Following a submitted run: progress lines, the processes' health, how it ended."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from fedsim import results
from fedsim.config import FedsimConfig
from fedsim.errors import FedsimError
from fedsim.experiments.localfed import LocalFederation
from fedsim.experiments.procs import tail
from fedsim.experiments.progress import for_terminal
from fedsim.results import RoundRow

POLL_S = 0.5
WAITING_NOTE_S = 15.0


def follow_run(
    fed: LocalFederation,
    run: subprocess.Popen,
    config: FedsimConfig,
    staging: Path,
    *,
    timeout: float = 0.0,
    verbose: bool = False,
) -> str:
    """Print rounds as the ServerApp writes them into ``staging``; check how the run ended.

    ``run`` is the ``flwr run --stream`` process; it exits when the run ends. A SuperNode
    that exits before round 0, the SuperLink exiting, a run that does not complete or
    one that outlives ``timeout`` seconds (0: no limit) raise :class:`FedsimError`.

    Returns
    -------
    str
        The run id.

    """
    watch = RunWatch(fed, config, staging, time.monotonic() + timeout if timeout else None)
    try:
        while run.poll() is None:
            watch.check(verbose)
            time.sleep(POLL_S)
        watch.check(verbose)
    finally:
        watch.progress.close()
    log = fed.work / "flwr-run.log"
    found = re.search(r"started run (\d+)", log.read_text(errors="replace"))
    if found is None:
        raise FedsimError(f"flwr run could not submit the run: {tail(log)}; logs in {fed.work}")
    status, details = fed.run_status(found.group(1))
    if status != "finished:completed" or not list(staging.glob(f"*/{results.SUMMARY}")):
        reason = server_error(log) or details
        raise FedsimError(f"the run ended as {status}: {reason}; logs in {fed.work}")
    return found.group(1)


class RunWatch:
    """Progress lines from ``rounds.csv``, and a close eye on every process."""

    def __init__(self, fed: LocalFederation, config: FedsimConfig, staging: Path, deadline):
        self.fed, self.config, self.staging, self.deadline = fed, config, staging, deadline
        self.printed, self.echoed = 0, 0
        self.gone: set[str] = set()
        self.progress = for_terminal(config)
        self.since = self.said = time.monotonic()
        self.said_private = False  # the one note under private cohorts was printed

    def check(self, verbose: bool) -> None:
        """Print new rounds (and, if ``verbose``, new log lines); raise on a fatal exit."""
        rows = self._rows()
        for row in rows[self.printed :]:
            self.progress.round(row)
            self.since = time.monotonic()
        self.printed = len(rows)
        self._say_what_it_waits_for()
        if verbose:
            self._echo()
        link = self.fed.procs["superlink"]
        if link.poll() is not None:
            raise FedsimError(
                f"the SuperLink exited (code {link.returncode}): "
                f"{tail(self.fed.work / 'superlink.log')}; logs in {self.fed.work}"
            )
        self._check_nodes(started=bool(rows))
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise FedsimError(f"the run did not finish within --timeout; logs in {self.fed.work}")

    def _say_what_it_waits_for(self) -> None:
        """Every 15 s without a new round, one line on what the run is waiting for.

        Under private cohorts (user-level DP) one line after round 0 and then none: a
        log's notes between two round lines would measure the round.
        """
        now = time.monotonic()
        if now - self.said < WAITING_NOTE_S:
            return
        self.said = now
        waited = f"{now - self.since:.0f} s"
        if not self.printed:
            self.progress.note(
                f"fedsim: waiting {waited} for round 0: the ServerApp starts, finds its "
                f"{self.config.num_clients} SuperNodes and evaluates the initial model"
            )
        elif not self.config.dp_user:
            self.progress.note(
                f"fedsim: waiting {waited} for round {self.printed} of "
                f"{self.config.num_rounds}: each SuperNode starts a ClientApp and trains"
            )
        elif not self.said_private:  # notes counted between rounds would time each one
            self.said_private = True
            self.progress.note(
                "fedsim: rounds are training; under user-level DP nothing is printed between "
                "rounds (a round's time tells of its cohort)"
            )

    def _check_nodes(self, started: bool) -> None:
        for name, proc in self.fed.procs.items():
            if not name.startswith("supernode-") or name in self.gone or proc.poll() is None:
                continue
            self.gone.add(name)
            why = f"{name} exited (code {proc.returncode}): {tail(self.fed.work / f'{name}.log')}"
            if not started:
                raise FedsimError(f"{why}; logs in {self.fed.work}")
            if not self.config.dp_user:  # a failure, and when, tells of secret cohorts
                print(f"fedsim: {why}; rounds go on without it", flush=True)

    def _rows(self) -> list[RoundRow]:
        csvs = list(self.staging.glob(f"*/{results.ROUNDS}"))
        if not csvs:
            return []
        return [RoundRow.from_csv(row) for row in results.read_csv(csvs[0])]

    def _echo(self) -> None:
        text = (self.fed.work / "flwr-run.log").read_text(errors="replace")
        print(text[self.echoed :], end="", flush=True)
        self.echoed = len(text)


def server_error(log: Path) -> str:
    """The ServerApp's own error message from the run's log stream, if it raised one."""
    text = log.read_text(errors="replace")
    errors = re.findall(r"(?:FedsimError|Error|Exception): (.+)", text)
    return errors[-1].strip() if errors else ""
