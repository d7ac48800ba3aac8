"""The exceptions that reach users as a single line."""


class FedsimError(Exception):
    """A problem with the user's input: a config value, a data file or a path.

    The message says what is wrong and how to fix it, on one line. The command line
    prints it without a traceback and exits with status 2.
    """


class RunInterrupted(Exception):
    """The user asked the run to stop; the last finished round is checkpointed."""
