"""Results: the files a run writes, written atomically, and what is rebuilt from them.

The public face of the package: file names and writers (``files``), tables and plots of
a run (``report``) and the accuracy-against-ε frontier of many (``frontier``). Report
code reads result files only.
"""

from fedsim.results.files import (
    CHECKPOINT,
    MODEL,
    PARTICIPATION,
    PARTICIPATION_FIELDS,
    PARTITION,
    PLOT,
    PRIVACY,
    PRIVATE,
    PRIVATE_LEDGER,
    PRIVATE_README,
    ROUNDS,
    SUMMARY,
    VOCAB,
    default_run_dir,
    find_runs,
    read_csv,
    write_atomic,
    write_csv,
    write_json,
)
from fedsim.results.schema import ROUND_FIELDS, Result, RoundRow, load_run, round_seconds

__all__ = [
    "CHECKPOINT",
    "MODEL",
    "PARTICIPATION",
    "PARTICIPATION_FIELDS",
    "PARTITION",
    "PLOT",
    "PRIVACY",
    "PRIVATE",
    "PRIVATE_LEDGER",
    "PRIVATE_README",
    "ROUNDS",
    "ROUND_FIELDS",
    "SUMMARY",
    "VOCAB",
    "Result",
    "RoundRow",
    "default_run_dir",
    "find_runs",
    "load_run",
    "read_csv",
    "round_seconds",
    "write_atomic",
    "write_csv",
    "write_json",
]
