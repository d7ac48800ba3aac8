"""``fedsim sweep``: a grid of runs over seeds, in parallel, then the frontier.

Each point runs as its own ``fedsim run`` process in ``<out>/<point>``, from the base
config saved as ``<out>/sweep.toml``; a point that already finished is skipped and an
unfinished one resumed, so the same command continues an interrupted sweep. ``none`` as
an ε value means the same run without DP.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from fedsim import results
from fedsim.config import (
    BUDGETS,
    check_budget,
    parse_config,
    parse_override,
    read_toml,
    rooted,
    toml_literal,
    toml_table,
)
from fedsim.errors import USER_ERRNOS, FedsimError, RunInterrupted, file_error
from fedsim.experiments.progress import SweepProgress
from fedsim.results import frontier

EPSILON_KEYS = {"target-epsilon", "user-target-epsilon"}
SWEEP_CONFIG = "sweep.toml"


# keys a grid may not sweep: seeds are --seeds, and frontier rows pool runs that differ
# only in these, so two points on them would be reported as two seeds
NOT_SWEPT = {"seed": "sweep seeds with --seeds (seeds=...)", **dict.fromkeys(
    ("name", "out-dir"), "each point gets its own folder in the sweep's --out")}  # fmt: skip


def grid_axes(items: list[str]) -> dict[str, list[Any]]:
    """``--grid KEY=V1,V2`` strings as ``{key: [values]}``."""
    axes: dict[str, list[Any]] = {}
    for item in items:
        key, raw = parse_override(item, "--grid")
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
    for key, _ in axes:
        if key in NOT_SWEPT:
            raise FedsimError(f"--grid {key}: {NOT_SWEPT[key]}; remove {key} from the grid")
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


class Children:
    """The points' ``fedsim run`` processes, and the signal that stopped the sweep.

    A SIGINT or SIGTERM to the sweep goes on to every point running (each stops after
    abandoning its round, resumable), and no point starts after it: without this, a
    ``kill`` or a batch scheduler's SIGTERM left the running points training on their own.
    """

    def __init__(self) -> None:
        self.live: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.signum = 0

    def call(self, command: list[str], log: IO[str]) -> int | None:
        """Run ``command`` to its end; its status, or None if the sweep has stopped."""
        with self.lock:
            if self.signum:
                return None
            proc = subprocess.Popen(command, stdout=log, stderr=log)
            self.live.add(proc)
        try:
            return proc.wait()
        finally:
            with self.lock:
                self.live.discard(proc)

    def stop(self, signum: int, frame: object = None) -> None:
        """The signal handler: pass ``signum`` on to every running point."""
        with self.lock:
            self.signum = self.signum or signum
            for proc in self.live:
                proc.send_signal(signum)


@contextlib.contextmanager
def forwarded(children: Children) -> Iterator[None]:
    """SIGINT and SIGTERM go to ``children`` while the sweep runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, children.stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_point(
    out: Path, config: Path, sets: Mapping[str, Any], children: Children
) -> tuple[bool | None, str]:
    """Run (or resume) one point as a ``fedsim run`` process; (ok, last output line).

    ``ok`` is None where the sweep was stopped before the point started or finished.
    """
    if children.signum:
        return None, "not started"
    if (out / results.SUMMARY).is_file():
        return True, "done earlier"
    if out.with_name(f".{out.name}.partial").exists():
        args = ["--resume", str(out)]
    else:
        args = ["--out", str(out), "--config", str(config)]
        args += [a for k, v in sets.items() for a in ("--set", f"{k}={toml_literal(v)}")]
    log = out.parent / "logs" / f"{out.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as fh:  # a resumed point's log goes on
        command = [sys.executable, "-m", "fedsim.experiments.cli", "run", *args]
        code = children.call(command, fh)
    if code is None:
        return None, "not started"
    if code != 0 and children.signum:  # stopped with the sweep: it resumes, not failed
        return None, "stopped"
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
    if base.get("data-dir"):  # every point, and a sweep continued elsewhere, reads it
        base = {**base, "data-dir": rooted(parse_config(dict(base))).data_dir}
    points = grid_points(grid, seeds)
    secret = False  # a point with secret cohorts: its run's time tells of them
    for sets in points.values():  # every config is checked before any work starts
        check_budget({k: v for k, v in base.items() if k in BUDGETS}, sets)  # base: checked
        secret |= parse_config({**base, **sets}).dp_user
    config = out / SWEEP_CONFIG
    _check_same_base(config, base)
    try:
        out.mkdir(parents=True, exist_ok=True)
        results.write_atomic(config, toml_table(base))
    except OSError as exc:
        if exc.errno not in USER_ERRNOS:
            raise
        raise file_error(exc.filename or out, exc, "choose another --out") from None
    print(f"fedsim sweep: {len(points)} runs, {jobs} at a time, in {out}", flush=True)
    failed = run_points(points, out, config, jobs, clock=not secret)
    rows = frontier.frontier(results.find_runs([out]))
    frontier.write_frontier(rows, out)
    print(frontier.markdown(rows))
    print(f"fedsim sweep: frontier in {out}/frontier.md")
    if failed:
        raise FedsimError(f"{len(failed)} run(s) failed ({', '.join(failed)}); see {out}/logs")
    return rows


