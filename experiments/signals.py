"""Signals during a simulation, and the processes it starts.

SIGINT and SIGTERM: the first stops a run after abandoning its round, a second aborts
at once. Every process the run's Ray starts carries a tag in its environment, so that
all of them can be found and stopped afterwards, also ones orphaned when their parent
died first.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fedsim.experiments.procs import (
    RUN_TAG_VAR,
    descendants,
    kill_tagged,
    stop_processes,
    tagged,
)

CLIENT_GRACE_S = 2.0  # after a first signal, for clients that finish on their own
# a second signal this soon after the first is the same one delivered twice (`timeout`
# signals the process and then its group; a sweep passes on the terminal's Ctrl-C)
SAME_SIGNAL_S = 0.25
# what the `fedsim` command gives a stop before it aborts one that hangs (Flower or Ray
# waiting on something that will not come): less than a scheduler waits before its
# SIGKILL (Slurm and Kubernetes: 30 s)
STOP_WITHIN_S = 20.0


class Signals:
    """SIGINT and SIGTERM during a run: the first stops it, a second aborts at once.

    The first sets ``stop``: the server abandons the round in progress (a simulation
    releases nothing of it) and ends with the last checkpointed round, and Flower shuts
    Ray down. The second kills every process the run started and ends this process with
    status 128 + the signal, as ``kill -9`` would: the checkpoint, written atomically,
    still resumes. With ``stop_within``, a stop still under way that many seconds after
    the first signal is aborted the same way, every thread's stack kept in a file for a
    bug report; without, it is waited for (a script's or notebook's own process is not
    ended unasked).

    Signals are counted by a thread reading Python's wakeup fd, not in a handler: Ray
    defers Python's SIGINT handler while it works in the main thread, and a second
    Ctrl-C could be folded into the first. Only the main thread can set this up;
    elsewhere it does nothing.
    """

    def __init__(
        self,
        stop: threading.Event,
        say: Callable[[str], None],
        *,
        spare: set[int],
        tag: str,
        stop_within: float | None = None,
    ) -> None:
        self.stop, self.say, self.spare, self.tag = stop, say, spare, tag
        self.stop_within = stop_within
        self.signum, self.first = 0, 0.0
        self.previous: dict[int, Any] = {}
        self.fds: tuple[int, int] | None = None
        self.old_wakeup = -1
        self.done = threading.Event()  # the run has returned: no client is left to end

    def heard(self, signum: int) -> None:
        """One SIGINT or SIGTERM arrived."""
        name = signal.Signals(signum).name
        if self.signum and time.monotonic() - self.first < SAME_SIGNAL_S:
            return
        if self.signum:
            self._abort(signum, f"fedsim: {name} again: aborting")
        self.signum, self.first = signum, time.monotonic()
        self.stop.set()
        self.say(f"fedsim: {name}: stopping now (again to abort)")
        # Flower's worker threads wait on the clients' Ray tasks and cannot be told to
        # stop: once the server has let the round go, client processes are ended, also
        # ones that start later (Flower hands out messages already queued)
        threading.Thread(target=self._end_clients, daemon=True).start()

    def _end_clients(self) -> None:
        within = float("inf") if self.stop_within is None else self.stop_within
        deadline = time.monotonic() + within
        if self.done.wait(CLIENT_GRACE_S):
            return
        while not self.done.wait(0.5):
            if time.monotonic() > deadline and not self.done.is_set():  # not returned since
                self._abort(
                    self.signum,
                    f"fedsim: the run did not stop within {self.stop_within:.0f} s: aborting "
                    f"(its threads' stacks, for a bug report: {_dump_stacks()})",
                )
            kill_clients(self.tag)

    def _abort(self, signum: int, why: str) -> None:
        """End the run and this process at once, with status 128 + ``signum``."""
        self.say(f"{why}; the last checkpoint still resumes")
        kill_run_processes(self.spare, self.tag, grace=0)
        sys.stdout.flush()
        os._exit(128 + signum)

    def _listen(self, read_fd: int) -> None:
        while data := os.read(read_fd, 64):  # one byte per signal; b"" once closed
            for signum in data:
                if signum in (signal.SIGINT, signal.SIGTERM):
                    self.heard(signum)
        os.close(read_fd)

    def stopped_where(self) -> str:
        """What the run did when it stopped."""
        name = signal.Signals(self.signum or signal.SIGINT).name
        return f"stopped by {name}; the last finished round is checkpointed"

    def __enter__(self) -> Signals:
        if threading.current_thread() is not threading.main_thread():
            return self
        self.fds = os.pipe()
        os.set_blocking(self.fds[1], False)
        self.old_wakeup = signal.set_wakeup_fd(self.fds[1], warn_on_full_buffer=False)
        for signum in (signal.SIGINT, signal.SIGTERM):
            # a Python handler must be in place for the wakeup fd to hear the signal
            self.previous[signum] = signal.signal(signum, _counted_elsewhere)
        threading.Thread(target=self._listen, args=(self.fds[0],), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        if self.fds is None:
            return
        signal.set_wakeup_fd(self.old_wakeup)
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        os.close(self.fds[1])  # the listening thread ends


def _dump_stacks() -> str:
    """Write every thread's stack to a new file; return its path."""
    try:
        with tempfile.NamedTemporaryFile(
            "w", prefix="fedsim-stop-", suffix=".txt", delete=False
        ) as file:
            faulthandler.dump_traceback(file, all_threads=True)
    except OSError as error:
        return f"not written: {error}"
    return file.name


