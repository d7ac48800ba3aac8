"""``fedsim sweep``: a grid of runs over seeds, in parallel, then the frontier.

Each point runs as its own ``fedsim run`` process in ``<out>/<point>``, from the base
config saved as ``<out>/sweep.toml``; a point that already finished is skipped and an
unfinished one resumed, so the same command continues an interrupted sweep. ``none`` as
an ε value means the same run without DP.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fedsim import results
from fedsim.config import parse_config, parse_override, toml_literal, toml_table
from fedsim.errors import FedsimError
from fedsim.experiments.progress import SweepProgress
from fedsim.results import frontier

EPSILON_KEYS = {"target-epsilon", "user-target-epsilon"}
SWEEP_CONFIG = "sweep.toml"


def grid_axes(items: list[str]) -> dict[str, list[Any]]:
    """``--grid KEY=V1,V2`` strings as ``{key: [values]}``."""
    axes: dict[str, list[Any]] = {}
    for item in items:
        key, raw = parse_override(item)
        values = [parse_override(f"{key}={v.strip()}")[1] for v in str(raw).split(",") if v.strip()]
        if not values:
            raise FedsimError(f"--grid {item}: no values; write KEY=v1,v2,...")
        axes[key] = values
    return axes


def grid_points(grid: Mapping[str, Sequence[Any]], seeds: Sequence[int]) -> dict[str, dict]:
    """``{point name: overrides}`` for every grid combination and seed.

    ``none`` (or None) as a value of an ε key means the same run without DP.
    """
    axes = [(key.replace("_", "-"), list(values)) for key, values in grid.items()]
    points = {}
    for combo in itertools.product(*(values for _, values in axes)):
        for seed in seeds:
            sets: dict[str, Any] = {}
            names = []
            for (key, _), value in zip(axes, combo, strict=True):
                if key in EPSILON_KEYS and value in (None, "none"):
                    sets["dp"] = "none"
                    names.append("nodp")
                else:
                    sets[key] = value
                    names.append(f"{key}={value}")
            points["_".join([*names, f"seed={seed}"])] = sets | {"seed": seed}
    return points


def run_point(out: Path, config: Path, sets: Mapping[str, Any]) -> tuple[bool, str]:
    """Run (or resume) one point as a ``fedsim run`` process; (ok, last output line)."""
    if (out / results.SUMMARY).is_file():
        return True, "done earlier"
    if out.with_name(f".{out.name}.partial").exists():
        args = ["--resume", str(out)]
    else:
        args = ["--out", str(out), "--config", str(config)]
        args += [a for k, v in sets.items() for a in ("--set", f"{k}={toml_literal(v)}")]
    log = out.parent / "logs" / f"{out.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        command = [sys.executable, "-m", "fedsim.experiments.cli", "run", *args]
        code = subprocess.call(command, stdout=fh, stderr=fh)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    summary = [line for line in lines if line.startswith("accuracy ")]
    return code == 0, (summary or lines or [f"exit {code}"])[-1]


def run_sweep(
    base: Mapping[str, Any],
    *,
    grid: Mapping[str, Sequence[Any]],
    seeds: Sequence[int],
    jobs: int,
    out: Path,
) -> list[dict]:
    """Validate every point, run them ``jobs`` at a time, write and return the frontier.

    ``base`` (kebab-case keys) goes to ``<out>/sweep.toml``, the config every point
    starts from; the same ``out`` continues a sweep.
    """
    points = grid_points(grid, seeds)
    for sets in points.values():  # every config is checked before any work starts
        parse_config({**base, **sets})
    out.mkdir(parents=True, exist_ok=True)
    config = out / SWEEP_CONFIG
    results.write_atomic(config, toml_table(base))
    print(f"fedsim sweep: {len(points)} runs, {jobs} at a time, in {out}", flush=True)
    progress, failed = SweepProgress(len(points)), []

    def one(item: tuple[str, dict]) -> None:
        name, sets = item
        ok, last = run_point(out / name, config, sets)
        print(progress.point(name, ok, last), flush=True)
        if not ok:
            failed.append(name)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, points.items()))
    rows = frontier.frontier(frontier.find_runs([out]))
    frontier.write_frontier(rows, out)
    print(frontier.markdown(rows))
    print(f"fedsim sweep: frontier in {out}/frontier.md")
    if failed:
        raise FedsimError(f"{len(failed)} run(s) failed ({', '.join(failed)}); see {out}/logs")
    return rows


def default_jobs(client_cpus: float) -> int:
    """Runs at a time: each simulation gets at least two clients' worth of cores."""
    return max(1, int((os.cpu_count() or 1) // max(2.0, 2 * client_cpus)))
