"""The schema of a run's files, typed: one row class for rounds.csv, one Result for a run.

The server writes rows through :meth:`RoundRow.to_csv`; everything that reads a results
folder (report, frontier, the deploy watcher, ``fedsim.load``) parses it here.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from fedsim.errors import FedsimError
from fedsim.results import files


def _number(value: str) -> float | None:
    return None if value == "" else float(value)


@dataclass(frozen=True)
class RoundRow:
    """One row of ``rounds.csv``: the global model after a round (round 0: the initial)."""

    round: int
    accuracy: float
    loss: float
    epsilon: float  # the headline unit's ε so far; ∞ after round 0 without DP
    seconds: float  # since the previous row: training, aggregation, evaluation, accounting
    cohort: int  # clients sampled this round
    failed: int  # of them, how many were left out
    clients: str  # their ids, "" where cohorts are private (user-level DP)
    dropped: str  # who was left out and why, "" where cohorts are private
    epsilon_sample: float | None
    epsilon_user: float | None
    clip_norm: float | None  # the user-level clip norm this round used

    def to_csv(self) -> dict[str, Any]:
        """The row as ``rounds.csv`` holds it; None is an empty cell."""
        return {k: "" if v is None else v for k, v in asdict(self).items()}

    @classmethod
    def from_csv(cls, row: dict[str, str]) -> RoundRow:
        """Parse one ``rounds.csv`` row (strings) into typed values."""
        return cls(
            round=int(row["round"]),
            accuracy=float(row["accuracy"]),
            loss=float(row["loss"]),
            epsilon=float(row["epsilon"]),
            seconds=float(row["seconds"]),
            cohort=int(row["cohort"]),
            failed=int(row["failed"]),
            clients=row["clients"],
            dropped=row["dropped"],
            epsilon_sample=_number(row["epsilon_sample"]),
            epsilon_user=_number(row["epsilon_user"]),
            clip_norm=_number(row["clip_norm"]),
        )


ROUND_FIELDS = tuple(f.name for f in fields(RoundRow))


@dataclass(frozen=True)
class Result:
    """A finished run, read back from its folder's publishable files."""

    path: Path
    summary: dict[str, Any]
    rounds: list[RoundRow]
    privacy: dict[str, Any]

    @property
    def accuracy(self) -> float:
        """Test accuracy of the final global model."""
        return float(self.summary["accuracy"])

    @property
    def epsilon(self) -> float:
        """The headline ε (∞ without DP); ``summary['guarantees']`` says what it covers."""
        eps = self.summary["epsilon"]
        return math.inf if eps is None else float(eps)

    @property
    def config(self) -> dict[str, Any]:
        """The resolved config the run used (with the solved σ), kebab-case keys."""
        return dict(self.summary["config"])

    @property
    def model_path(self) -> Path:
        """The final global model's ``state_dict`` (``torch.load`` it)."""
        return self.path / files.MODEL


def load_run(run_dir: str | Path) -> Result:
    """The :class:`Result` of a finished run folder; one error line if it is not one."""
    path = Path(run_dir)
    summary = _read_json(path / files.SUMMARY)
    try:
        rounds = [RoundRow.from_csv(row) for row in files.read_csv(path / files.ROUNDS)]
    except FileNotFoundError:
        raise FedsimError(f"{path / files.ROUNDS} is missing; pass a finished run") from None
    except (KeyError, ValueError) as exc:
        raise FedsimError(f"{path / files.ROUNDS} is not a fedsim rounds file ({exc})") from None
    return Result(path, summary, rounds, _read_json(path / files.PRIVACY))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedsimError(f"{path} is missing; pass a finished run") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FedsimError(f"{path} is not valid JSON ({exc}); the file is damaged") from None
    if not isinstance(data, dict):
        raise FedsimError(f"{path} holds a {type(data).__name__}, not a fedsim summary")
    return data
