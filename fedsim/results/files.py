"""Result files: atomic writes, so a crash never leaves a half-written file.

A run folder has a publishable part (every file at its top) and a private part,
``private/``: what resuming needs (the checkpoint) and what would weaken a guarantee if
published (under user-level DP, which clients trained in which round). ``fedsim report``
never reads it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

SUMMARY = "summary.json"
ROUNDS = "rounds.csv"
PRIVACY = "privacy.json"
PARTITION = "partition.csv"
PLOT = "accuracy_epsilon.png"
MODEL = "model.pt"
VOCAB = "vocab.json"
PRIVATE = "private"
CHECKPOINT = f"{PRIVATE}/checkpoint.pt"
PARTICIPATION = f"{PRIVATE}/participation.csv"
PRIVATE_LEDGER = f"{PRIVATE}/ledger.json"
PRIVATE_README = f"{PRIVATE}/README.txt"
PARTICIPATION_FIELDS = ("round", "clients", "cohort", "failed", "dropped", "seconds")
_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: what the user's other files get


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place.

    The file gets the user's usual permissions (umask), except in ``private/``, which
    only its owner may read.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600 if path.parent.name == PRIVATE else 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(path: Path, rows: list[dict[str, Any]], fields: tuple[str, ...]) -> None:
    """Atomically write ``rows`` as CSV with header ``fields``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buf.getvalue())


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV file as dicts of strings."""
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def default_run_dir(out_dir: str | Path, name: str) -> Path:
    """``<out_dir>/<name>-<timestamp>``, with a suffix if that already exists."""
    base = Path(out_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def find_runs(paths: list[Path]) -> list[Path]:
    """Result folders among ``paths``: each path is a run, or a folder of runs (a sweep)."""
    runs = []
    for path in paths:
        if (path / SUMMARY).is_file():
            runs.append(path)
        elif path.is_dir():
            runs.extend(sorted(p for p in path.iterdir() if (p / SUMMARY).is_file()))
    return runs
