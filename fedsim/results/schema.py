"""The schema of a run's files, typed: one row class for rounds.csv, one Result for a run.

The server writes rows through :meth:`RoundRow.to_csv`; everything that reads a results
folder (report, frontier, the deploy watcher, ``fedsim.load``) parses it here.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from fedsim.errors import FedsimError
from fedsim.results import files


def _number(row: dict[str, str], key: str) -> float:
    try:
        return float(row[key])
    except ValueError:
        raise ValueError(f"{key} is {row[key]!r}, not a number") from None


def _whole(row: dict[str, str], key: str) -> int:
    try:
        return int(row[key])
    except ValueError:
        raise ValueError(f"{key} is {row[key]!r}, not a whole number") from None


def _optional(row: dict[str, str], key: str) -> float | None:
    return None if row[key] == "" else _number(row, key)


@dataclass(frozen=True)
class RoundRow:
    """One row of ``rounds.csv``: the global model after a round (round 0: the initial)."""

    round: int
    accuracy: float
    loss: float
    epsilon: float  # the headline unit's ε so far; ∞ after round 0 without DP
    # since the previous row: training, aggregation, evaluation, accounting; None where
    # cohorts are private (a round's time shows how much data its cohort held)
    seconds: float | None
    # clients sampled this round; None where cohorts are private (given the size, one
    # client was sampled with chance size/N, not q, which the ε does not cover)
    cohort: int | None
    # of them, how many were left out; None where cohorts are private (a failure can
    # depend on a client's data: non-finite weights, an error)
    failed: int | None
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
        """Parse one ``rounds.csv`` row (strings) into typed values.

        Raises
        ------
        KeyError
            A column is missing.
        ValueError
            A value does not parse; the message names its column.

        """
        return cls(
            round=_whole(row, "round"),
            accuracy=_number(row, "accuracy"),
            loss=_number(row, "loss"),
            epsilon=_number(row, "epsilon"),
            seconds=_optional(row, "seconds"),
            cohort=None if row["cohort"] == "" else _whole(row, "cohort"),
            failed=None if row["failed"] == "" else _whole(row, "failed"),
            clients=row["clients"],
            dropped=row["dropped"],
            epsilon_sample=_optional(row, "epsilon_sample"),
            epsilon_user=_optional(row, "epsilon_user"),
            clip_norm=_optional(row, "clip_norm"),
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
    def audit(self) -> dict[str, dict[str, Any]]:
        """The one-run audit's record for each audited unit (``sample``, ``user``); {}: none.

        A record's keys: ``unit``, ``epsilon`` (the measured lower bound), ``method``,
        ``confidence``, ``delta``, ``canaries``, ``canaries_in``, ``canary_kind``,
        ``guesses``, ``correct``, ``ceiling``; the user unit's also ``estimate``.
        """
        return {unit: dict(record) for unit, record in (self.summary.get("audit") or {}).items()}

    @property
    def config(self) -> dict[str, Any]:
        """The resolved config the run used (with the solved σ), kebab-case keys."""
        return dict(self.summary["config"])

    @property
    def model_path(self) -> Path:
        """The final global model's ``state_dict`` (``torch.load`` it)."""
        return self.path / files.MODEL


def round_seconds(run_dir: str | Path) -> list[float]:
    """Each row's seconds, for the run's owner (``private/`` included).

    From ``rounds.csv``; where cohorts are private, which keeps them out of it, from
    ``private/participation.csv``.
    """
    run_dir = Path(run_dir)
    rows = files.read_csv(run_dir / files.ROUNDS)
    if all(row["seconds"] != "" for row in rows):
        return [float(row["seconds"]) for row in rows]
    return [float(row["seconds"]) for row in files.read_csv(run_dir / files.PARTICIPATION)]


def load_run(run_dir: str | Path) -> Result:
    """The :class:`Result` of a finished run folder; one error line if it is not one."""
    path = Path(run_dir)
    summary = _check_summary(path / files.SUMMARY, _read_json(path / files.SUMMARY))
    rounds = _read_rounds(path / files.ROUNDS)
    return Result(path, summary, rounds, _read_json(path / files.PRIVACY))


# what a damaged or foreign result file gets told: the run's files come only from a run
_REDO = "rerun or restore the file"
# the summary keys that reports, plots and frontiers read
_SUMMARY_KEYS = (
    "accuracy", "privacy_unit", "epsilon", "delta", "accountant", "epsilon_by_unit",
    "noise_multiplier", "max_grad_norm", "user_noise_multiplier", "max_update_norm",
    "num_rounds", "num_clients", "config",
)  # fmt: skip


def _read_rounds(path: Path) -> list[RoundRow]:
    try:
        rows = files.read_csv(path)
    except FileNotFoundError:
        raise FedsimError(f"{path} is missing; pass a finished run") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise FedsimError(f"{path} is not a CSV file ({exc}); {_REDO}") from None
    return [_round_row(path, number, row) for number, row in enumerate(rows, 1)]


def _round_row(path: Path, number: int, row: dict[str, Any]) -> RoundRow:
    """Row ``number`` (1: the first under the header) of ``rounds.csv``, or one error line."""
    missing = [key for key in ROUND_FIELDS if key not in row]
    if missing:
        raise FedsimError(f"{path} has no column {missing[0]}; it is not a rounds file: {_REDO}")
    # csv.DictReader fills a short row's last columns with None, and keys a long row's
    # extra values by None
    if None in row:
        raise FedsimError(f"{path} row {number} has more than {len(ROUND_FIELDS)} columns; {_REDO}")
    if None in row.values():
        held = sum(value is not None for value in row.values())
        raise FedsimError(
            f"{path} row {number} has {held} of the {len(ROUND_FIELDS)} columns "
            f"(truncated?); {_REDO}"
        )
    try:
        return RoundRow.from_csv(row)
    except ValueError as exc:
        raise FedsimError(f"{path} row {number}: {exc}; {_REDO}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedsimError(f"{path} is missing; pass a finished run") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FedsimError(f"{path} is not valid JSON (truncated?): {exc}; {_REDO}") from None
    if not isinstance(data, dict):
        kinds: dict[type, str] = {list: "a list", str: "a string", type(None): "null"}
        kind = kinds.get(type(data), type(data).__name__)
        raise FedsimError(f"{path} holds {kind}, not a JSON object as a run writes; {_REDO}")
    return data


def _check_summary(path: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """``summary``, if it has what the readers of a run use; one error line otherwise."""
    missing = [key for key in _SUMMARY_KEYS if key not in summary]
    if missing:
        raise FedsimError(f"{path} lacks {missing[0]}; it is not a run's summary: {_REDO}")
    accuracy = summary["accuracy"]
    if isinstance(accuracy, bool) or not isinstance(accuracy, int | float):
        raise FedsimError(f"{path}: accuracy is {accuracy!r}, not a number; {_REDO}")
    for key in ("config", "epsilon_by_unit"):
        if not isinstance(summary[key], dict):
            raise FedsimError(f"{path}: {key} is {summary[key]!r}, not a table; {_REDO}")
    audit = summary.get("audit")
    records = list(audit.values()) if isinstance(audit, dict) else [audit]
    if audit is not None and not all(
        isinstance(r, dict) and _is_number(r.get("epsilon")) for r in records
    ):
        raise FedsimError(f"{path}: audit is {audit!r}, not a record per unit; {_REDO}")
    return summary


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
