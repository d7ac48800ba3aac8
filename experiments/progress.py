"""Progress for a person waiting: a live bar on a terminal, one plain line per round otherwise.

The server reports each finished round (a ``RoundRow``) and, inside a round, each client
that has replied; these classes turn that into what the terminal shows.
"""

from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fedsim.config import FedsimConfig
from fedsim.results import RoundRow, report


class RunProgress(Protocol):
    """What a run reports while it goes."""

    def round(self, row: RoundRow) -> None:
        """A round finished (round 0: the initial model was evaluated)."""

    def reply(self, server_round: int, done: int, cohort: int) -> None:
        """Inside a round: ``done`` of the ``cohort`` sampled clients have replied."""

    def note(self, text: str) -> None:
        """A line about what the run is doing or waiting for."""

    def close(self) -> None:
        """The run ended; leave the terminal clean."""


def round_line(row: RoundRow, num_rounds: int) -> str:
    """One round as a line: accuracy, loss, ε, seconds, and who dropped out.

    Under private cohorts (user-level DP) the row has no seconds, cohort size or failures,
    and the line neither: logs get published, a round's time shows how much data its
    cohort held, its size how likely one client was in it, and a failure can come from a
    client's data.
    """
    dropped = f"  dropped {row.dropped}" if row.dropped else ""
    eps = report.format_epsilon(row.epsilon)
    seconds = "" if row.seconds is None else f"  {row.seconds:6.2f} s"
    return (
        f"round {row.round:>3}/{num_rounds}  accuracy {row.accuracy:.4f}  "
        f"loss {row.loss:.4f}  ε {eps:>6}{seconds}{dropped}"
    )


class PlainProgress:
    """One line per round, for logs and pipes."""

    def __init__(self, config: FedsimConfig, stream: TextIO | None = None) -> None:
        self.num_rounds = config.num_rounds
        self.stream = stream or sys.stdout

    def round(self, row: RoundRow) -> None:
        """Print the round's line."""
        print(round_line(row, self.num_rounds), file=self.stream, flush=True)

    def reply(self, server_round: int, done: int, cohort: int) -> None:
        """Nothing between rounds: a log keeps one line per round."""

    def note(self, text: str) -> None:
        """Print the line."""
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """Nothing to clean up."""


class LiveProgress:
    """Round lines above a live bar: rounds done, accuracy, ε, elapsed, ETA, and clients."""

    def __init__(self, config: FedsimConfig, console: Console | None = None) -> None:
        self.num_rounds = config.num_rounds
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console or Console(),
            transient=True,
        )
        self.rounds: TaskID = self.bar.add_task("rounds", total=config.num_rounds, status="")
        self.clients: TaskID = self.bar.add_task("clients", total=None, status="", visible=False)
        self.secret = config.dp_user  # a cohort's size stays private, as in rounds.csv
        self.bar.start()

    def round(self, row: RoundRow) -> None:
        """Print the round's line and move the bar."""
        self.bar.console.print(round_line(row, self.num_rounds), highlight=False)
        status = f"accuracy {row.accuracy:.4f}  ε {report.format_epsilon(row.epsilon)}"
        self.bar.update(self.rounds, completed=row.round, status=status)
        self.bar.update(self.clients, visible=False)

    def reply(self, server_round: int, done: int, cohort: int) -> None:
        """Show how many of this round's clients have replied (not under private cohorts)."""
        if self.secret:
            return
        self.bar.update(
            self.clients,
            total=cohort,
            completed=done,
            visible=True,
            status=f"round {server_round}",
        )

    def note(self, text: str) -> None:
        """Print the line above the bar."""
        self.bar.console.print(text, highlight=False)

    def close(self) -> None:
        """Remove the bar; the round lines stay."""
        self.bar.stop()


def for_terminal(config: FedsimConfig) -> RunProgress:
    """A live bar where standard output is a terminal, plain lines elsewhere."""
    return LiveProgress(config) if sys.stdout.isatty() else PlainProgress(config)


class SweepProgress:
    """Points done out of the total, with the time so far and an estimate of what is left.

    ``clock`` False: no times (a point's run time tells of its secret cohorts).
    """

    def __init__(self, total: int, *, clock: bool = True) -> None:
        self.total, self.done, self.started = total, 0, time.monotonic()
        self.clock = clock

    def point(self, name: str, ok: bool, last: str) -> str:
        """The line for one finished point."""
        self.done += 1
        elapsed = time.monotonic() - self.started
        left = elapsed / self.done * (self.total - self.done)
        clock = f" ({_minutes(elapsed)} so far, about {_minutes(left)} left)" if self.clock else ""
        return f"  [{self.done}/{self.total}] {'ok  ' if ok else 'FAIL'} {name}: {last}{clock}"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
