"""Runner: one validated config -> a Flower simulation -> a finished results folder.

The run writes into a hidden ``.<name>.partial`` folder beside the target and renames it
into place only when everything is written, so a results folder is never half-written
and an existing one is never touched without ``force``. The partial folder keeps a
checkpoint after every round: a run that is stopped (Ctrl-C, a kill, a crash) resumes
from it with ``fedsim run --resume``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from fedsim import results
from fedsim.clients.client_app import simulation_app
from fedsim.config import FedsimConfig, check_task, parse_config
from fedsim.data import Dataset, load_dataset, partition_dataset
from fedsim.errors import FedsimError, RunInterrupted
from fedsim.experiments.progress import RunProgress, for_terminal
from fedsim.server.federation import simulation_nodes
from fedsim.server.server_app import build_server_app
from fedsim.server.state import load_checkpoint


def preflight(config: FedsimConfig) -> Dataset:
    """Check what the schema cannot: data files, partition feasibility, devices.

    Returns the loaded dataset, for the server to reuse.
    """
    dataset = load_dataset(config.dataset, config.data_dir)
    check_task(config, dataset.task)  # a dataset of your own states its task only now
    partition_dataset(dataset, config)
    if config.ray_address:
        return dataset  # the cluster's resources count, not this machine's
    if config.client_gpus > 0 and not torch.cuda.is_available():
        raise FedsimError(
            f"client-gpus={config.client_gpus} but no CUDA GPU is visible; "
            "set client-gpus=0 or install a CUDA build of torch"
        )
    cpus = os.cpu_count() or 1
    if config.client_cpus > cpus:
        raise FedsimError(
            f"client-cpus={config.client_cpus} exceeds this machine's {cpus} CPUs; "
            f"set client-cpus to at most {cpus}"
        )
    return dataset


def staging_dir(run_dir: Path) -> Path:
    """The hidden folder a run writes into before it is renamed to ``run_dir``."""
    return run_dir.with_name(f".{run_dir.name}.partial")


def resume_target(path: Path) -> tuple[Path, FedsimConfig]:
    """(final results folder, checkpointed config) of an unfinished run at ``path``."""
    if path.name.startswith(".") and path.name.endswith(".partial"):
        path = path.with_name(path.name[1 : -len(".partial")])
    checkpoint = load_checkpoint(staging_dir(path))
    if checkpoint is None:
        raise FedsimError(f"no unfinished run to resume at {path}; pass the folder a run printed")
    return path, parse_config(checkpoint["config"])


def run_experiment(
    config: FedsimConfig,
    *,
    out: Path | None = None,
    resume: bool = False,
    force: bool = False,
    verbose: bool = False,
    client_app: ClientApp = simulation_app,
    progress: RunProgress | None = None,
) -> Path:
    """Run (or resume) ``config`` in Flower's simulation engine; return the results folder.

    ``progress`` hears every round and every reply (default: a live bar on a terminal,
    one line per round elsewhere).
    """
    started = time.time()
    run_dir = Path(out) if out else results.default_run_dir(config.out_dir, config.name)
    staging = staging_dir(run_dir)
    if run_dir.exists() and not force:
        raise FedsimError(f"{run_dir} already exists; choose another --out, or pass --force")
    if staging.exists() and not resume:
        raise FedsimError(
            f"{run_dir} has an unfinished run; continue it with --resume {run_dir} "
            f"or remove {staging}"
        )
    dataset = preflight(config)
    staging.mkdir(parents=True, exist_ok=True)
    print(f"fedsim: writing {staging} (resume with: fedsim run --resume {run_dir})", flush=True)
    progress = progress or for_terminal(config)
    try:
        _simulate(config, dataset, staging, started, verbose, client_app, progress)
    except RunInterrupted as exc:
        raise RunInterrupted(f"{exc}; continue with: fedsim run --resume {run_dir}") from None
    except BaseException:
        if load_checkpoint(staging) is None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        progress.close()
    _replace(staging, run_dir)
    return run_dir


def _simulate(
    config: FedsimConfig,
    dataset: Dataset,
    staging: Path,
    started: float,
    verbose: bool,
    client_app: ClientApp,
    progress: RunProgress,
) -> None:
    _quiet_logs(verbose)
    stop = threading.Event()
    server_app = build_server_app(
        config,
        dataset=dataset,
        run_dir=staging,
        on_round=progress.round,
        on_reply=progress.reply,
        started=started,
        stop=stop,
        node_per_client=False,
    )
    with _stop_on_sigint(stop, progress.note):
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=simulation_nodes(config),
            backend_config=_backend_config(config, verbose),
        )
    if not (staging / results.SUMMARY).exists():
        raise FedsimError("the simulation ended before the server finished; rerun with --debug")


@contextlib.contextmanager
def _stop_on_sigint(stop: threading.Event, say: Callable[[str], None]) -> Iterator[None]:
    """First Ctrl-C: finish the current round, checkpoint, stop. Second: abort at once."""

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        say("fedsim: stopping after this round (Ctrl-C again to abort now)")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _replace(staging: Path, run_dir: Path) -> None:
    """Rename ``staging`` to ``run_dir``; an existing ``run_dir`` goes only once it is done."""
    (staging / results.CHECKPOINT).unlink(missing_ok=True)
    old = run_dir.with_name(f".{run_dir.name}.old")
    if run_dir.exists():
        run_dir.rename(old)
    staging.rename(run_dir)
    shutil.rmtree(old, ignore_errors=True)


def _backend_config(config: FedsimConfig, verbose: bool) -> dict:
    """Ray settings: per-client resources, and which Ray to run on.

    ``ray-address`` "" passes "local": a new Ray of this run's own, even where
    ``RAY_ADDRESS`` is set or ``ray start`` left a cluster running on this machine (Ray
    would join those otherwise). Any other value is handed to ``ray.init(address=...)``.
    """
    return {
        "client_resources": {"num_cpus": config.client_cpus, "num_gpus": config.client_gpus},
        "init_args": {
            "address": config.ray_address or "local",
            "logging_level": "INFO" if verbose else "ERROR",
            "log_to_driver": verbose,
            "include_dashboard": False,
        },
    }


def _quiet_logs(verbose: bool) -> None:
    """Keep Flower's and Ray's logs out of the progress lines.

    Client failures are reported by fedsim itself, with their reasons, in the progress
    line and in ``rounds.csv``, so Flower's tracebacks for them are noise.
    """
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.CRITICAL)
    # opt in to Ray's future behaviour now; it also silences Ray's warning about it
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not verbose:
        warnings.filterwarnings("ignore", module=r"(ray|opacus|torch)\b.*")
