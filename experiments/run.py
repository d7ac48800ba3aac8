"""Runner: one validated config -> a Flower simulation -> a finished results folder.

The run writes into a hidden ``.<name>.partial`` folder beside the target and renames it
into place only when everything is written, so a failed run leaves no half-written
results and never touches an existing folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from pathlib import Path

from fedsim import report, results
from fedsim.config import FedsimConfig
from fedsim.data import load_dataset
from fedsim.errors import FedsimError
from fedsim.partition import partition_dataset


def preflight(config: FedsimConfig) -> None:
    """Check what the schema cannot: data files, partition feasibility, devices."""
    partition_dataset(load_dataset(config.dataset, config.data_dir), config)
    if config.client_gpus > 0:
        import torch

        if not torch.cuda.is_available():
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


def print_round(config: FedsimConfig):
    """A progress callback printing one line per round."""

    def on_round(row: dict) -> None:
        print(
            f"round {row['round']:>3}/{config.num_rounds}  accuracy {row['accuracy']:.4f}  "
            f"loss {row['loss']:.4f}  ε {report.format_epsilon(row['epsilon']):>6}  "
            f"{row['seconds']:6.2f} s",
            flush=True,
        )

    return on_round


def run_experiment(config: FedsimConfig, *, out: Path | None = None, verbose: bool = False) -> Path:
    """Run ``config`` in Flower's simulation engine and return the results folder."""
    from flwr.simulation import run_simulation

    from clients.client_app import app as client_app
    from server.server_app import build_server_app

    started = time.time()
    run_dir = Path(out) if out else results.default_run_dir(config.out_dir, config.name)
    if run_dir.exists():
        raise FedsimError(f"{run_dir} already exists; choose another --out or remove it")
    preflight(config)
    staging = run_dir.with_name(f".{run_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _quiet_logs(verbose)
    server_app = build_server_app(
        config, run_dir=staging, on_round=print_round(config), started=started
    )
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=config.num_clients,
            backend_config=_backend_config(config, verbose),
        )
        if not (staging / results.SUMMARY).exists():
            raise FedsimError("the simulation ended before the server finished; rerun with --debug")
        report.plot_run(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    staging.rename(run_dir)
    return run_dir


def _backend_config(config: FedsimConfig, verbose: bool) -> dict:
    return {
        "client_resources": {"num_cpus": config.client_cpus, "num_gpus": config.client_gpus},
        "init_args": {
            "logging_level": "INFO" if verbose else "ERROR",
            "log_to_driver": verbose,
            "include_dashboard": False,
        },
    }


def _quiet_logs(verbose: bool) -> None:
    """Keep Flower's and Ray's per-message logs out of the progress lines."""
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.ERROR)
    # opt in to Ray's future behaviour now; it also silences Ray's warning about it
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not verbose:
        warnings.filterwarnings("ignore", module=r"(ray|opacus|torch)\b.*")
