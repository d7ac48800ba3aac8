"""The Python API: run, resume, sweep, deploy and load experiments.

``fedsim.run`` and the others are these functions (``fedsim/__init__.py`` exposes them
without importing torch until one is used); the ``fedsim`` command is a thin layer over
them. A config is a ``FedsimConfig``, a mapping of its keys, the path of a TOML file, or
nothing (the defaults); keyword overrides use Python names::

    import fedsim

    result = fedsim.run("experiments/configs/digits-cnn.toml", num_rounds=5)
    print(result.accuracy, result.epsilon, result.rounds[-1])
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedsim.config import ConfigLike, as_config, config_mapping, deploy_config, rooted
from fedsim.errors import RunInterrupted, RunStopped
from fedsim.experiments import deploy as deploying
from fedsim.experiments.progress import RunProgress
from fedsim.experiments.raystart import RayStart
from fedsim.experiments.run import resume_target, run_experiment
from fedsim.experiments.sweep import default_jobs, run_sweep
from fedsim.results import Result, frontier, load_run


def run(
    config: ConfigLike = None,
    *,
    out: str | Path | None = None,
    force: bool = False,
    verbose: bool = False,
    progress: RunProgress | None = None,
    ray_start: RayStart | None = None,
    stop_within: float | None = None,
    **overrides: Any,
) -> Result:
    """Run one experiment in Flower's simulation engine; return its :class:`Result`.

    Parameters
    ----------
    config
        A config, a mapping of keys, a TOML file's path, or None for the defaults.
    out
        The results folder (default ``<out-dir>/<name>-<time>``); it must not exist.
    force
        Replace an existing ``out`` once the new run has finished.
    progress
        Hears every round and reply (default: a live bar on a terminal, else lines).
    ray_start
        A :class:`~fedsim.experiments.raystart.RayStart` for the same config, already
        entered: Ray then starts while your script still imports or loads (the
        ``fedsim`` command starts it before it imports the engine).
    stop_within
        Seconds after a first Ctrl-C or SIGTERM past which a stop still under way ends
        this process, as a second signal does (the ``fedsim`` command: 20). By default
        the stop is waited for.
    **overrides
        Config keys as Python names, e.g. ``num_rounds=5, dp="user"``.

    Raises
    ------
    RunStopped
        A Ctrl-C or SIGTERM stopped the run (a ``KeyboardInterrupt``); the last finished
        round is checkpointed, and :func:`resume` continues it.

    """
    cfg = rooted(as_config(config, **overrides))
    with _stops():
        folder = run_experiment(
            cfg,
            out=_path(out),
            force=force,
            verbose=verbose,
            progress=progress,
            ray_start=ray_start,
            stop_within=stop_within,
        )
    return load_run(folder)


def resume(
    run_dir: str | Path,
    *,
    verbose: bool = False,
    progress: RunProgress | None = None,
    stop_within: float | None = None,
) -> Result:
    """Continue the unfinished run at ``run_dir`` exactly as it was; return its result.

    ``stop_within``: as for :func:`run`.
    """
    target, cfg = resume_target(Path(run_dir))
    with _stops():
        folder = run_experiment(
            cfg, out=target, resume=True, verbose=verbose, progress=progress,
            stop_within=stop_within,
        )  # fmt: skip
    return load_run(folder)


def sweep(
    config: ConfigLike = None,
    *,
    grid: Mapping[str, Sequence[Any]],
    seeds: Sequence[int] = (0,),
    jobs: int = 0,
    out: str | Path | None = None,
    **overrides: Any,
) -> frontier.Sweep:
    """Run ``config`` over every combination of ``grid`` and seed; return the frontier.

    ``grid`` maps keys to values, e.g. ``{"target_epsilon": [1, 4, None]}``; None (or
    ``"none"``) as an ε means the same run without DP. Each point runs as its own
    process, ``jobs`` at a time (0: by CPUs); the same ``out`` continues a sweep.
    """
    base = config_mapping(config, **overrides)
    cfg = as_config(base)
    folder = _path(out) or Path(cfg.out_dir) / f"sweep-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with _stops():
        jobs = jobs or default_jobs(cfg.client_cpus)
        run_sweep(base, grid=grid, seeds=seeds, jobs=jobs, out=folder)
    return frontier.load_sweep(folder)


def deploy(
    config: ConfigLike = None,
    *,
    num_nodes: int | None = None,
    out: str | Path | None = None,
    host: str = "127.0.0.1",
    tls: bool | None = None,
    auth: bool | None = None,
    node_data_dirs: Sequence[str | Path] = (),
    timeout: float = 0.0,
    verbose: bool = False,
    **overrides: Any,
) -> Result:
    """Run one experiment on real Flower processes on this machine; return its result.

    A SuperLink and one SuperNode per client (``num_nodes`` sets ``num-clients``); TLS and
    SuperNode authentication are on unless ``host`` is loopback. ``node_data_dirs``: one
    folder per SuperNode, each training on its own data there.
    """
    cfg = deploy_config(config_mapping(config, **overrides), num_nodes, node_data_dirs)
    with _stops():
        folder = deploying.deploy(
            cfg,
            out=_path(out),
            tls=tls,
            auth=auth,
            host=host,
            node_data_dirs=tuple(Path(d) for d in node_data_dirs),
            timeout=timeout,
            verbose=verbose,
        )
    return load_run(folder)


def load(run_dir: str | Path) -> Result:
    """The :class:`Result` of a finished run folder."""
    return load_run(run_dir)


@contextmanager
def _stops() -> Iterator[None]:
    """A signal's stop leaves the API as a ``KeyboardInterrupt`` (:class:`RunStopped`).

    A loop of runs in a script whose ``except Exception`` would go on to the next run
    stops instead.
    """
    try:
        yield
    except RunInterrupted as exc:
        raise RunStopped(str(exc), exc.signum) from None
    except KeyboardInterrupt:  # deploy's stop (its processes stopped), or an abort
        raise RunStopped("stopped by Ctrl-C or a signal") from None


def _path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)
