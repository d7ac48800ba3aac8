"""Run folders: each written by one run at a time, replaced only when it holds a finished run.

A run writes into a hidden staging folder beside its target (``.<name>.partial``) and
renames it into place at the end. It claims that folder first: ``mkdir`` fails where it
exists, so two new runs never share one, and a lock file (``flock``, released by the
kernel however the process ends) keeps a second resume out while the first runs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fedsim import results
from fedsim.errors import FedsimError, file_error

LOCK = ".lock"
# what a finished run folder holds; --force replaces nothing else
RUN_FILES = frozenset(
    {
        results.SUMMARY,
        results.ROUNDS,
        results.PRIVACY,
        results.PARTITION,
        results.MODEL,
        results.VOCAB,
        results.PRIVATE,
        *(f"{Path(results.PLOT).stem}.{ext}" for ext in ("png", "svg")),
    }
)


def staging_dir(run_dir: Path) -> Path:
    """The hidden folder a run writes into before it is renamed to ``run_dir``."""
    return run_dir.with_name(f".{run_dir.name}.partial")


@dataclass
class Claim:
    """A staging folder this process holds the lock of, and the folder it becomes."""

    run_dir: Path
    staging: Path
    fd: int
    made: tuple[Path, ...] = ()  # folders above ``staging`` that claiming it created

    def abandon(self) -> None:
        """Remove the staging folder, and the folders claiming it made if left empty."""
        shutil.rmtree(self.staging, ignore_errors=True)
        for folder in self.made:  # deepest first
            with contextlib.suppress(OSError):  # not empty: another run writes there
                folder.rmdir()

    def release(self) -> None:
        """Give the lock up (the kernel does it too when the process ends)."""
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def finish(self) -> None:
        """Rename the staging folder to ``run_dir``; an existing one goes only once done."""
        (self.staging / results.CHECKPOINT).unlink(missing_ok=True)
        (self.staging / LOCK).unlink(missing_ok=True)
        old = self.run_dir.with_name(f".{self.run_dir.name}.old")
        if self.run_dir.exists():
            self.run_dir.rename(old)
        self.staging.rename(self.run_dir)
        shutil.rmtree(old, ignore_errors=True)
        self.release()


def claim_new(run_dir: Path, *, force: bool = False) -> Claim:
    """Claim ``run_dir``'s staging folder for a new run, or fail with one line."""
    run_dir = _absolute(run_dir)
    check_replaceable(run_dir, force=force)
    staging = staging_dir(run_dir)
    made = _make_parent(staging, "choose another --out")
    try:
        staging.mkdir(parents=True)  # parents: one a failing run just removed
    except FileExistsError:
        raise _unfinished(run_dir, staging) from None
    except OSError as exc:
        raise file_error(run_dir, exc, "choose another --out") from None
    return _lock(staging, run_dir, made)


def check_new(run_dir: Path, *, force: bool = False) -> None:
    """Refuse, in one line and leaving nothing, a ``run_dir`` that ``claim_new`` would.

    The command asks this before Ray starts (8 s); ``claim_new`` still decides, later.
    Where the staging folder could not be made (no rights, a read-only disk, a file on
    the path), a folder made and removed in the nearest existing one above says so.
    """
    run_dir = _absolute(run_dir)
    check_replaceable(run_dir, force=force)
    staging = staging_dir(run_dir)
    if staging.exists():
        raise _unfinished(run_dir, staging)
    nearest = next(folder for folder in staging.parents if folder.exists())
    try:
        Path(tempfile.mkdtemp(prefix=".fedsim-probe-", dir=nearest)).rmdir()
    except OSError as exc:
        raise file_error(run_dir, exc, "choose another --out") from None


def claim_default(out_dir: str | Path, name: str) -> Claim:
    """Claim a fresh ``<out_dir>/<name>-<time>[-N]``: runs started together never collide."""
    base = _absolute(Path(out_dir)) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 0
    while True:
        n += 1
        run_dir = base if n == 1 else base.with_name(f"{base.name}-{n}")
        staging = staging_dir(run_dir)
        if run_dir.exists() or staging.exists():
            continue
        made = _make_parent(staging, "set out-dir to a folder you can write")
        try:
            staging.mkdir(parents=True)
        except FileExistsError:
            continue  # another run took this name a moment ago
        except OSError as exc:
            raise file_error(run_dir, exc, "set out-dir to a folder you can write") from None
        return _lock(staging, run_dir, made)


def claim_resume(run_dir: Path) -> Claim:
    """Lock the staging folder of ``run_dir``'s unfinished run, to continue it."""
    run_dir = _absolute(run_dir)
    return _lock(staging_dir(run_dir), run_dir)


def check_replaceable(run_dir: Path, *, force: bool) -> None:
    """Refuse ``run_dir`` unless it is new, or ``force`` and it is a finished run or empty."""
    if not run_dir.exists() and not run_dir.is_symlink():
        return
    if not force:
        raise FedsimError(
            f"{run_dir} already exists; choose another --out (out=), or replace a finished "
            "run or an empty folder with --force (force=True)"
        )
    if run_dir.is_symlink() or not run_dir.is_dir():
        raise FedsimError(f"--force replaces only a results folder, and {run_dir} is not one")
    entries = sorted(p.name for p in run_dir.iterdir())
    others = [name for name in entries if name not in RUN_FILES]
    if entries and (others or not _is_summary(run_dir / results.SUMMARY)):
        what = f"'{others[0]}'" if others else "no fedsim summary.json"
        raise FedsimError(
            f"--force replaces only a finished fedsim run or an empty folder; {run_dir} "
            f"holds {what}: choose another --out"
        )


def lock_holder(staging: Path) -> str:
    """The pid of the process writing ``staging``, or "" where none holds its lock."""
    try:
        fd = os.open(staging / LOCK, os.O_RDONLY)
    except OSError:
        return ""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _pid_in(fd)
    finally:
        os.close(fd)
    return ""


def _lock(staging: Path, run_dir: Path, made: tuple[Path, ...] = ()) -> Claim:
    try:
        fd = os.open(staging / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:
        raise FedsimError(
            f"no unfinished run at {run_dir}; pass the folder a run printed"
        ) from None
    except OSError as exc:
        raise file_error(staging, exc, "choose another --out") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _pid_in(fd)
        os.close(fd)
        raise FedsimError(_busy(run_dir, holder)) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return Claim(run_dir, staging, fd, made)


def _make_parent(staging: Path, fix: str) -> tuple[Path, ...]:
    """Make the folders above ``staging``; the ones that did not exist, deepest first."""
    missing = [p for p in (staging.parent, *staging.parent.parents) if not p.exists()]
    try:
        staging.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file where a folder must be
        raise file_error(staging.parent, OSError(errno.ENOTDIR, "not a folder"), fix) from None
    except OSError as exc:
        raise file_error(staging.parent, exc, fix) from None
    return tuple(missing)


def _pid_in(fd: int) -> str:
    """The pid a lock file holds (written by :func:`_lock`)."""
    return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"


def _unfinished(run_dir: Path, staging: Path) -> FedsimError:
    holder = lock_holder(staging)
    if holder:
        return FedsimError(_busy(run_dir, holder))
    return FedsimError(
        f"{run_dir} has an unfinished run; continue it with --resume {run_dir} or remove {staging}"
    )


def _busy(run_dir: Path, holder: str) -> str:
    return (
        f"{run_dir} is being written by another fedsim run (pid {holder}); wait for it to "
        "finish, or choose another --out"
    )


def _is_summary(path: Path) -> bool:
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and {"config", "guarantees"} <= summary.keys()


def _absolute(path: Path) -> Path:
    """``path`` made absolute, so that ``.`` or ``..`` still has a name to stage beside."""
    absolute = Path(os.path.abspath(path.expanduser()))
    if not absolute.name:
        raise FedsimError(f"{path} cannot be a results folder; choose a folder below it")
    return absolute