def _counted_elsewhere(signum: int, frame: object) -> None:
    """The Python-level handler: :class:`Signals` counts the signal from the wakeup fd."""


def kill_clients(tag: str) -> None:
    """SIGKILL the run's Ray workers (Flower's ClientApp actors, idle ones), not Ray itself.

    A worker is told by its command line, not only by the title Ray gives it while it
    runs a client: in one stop that hung, Ray's logs had both actors running their
    clients, yet no process of the run carried a ClientApp title, and Flower waited on
    them until the stop was aborted. A worker whose title is not set is still
    ``default_worker.py``; idle ones go too, as the run is ending.
    """
    for pid in tagged(tag, var=RUN_TAG_VAR):
        with contextlib.suppress(OSError):
            if is_ray_worker(Path(f"/proc/{pid}/cmdline").read_bytes()):
                os.kill(pid, signal.SIGKILL)


def is_ray_worker(cmdline: bytes) -> bool:
    """Whether a process's ``/proc/PID/cmdline`` is a Ray worker's, not Ray's own agents'.

    Parameters
    ----------
    cmdline
        The file's bytes: arguments ended by NUL, or the title Ray wrote over them.

    Returns
    -------
    bool
        True for a worker, titled (``ray::IDLE``, ``ray::ClientAppActor.run``) or not
        (``python [-s] .../default_worker.py``); False for the raylet, which names that
        script in an option, and for every other process.

    """
    args = cmdline.decode(errors="replace").split("\0")
    if args[0].startswith("ray::"):
        return "Agent" not in args[0].split()[0]  # ray::DashboardAgent, RuntimeEnvAgent
    script = next((arg for arg in args[1:] if not arg.startswith("-")), "")
    return script.endswith("/ray/_private/workers/default_worker.py")


def kill_run_processes(spare: set[int], tag: str, grace: float = 2.0) -> None:
    """Stop every process the run started: below this one and not in ``spare``, or tagged.

    The tag (``RUN_TAG_VAR``) finds the ones orphaned when their parent (Ray's raylet)
    died first.
    """
    stop_processes([p for p in descendants(os.getpid()) if p not in spare], grace=grace)
    kill_tagged(tag, var=RUN_TAG_VAR)


@contextlib.contextmanager
def run_environment(name: str, value: str) -> Iterator[None]:
    """``name=value`` in the environment that processes started meanwhile inherit."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous
