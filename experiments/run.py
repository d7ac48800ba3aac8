"""Runner: one validated config -> a Flower simulation -> a finished results folder.

The run writes into a hidden ``.<name>.partial`` folder beside the target and renames it
into place only when everything is written, so a results folder is never half-written
and an existing one is never touched without ``force``. The partial folder keeps a
checkpoint after every round: a run that is stopped (Ctrl-C, a kill, a crash) resumes
from it with ``fedsim run --resume``.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from fedsim import results
from fedsim.clients.client_app import simulation_app
from fedsim.config import FedsimConfig
from fedsim.data import Dataset, load_checked, partition_dataset
from fedsim.dp import check_reachable
from fedsim.errors import USER_ERRNOS, FedsimError, RunInterrupted, file_error
from fedsim.experiments.delivery import prompt_delivery
from fedsim.experiments.machine import check_machine
from fedsim.experiments.progress import RunProgress, for_terminal
from fedsim.experiments.raystart import RayStart
from fedsim.experiments.rundir import (
    Claim,
    claim_default,
    claim_new,
    claim_resume,
    lock_holder,
    staging_dir,
)
from fedsim.experiments.signals import Signals
from fedsim.models import check_client_model
from fedsim.server.federation import noise_targets
from fedsim.server.server_app import build_server_app
from fedsim.server.state import restore


def preflight(config: FedsimConfig, dataset: Dataset | None = None) -> Dataset:
    """Check what the schema cannot: data files, partition feasibility, model, devices.

    ``dataset``, where given, is ``load_checked(config)``'s: the data is not loaded again.
    Returns the loaded dataset, for the server to reuse.
    """
    if dataset is None:
        dataset = load_checked(config)
    check_targets(config, dataset)
    check_client_model(config, dataset)  # a model of your own may mix samples or not vectorize
    check_machine(config, cuda_available=torch.cuda.is_available)
    return dataset


def check_targets(config: FedsimConfig, dataset: Dataset) -> None:
    """Refuse a target ε that no σ reaches, before any engine starts.

    The server solves σ once its clients have said their sizes: a target out of reach
    was refused there, 20 s into a run on 2 cores. Here it takes milliseconds.
    """
    sizes = [len(part) for part in partition_dataset(dataset, config)]
    for target, schedules in noise_targets(config, sizes).values():
        check_reachable(
            target_epsilon=target, delta=config.delta, accountant=config.accountant,
            schedules=schedules,
        )  # fmt: skip


def resume_target(path: Path) -> tuple[Path, FedsimConfig]:
    """(final results folder, checkpointed config) of an unfinished run at ``path``.

    The checkpoint is checked here, before any engine starts: a damaged one, or one whose
    ledger misses a charge, is refused with one line.
    """
    if path.name.startswith(".") and path.name.endswith(".partial"):
        path = path.with_name(path.name[1 : -len(".partial")])
    staging = staging_dir(path)
    state = restore(staging, infos=[])
    holder = lock_holder(staging) if state is None else ""
    if holder:
        raise FedsimError(
            f"{path} is being written by another fedsim run (pid {holder}); wait for it to finish"
        )
    if state is None and staging.is_dir():
        raise FedsimError(
            f"{staging} holds no checkpoint, so nothing of its run can be continued; remove "
            "it, and start the run again"
        )
    if state is None:
        raise FedsimError(f"no unfinished run to resume at {path}; pass the folder a run printed")
    return path, state.config


def run_experiment(
    config: FedsimConfig,
    *,
    out: Path | None = None,
    resume: bool = False,
    force: bool = False,
    verbose: bool = False,
    client_app: ClientApp = simulation_app,
    progress: RunProgress | None = None,
    ray_start: RayStart | None = None,
    dataset: Dataset | None = None,
    stop_within: float | None = None,
) -> Path:
    """Run (or resume) ``config`` in Flower's simulation engine; return the results folder.

    ``progress`` hears every round and every reply (default: a live bar on a terminal,
    one line per round elsewhere). SIGINT or SIGTERM abandons the round in progress and
    stops (:class:`RunInterrupted`, resumable); a second one aborts at once.
    ``ray_start``, entered by the caller for this ``config``, is a Ray already starting
    (the command starts it while it imports the engine); by default the run starts its
    own once its folder is claimed. ``dataset``, where given, is ``load_checked(config)``'s.
    ``stop_within``: seconds after a first signal past which a stop still under way is
    aborted, ending this process as a second signal does (default: it is waited for).
    """
    if ray_start is not None and ray_start.config != config:
        raise FedsimError("ray_start was made for another config; make it with this one")
    started = time.time()
    dataset = preflight(config, dataset)
    claim = _claim(config, out, resume=resume, force=force)
    run_dir, staging = claim.run_dir, claim.staging
    print(f"fedsim: writing {staging} (resume with: fedsim run --resume {run_dir})", flush=True)
    progress = progress or for_terminal(config)
    simulate = partial(
        _simulate, config, dataset, staging, started, verbose, client_app, progress, ray_start,
        stop_within,
    )  # fmt: skip
    _run_claimed(claim, simulate, progress)
    return run_dir


def _claim(config: FedsimConfig, out: Path | None, *, resume: bool, force: bool) -> Claim:
    """The run's staging folder: to resume at ``out``, new at ``out``, or by default."""
    if resume:
        return claim_resume(Path(out or ""))
    if out is not None:
        return claim_new(Path(out), force=force)
    return claim_default(config.out_dir, config.name)


def _run_claimed(claim: Claim, simulate: Callable[[], None], progress: RunProgress) -> None:
    """``simulate`` into ``claim``'s staging folder, then finish it; close ``progress``."""
    try:
        _simulate_claimed(claim, simulate)
        _finish(claim)
    finally:
        claim.release()
        progress.close()


def _simulate_claimed(claim: Claim, simulate: Callable[[], None]) -> None:
    """``simulate``; where it fails, what is kept and what to do, in one line.

    A failure before the first checkpoint removes the staging folder: there is nothing to
    resume. After it, a stop or a file error the user can fix (a full disk) keeps the
    folder and says how to resume.
    """
    run_dir, staging = claim.run_dir, claim.staging
    try:
        simulate()
    except BaseException as exc:
        saved = _has_checkpoint(staging)
        if not saved:
            claim.abandon()
        resume = f"fedsim run --resume {run_dir}"
        if isinstance(exc, RunInterrupted):
            said = f"continue with: {resume}" if saved else "nothing was saved: run it again"
            raise RunInterrupted(f"{exc}; {said}", exc.signum) from None
        if isinstance(exc, OSError) and exc.errno in USER_ERRNOS:
            fix = f"fix that, then: {resume}" if saved else "fix that and run it again"
            raise file_error(exc.filename or staging, exc, fix) from None
        if isinstance(exc, FedsimError) and saved:  # else the folder's refusal comes next
            raise FedsimError(
                f"{exc} (the rounds before it are kept in {staging}: fix the cause and "
                f"{resume}, or remove that folder)"
            ) from exc
        raise


def _finish(claim: Claim) -> None:
    """Rename the finished run into place; where that fails, its results stay whole."""
    try:
        claim.finish()
    except OSError as exc:
        fix = f"the finished run is whole in {claim.staging}: move it where you want it"
        raise file_error(exc.filename or claim.run_dir, exc, fix) from None


def _has_checkpoint(staging: Path) -> bool:
    """Whether ``staging`` holds a checkpoint (where it cannot be read: kept, to be safe)."""
    try:
        return (staging / results.CHECKPOINT).is_file()
    except OSError:
        return True


def _simulate(
    config: FedsimConfig,
    dataset: Dataset,
    staging: Path,
    started: float,
    verbose: bool,
    client_app: ClientApp,
    progress: RunProgress,
    ray_start: RayStart | None,
    stop_within: float | None,
) -> None:
    _quiet_logs(verbose)
    with nullcontext(ray_start) if ray_start else RayStart(config, verbose=verbose) as ray:
        _simulate_on(config, dataset, staging, started, client_app, progress, ray, stop_within)


def _simulate_on(
    config: FedsimConfig,
    dataset: Dataset,
    staging: Path,
    started: float,
    client_app: ClientApp,
    progress: RunProgress,
    ray_start: RayStart,
    stop_within: float | None,
) -> None:
    stop = threading.Event()
    # Ray goes on starting while the server is built and evaluates round 0
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
    signals = Signals(
        stop, progress.note, spare=ray_start.spare, tag=ray_start.tag, stop_within=stop_within
    )
    try:
        with signals, prompt_delivery():
            ray_start.ready()
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=config.simulation_workers,
                backend_config={"client_resources": client_resources(config)},
            )
    except RunInterrupted:
        raise RunInterrupted(signals.stopped_where(), signals.signum) from None
    finally:
        stop.set()  # the server thread gives up whatever it waits for
    if signals.signum:
        raise RunInterrupted(signals.stopped_where(), signals.signum)
    if not (staging / results.SUMMARY).exists():
        raise FedsimError("the simulation ended before the server finished; rerun with --debug")


def client_resources(config: FedsimConfig) -> dict[str, Any]:
    """What Ray reserves for each simulation worker: Flower starts as many as fit."""
    return {"num_cpus": config.client_cpus, "num_gpus": config.client_gpus}


def _quiet_logs(verbose: bool) -> None:
    """Keep Flower's and Ray's logs out of the progress lines.

    Client failures are reported by fedsim itself, with their reasons, in the progress
    line and in ``rounds.csv``, so Flower's tracebacks for them are noise.
    """
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.CRITICAL)
    if not verbose:
        warnings.filterwarnings("ignore", module=r"(ray|opacus|torch)\b.*")