def run_points(
    points: Mapping[str, dict], out: Path, config: Path, jobs: int, *, clock: bool = True
) -> list[str]:
    """Run every point, ``jobs`` at a time, saying each as it ends; the ones that failed.

    ``clock``: with each point, the time so far. Under user-level DP a run's time tells how
    many clients took part (README, "How privacy is counted"), and with one point at a
    time the differences between the times said would give each run's.

    A SIGINT or SIGTERM stops them (:class:`Children`) and raises :class:`RunInterrupted`.
    """
    progress, failed, children = SweepProgress(len(points), clock=clock), [], Children()

    def one(item: tuple[str, dict]) -> None:
        name, sets = item
        ok, last = run_point(out / name, config, sets, children)
        if ok is None:
            return
        print(progress.point(name, ok, last), flush=True)
        if not ok:
            failed.append(name)

    with forwarded(children), ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, points.items()))
    if children.signum:
        raise RunInterrupted(
            f"sweep stopped by {signal.Signals(children.signum).name}; finished points are "
            "kept, and the same command continues the others",
            children.signum,
        )
    return failed


def _check_same_base(config: Path, base: Mapping[str, Any]) -> None:
    """Refuse to continue a sweep in ``config``'s folder from another base config.

    Its finished points would be skipped, and the frontier would mix runs of the old
    config with a ``sweep.toml`` that names the new one. A folder that holds anything but
    a sweep (a run, other runs) is refused too: the frontier reads every run in it.
    """
    if not config.is_file():
        folder = config.parent
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise FedsimError(
                f"--out {folder} holds other files and no sweep (no {SWEEP_CONFIG}); its "
                "frontier would mix them in: give a new or empty folder (the same --out "
                "continues a sweep)"
            )
        return
    old, new = read_toml(config), dict(base)
    with contextlib.suppress(FedsimError):  # as resolved, where each alone is a config
        # a sweep begun before data-dir was made absolute wrote it as given
        old, new = rooted(parse_config(old)).to_flat(), parse_config(new).to_flat()
    changed = [k for k in {**old, **new} if old.get(k) != new.get(k)]
    if changed:
        key = changed[0]
        raise FedsimError(
            f"{config.parent} holds a sweep of another config ({key}: {old.get(key)!r} there, "
            f"{new.get(key)!r} now); give another --out, or the same settings to continue it"
        )


def default_jobs(client_cpus: float) -> int:
    """Runs at a time: each simulation gets at least two clients' worth of cores."""
    return max(1, int((os.cpu_count() or 1) // max(2.0, 2 * client_cpus)))
