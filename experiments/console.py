"""The ``fedsim`` console script: the command, with even its imports under Ctrl-C handling.

A Ctrl-C while the command is still importing exits 130 with one line, not a
traceback. The process never waits for a thread that a stopped run left behind (a
Flower server thread finishing its round): the results folder is consistent whenever
the command returns, since every file in it is written atomically.
"""

from __future__ import annotations

import os
import sys
import threading


def main() -> None:
    """Run ``fedsim`` with ``sys.argv`` and exit with its status."""
    try:
        # imported here, not above, so that Ctrl-C during the import is caught too
        from fedsim.experiments import cli

        code = cli.main()
    except KeyboardInterrupt:
        print("fedsim: interrupted", file=sys.stderr)
        code = 130
    sys.stdout.flush()
    sys.stderr.flush()
    if threading.active_count() > 1:
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
