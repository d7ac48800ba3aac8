"""The exceptions that reach users as a single line."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager


class FedsimError(Exception):
    """A problem with the user's input: a config value, a data file or a path.

    The message says what is wrong and how to fix it, on one line. The command line
    prints it without a traceback and exits with status 2.
    """

    def __init__(self, message: str) -> None:
        # a value quoted from the input (a model name, a path) may hold line breaks or
        # other control characters: shown escaped, the message stays one line
        super().__init__("".join(_printable(c) for c in str(message)))


def _printable(char: str) -> str:
    return char if char.isprintable() else repr(char)[1:-1]


def first_line(error: BaseException) -> str:
    """An error's message on one line, its type where it has none (torch's run to several)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextmanager
def blamed(what: str, fix: str) -> Iterator[None]:
    """Any error but a :class:`FedsimError` inside, as one line that names its source.

    For code of one's own that fedsim calls (a model, a dataset loader, a partition, a
    strategy): a bug there is the user's to fix, not "an internal error" of fedsim's.
    ``what`` says what failed, ``fix`` what to do.
    """
    try:
        yield
    except FedsimError:
        raise
    except Exception as error:
        raise FedsimError(f"{what} ({type(error).__name__}: {first_line(error)}); {fix}") from error


class RunInterrupted(Exception):
    """The user asked the run to stop; the last finished round is checkpointed.

    ``signum`` is the signal that asked (SIGINT 2, SIGTERM 15); the command exits with
    128 + ``signum``, as a shell does.
    """

    def __init__(self, message: str, signum: int = 2) -> None:
        super().__init__(message)
        self.signum = signum


class RunStopped(KeyboardInterrupt):
    """A run that a signal stopped, as the Python API raises it (a :class:`RunInterrupted`).

    A ``KeyboardInterrupt``: ``except Exception`` around runs in a script lets a Ctrl-C
    through, and an unhandled one ends the script as Ctrl-C does. ``signum`` as there.
    """

    def __init__(self, message: str, signum: int = 2) -> None:
        super().__init__(message)
        self.signum = signum


def file_error(path: object, exc: OSError, fix: str) -> FedsimError:
    """One line for an ``OSError`` on ``path`` that the user can fix (space, rights, paths).

    ``fix`` says what to do, e.g. "choose another --out".
    """
    why = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is used up",
        errno.EROFS: "it is on a read-only file system",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.EEXIST: "something else is already there",
        errno.ENAMETOOLONG: "the name is too long",
    }.get(exc.errno or 0, exc.strerror or type(exc).__name__)
    return FedsimError(f"cannot write {path}: {why}; {fix}")


USER_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}
)
