r"""Start-up of the real ``fedsim run`` command: how long until round 1 is done.

    python -m experiments.research.bench_startup --repeat 3
    python -m experiments.research.bench_startup --repeat 3 --set "name=mnist-cnn \
        model=cnn dataset=mnist data-dir='../shared/data/mnist' num-clients=10 \
        clients-per-round=10 batch-size=256 lr=0.5 client-gpus=0.1"

Each repeat runs the command in a process of its own (its imports, Ray's start and its
workers' imports all counted) for 2 rounds of the config (the digits default unless
``--set`` says otherwise), and times, from the command's start, the lines it prints as
rounds 0 and 1 end and as it prints the results. ``round 1 s`` is the command's own
figure: round 1 from the end of round 0. The table gives every repeat and the medians.
"""

from __future__ import annotations

import argparse
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments.research.bench_rounds import markdown

MARKS = {"round 0 done s": "round   0/", "round 1 done s": "round   1/", "results s": "results:"}


def one_start(overrides: list[str], out: Path) -> dict[str, float]:
    """Run ``fedsim run`` once; when each mark arrived, and round 1's own seconds."""
    command = [sys.executable, "-m", "fedsim.experiments.console", "run", "--out", str(out)]
    for pair in ["num-rounds=2", *overrides]:
        command += ["--set", pair]
    started = time.monotonic()
    row: dict[str, float] = {}
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout or []:
            for name, prefix in MARKS.items():
                if line.startswith(prefix) and name not in row:
                    row[name] = time.monotonic() - started
                    if name == "round 1 done s":
                        row["round 1 s"] = _seconds(line)
    if proc.returncode != 0 or len(row) < len(MARKS) + 1:
        raise SystemExit(f"`{shlex.join(command)}` failed (exit {proc.returncode})")
    row["total s"] = time.monotonic() - started
    return row


def _seconds(line: str) -> float:
    """A progress line's round time; NaN under private cohorts, whose lines show none."""
    found = re.search(r"  ([\d.]+) s\b", line)
    return float(found.group(1)) if found else float("nan")


def main() -> None:
    """Parse the flags, time the command ``--repeat`` times, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="how many runs")
    parser.add_argument("--set", default="", help="config keys, 'a=1 b=2' (TOML values)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            rows.append({"run": str(i + 1), **one_start(shlex.split(args.set), Path(tmp) / str(i))})
    median = {key: statistics.median(r[key] for r in rows) for key in rows[0] if key != "run"}
    print(markdown([*rows, {"run": "median", **median}]))


if __name__ == "__main__":
    main()
