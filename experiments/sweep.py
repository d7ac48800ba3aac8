"""``fedsim sweep``: a grid of runs over seeds, in parallel, then the frontier.

Each point runs as its own ``fedsim run`` process in ``<out>/<point>``; a point that
already finished is skipped and an unfinished one resumed, so the same command continues
an interrupted sweep. ``none`` as an ε value means the same run without DP.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fedsim import results
from fedsim.config import load_config, parse_override
from fedsim.errors import FedsimError
from fedsim.results import frontier

EPSILON_KEYS = {"target-epsilon", "user-target-epsilon"}


def grid_points(grid: list[str], seeds: list[int]) -> dict[str, list[str]]:
    """``{point name: --set overrides}`` for every grid combination and seed."""
    axes = []
    for item in grid:
        key, raw = parse_override(item)
        values = [v.strip() for v in str(raw).split(",") if v.strip()]
        if not values:
            raise FedsimError(f"--grid {item}: no values; write KEY=v1,v2,...")
        axes.append((key, values))
    points = {}
    for combo in itertools.product(*(values for _, values in axes)):
        for seed in seeds:
            sets, name = [], []
            for key, value in zip((k for k, _ in axes), combo, strict=True):
                if key in EPSILON_KEYS and value == "none":
                    sets.append("dp=none")
                    name.append("nodp")
                else:
                    sets.append(f"{key}={value}")
                    name.append(f"{key}={value}")
            points["_".join([*name, f"seed={seed}"])] = [*sets, f"seed={seed}"]
    return points


def run_point(out: Path, config: Path | None, sets: list[str]) -> tuple[bool, str]:
    """Run (or resume) one point as a ``fedsim run`` process; (ok, last output line)."""
    if (out / results.SUMMARY).is_file():
        return True, "done earlier"
    if out.with_name(f".{out.name}.partial").exists():
        args = ["--resume", str(out)]
    else:
        args = ["--out", str(out), *(["--config", str(config)] if config else [])]
        args += [a for s in sets for a in ("--set", s)]
    log = out.parent / "logs" / f"{out.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        code = subprocess.call(
            [sys.executable, "-m", "fedsim.experiments.cli", "run", *args], stdout=fh, stderr=fh
        )
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    summary = [line for line in lines if line.startswith("accuracy ")]
    return code == 0, (summary or lines or [f"exit {code}"])[-1]


def run_sweep(
    *, config: Path | None, base: list[str], grid: list[str], seeds: list[int], jobs: int, out: Path
) -> list[dict]:
    """Validate every point, run them ``jobs`` at a time, write and return the frontier."""
    points = grid_points(grid, seeds)
    for sets in points.values():  # every config is checked before any work starts
        load_config(config, [*base, *sets])
    out.mkdir(parents=True, exist_ok=True)
    print(f"fedsim sweep: {len(points)} runs, {jobs} at a time, in {out}", flush=True)
    started, failed = time.time(), []

    def one(item: tuple[str, list[str]]) -> None:
        name, sets = item
        ok, last = run_point(out / name, config, [*base, *sets])
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: {last}", flush=True)
        if not ok:
            failed.append(name)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, points.items()))
    rows = frontier.frontier(frontier.find_runs([out]))
    frontier.write_frontier(rows, out)
    print(frontier.markdown(rows))
    print(f"fedsim sweep: {time.time() - started:.0f} s; frontier in {out}/frontier.md")
    if failed:
        raise FedsimError(f"{len(failed)} run(s) failed ({', '.join(failed)}); see {out}/logs")
    return rows


def default_jobs(client_cpus: float) -> int:
    """Runs at a time: each simulation gets at least two clients' worth of cores."""
    return max(1, int((os.cpu_count() or 1) // max(2.0, 2 * client_cpus)))
