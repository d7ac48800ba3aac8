"""The ``fedsim`` console script: the command, with even its imports under Ctrl-C handling.

A Ctrl-C while the command is still importing exits 130 with one line, not a
traceback. The process ends with ``os._exit`` once its output is flushed: it never waits
for a thread that a stopped run left behind (a Flower server thread finishing its
round), nor for the interpreter to tear down its modules (2 s with the engine's
imported). The results folder is consistent whenever the command returns, since every
file in it is written atomically.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def main() -> None:
    """Run ``fedsim`` with ``sys.argv`` and exit with its status."""
    leave(command())


def command() -> int:
    """Run ``fedsim`` with ``sys.argv``; its exit status."""
    try:
        # imported here, not above, so that Ctrl-C during the import is caught too
        from fedsim.experiments import cli

        return cli.main()
    except KeyboardInterrupt:
        print("fedsim: interrupted", file=sys.stderr)
        return 130


def leave(code: int) -> NoReturn:
    """Exit with ``code`` now that the output is flushed.

    The exit handlers run (Ray's, logging's) as in a normal exit, unless a thread is
    still running; Python's teardown of torch's, Opacus's, Flower's and Ray's modules is
    skipped: 2 s after the command is done (0.8 s for torch alone).
    """
    if threading.active_count() == 1:
        atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
