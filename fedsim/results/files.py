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
PARTICIPATION_FIELDS = ("round", "clients", "dropped")


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
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


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Atomically save a run's state (tensors and plain data) as ``checkpoint.pt``."""
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    (run_dir / PRIVATE).mkdir(exist_ok=True)
    write_atomic(run_dir / CHECKPOINT, buf.getvalue())


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The state saved by :func:`save_checkpoint`, or None where there is none."""
    import torch

    path = run_dir / CHECKPOINT
    if not path.is_file():
        return None
    return torch.load(path, weights_only=True)


def default_run_dir(out_dir: str | Path, name: str) -> Path:
    """``<out_dir>/<name>-<timestamp>``, with a suffix if that already exists."""
    base = Path(out_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate
