"""Processes that are stopped with everything they started.

Each process starts in a session of its own and is stopped with everything it started
(SIGTERM, then SIGKILL after a grace period). Flower's SuperLink and SuperNodes start
``flower-superexec`` in yet another session, and a child outlives a killed parent, so
neither a process group nor the process tree finds them all: every child also carries
an environment tag (``FEDSIM_PROCESS_TAG``), inherited by everything it starts, and
stopping kills the tree and every process with the tag.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

STOP_GRACE_S = 5.0
TAG_VAR = "FEDSIM_PROCESS_TAG"
RUN_TAG_VAR = "FEDSIM_RUN_TAG"  # carried by every process a simulation's Ray starts
ANSI_CODE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` in the process tree, read from /proc (or ``ps``)."""
    parent_of = _parent_map()
    found, frontier = [], [pid]
    while frontier:
        kids = [child for child, parent in parent_of.items() if parent in frontier]
        found += kids
        frontier = kids
    return found


def live_pids(tries: int = 5) -> list[int]:
    """The process ids /proc lists, this one included; Linux only.

    Listing /proc while processes exit failed once with EBADF on '/proc' itself (a run's
    last cleanup, in a container); that is transient, so the listing is tried again.
    """
    for _ in range(tries - 1):
        try:
            return [int(name) for name in os.listdir("/proc") if name.isdigit()]
        except OSError:
            time.sleep(0.05)
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]  # its error stands


def _parent_map() -> dict[int, int]:
    if Path("/proc/self/stat").exists():
        parents = {}
        for pid in live_pids():
            try:
                # the command name may hold spaces and parentheses: split after the last ')'
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z":
                parents[pid] = int(fields[1])
        return parents
    out = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True)
    return {int(p): int(pp) for p, pp in (line.split() for line in out.stdout.splitlines())}


def tagged(tag: str, *, prefix: bool = False, var: str = TAG_VAR) -> list[int]:
    """Processes tagged ``var=tag`` (or a tag starting with it) at their start; Linux only.

    /proc shows the environment a process started with, so this process itself, which
    sets a tag for its children only later, is never among them.
    """
    needle = f"{var}={tag}".encode()
    found = []
    for pid in live_pids():
        try:
            entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(e == needle or (prefix and e.startswith(needle)) for e in entries):
            found.append(pid)
    return found


def kill_tagged(tag: str, *, prefix: bool = False, rounds: int = 5, var: str = TAG_VAR) -> None:
    """SIGKILL every process tagged ``tag``, again until none is left.

    Repeated because a process may start a child (a ClientApp, a SuperExec, a Ray
    worker) while its siblings are being killed; the child inherits the tag, so the
    next pass finds it, also once it is orphaned and no longer in our process tree.
    """
    for _ in range(rounds):
        left = [pid for pid in tagged(tag, prefix=prefix, var=var) if pid != os.getpid()]
        if not left:
            return
        _signal_all(left, signal.SIGKILL)
        time.sleep(0.2)


def spawn(args: list[str], log: Path, env: dict[str, str], tag: str) -> subprocess.Popen:
    """Start ``args`` in a new session, output to ``log``, tagged with ``tag``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**env, TAG_VAR: tag},
            start_new_session=True,
        )


def stop_tree(proc: subprocess.Popen, tag: str = "", grace: float = STOP_GRACE_S) -> None:
    """Stop ``proc``, its process tree and every process tagged ``tag``.

    SIGTERM first, SIGKILL for whatever is left after ``grace`` seconds; ``grace`` 0
    sends SIGKILL at once, as a crash would.
    """
    pids = [proc.pid, *descendants(proc.pid)] if proc.poll() is None else []
    pids += [pid for pid in (tagged(tag) if tag else []) if pid not in pids]
    stop_processes(pids, grace=grace, reap=proc)
    if tag:
        kill_tagged(tag)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=max(grace, 1.0))


def stop_processes(
    pids: list[int], grace: float = 2.0, reap: subprocess.Popen | None = None
) -> None:
    """SIGTERM ``pids``, then SIGKILL whichever still runs after ``grace`` seconds.

    ``grace`` 0 sends SIGKILL at once. ``reap``, a child of ours among ``pids``, is
    reaped while waiting, so that it stops counting as alive once it has exited.
    """
    if grace > 0:
        _signal_all(_alive(pids), signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _alive(pids):
            if reap is not None:
                reap.poll()
            time.sleep(0.05)
    _signal_all(_alive(pids), signal.SIGKILL)


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _alive(pids: list[int]) -> list[int]:
    living = _parent_map()
    return [pid for pid in pids if pid in living]


def tail(path: Path, lines: int = 1) -> str:
    """The last non-empty ``lines`` of a log file, or "" where there is none.

    Flower colours its log lines; the colour codes are taken out, since the line is
    printed again in fedsim's own messages and may go to a file.
    """
    try:
        text = ANSI_CODE.sub("", path.read_text(errors="replace"))
    except OSError:
        return ""
    return " | ".join([line.strip() for line in text.splitlines() if line.strip()][-lines:])
