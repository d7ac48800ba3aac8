"""Result files written by the server: rounds, partition, ledger, summary, private/.

What is published and what stays in ``private/`` is decided here. Under user-level DP
the ε counts amplification by sampling the cohorts, which holds only while they stay
secret. ``private/participation.csv`` then names each round's clients and gives its
cohort size, failure count and time; the published rows give none of them. A size
tells a reader that a client was sampled with chance size/N rather than q, which the
accounted ε does not cover (docs/privacy.md); a time shows how much data the cohort held.
Under sample-level DP the published rows name who dropped out, but not the text of an
error a client raised, which can quote its data: that is in ``private/`` alone.
"""

from __future__ import annotations

import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from fedsim import results
from fedsim.config import FedsimConfig
from fedsim.data import Dataset
from fedsim.messages import ClientInfo
from fedsim.models import clipping_path, device_name
from fedsim.results import RoundRow
from fedsim.server import privacy
from fedsim.server.guarantees import guarantees, noise_record, privacy_record
from fedsim.server.rounds import withheld
from fedsim.server.state import RunState

WITHHELD = "withheld (it can quote the client's data): see private/participation.csv"
# what computes a run's numbers: their versions go into summary.json
SOFTWARE = ("fedsim", "torch", "opacus", "flwr", "dp-accounting", "numpy")


def primary_unit(dp: str) -> str:
    """The unit whose ε heads reports."""
    return {"none": "none", "sample": "sample", "user": "user", "both": "user"}[dp]


def round_rows(
    state: RunState,
    server_round: int,
    loss: float,
    acc: float,
    *,
    cohort: list[int],
    dropped: dict[int, str],
    clip_norm: float | None,
    seconds: float,
) -> tuple[RoundRow, dict]:
    """One row of ``rounds.csv`` and one of ``private/participation.csv``."""
    eps = state.epsilons()
    unit = primary_unit(state.config.dp)
    headline = float("inf") if unit == "none" and server_round > 0 else eps.get(unit, 0.0)
    clients = " ".join(map(str, cohort))
    secret = state.config.dp_user
    public = RoundRow(
        round=server_round,
        accuracy=round(acc, 6),
        loss=round(loss, 6),
        epsilon=headline,
        seconds=None if secret else round(seconds, 3),
        cohort=None if secret else len(cohort),
        failed=None if secret else len(dropped),
        clients="" if secret else clients,
        dropped=public_reasons(state.config, dropped),
        epsilon_sample=eps.get("sample"),
        epsilon_user=eps.get("user"),
        clip_norm=clip_norm,
    )
    private = {
        "round": server_round,
        "clients": clients,
        "cohort": len(cohort),
        "failed": len(dropped),
        "dropped": _listed(dropped),
    }
    return public, private | {"seconds": round(seconds, 3)}


def public_reasons(config: FedsimConfig, dropped: dict[int, str]) -> str:
    """``rounds.csv``'s ``dropped``: who dropped out and why, as far as it can be published.

    Nothing under user-level DP (who was sampled is secret). Under sample-level DP the
    text of an error a client raised is withheld: it can quote the client's data (a
    label, a token id, a value), which the ε does not cover.
    """
    if config.dp_user:
        return ""
    if config.dp_sample:
        dropped = withheld(dropped, WITHHELD)
    return _listed(dropped)


def _listed(dropped: dict[int, str]) -> str:
    return "; ".join(f"{c}: {r}" for c, r in sorted(dropped.items()))


def write_partition(run_dir: Path, infos: list[ClientInfo], users: list[str] | None) -> None:
    """``partition.csv``: each client's user, size and label counts ("unknown": not shared)."""
    num_classes = max((len(i.label_counts) for i in infos if i.label_counts), default=0)
    user_field = ("user",) if users else ()
    label_fields = tuple(f"label_{k}" for k in range(num_classes)) or ("labels",)
    fields = ("client", *user_field, "num_examples", *label_fields)
    rows = []
    for i in infos:
        counts: dict[str, int | str] = dict(zip(label_fields, i.label_counts or (), strict=False))
        row: dict[str, int | str] = {"client": i.partition_id, "num_examples": i.num_examples}
        row |= {"user": users[i.partition_id]} if users else {}
        rows.append(row | {f: counts.get(f, "unknown") for f in label_fields})
    results.write_csv(run_dir / results.PARTITION, rows, fields)


def software() -> dict[str, str | None]:
    """The versions of Python and of the packages that compute a run's numbers."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in SOFTWARE:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def training_record(
    config: FedsimConfig, dataset: Dataset, device: str, *, per_node: bool
) -> dict[str, str | None]:
    """How the clients trained: their per-sample clipping, and the simulation's device.

    ``per_node`` (the deployment engine): each node picks its own device, so none is named.
    """
    return {
        "per_sample": clipping_path(config, dataset),
        "device": None if per_node else device_name(device),
    }


def write_final(
    state: RunState,
    run_dir: Path,
    started: float,
    *,
    engine: str,
    training: dict[str, str | None],
    audit: dict | None = None,
    overlap: tuple[int, str] = (1, "sample"),
) -> dict:
    """Write ``privacy.json``, ``summary.json`` and the private part; return the summary.

    ``training``: how the clients trained (``per_sample``: their clipping; ``device``);
    ``audit``: the one-run audit's record (``fedsim.dp.canaries.audit_record``), if any;
    ``overlap``: the dataset's (how many samples one piece of data lies in, its name).
    """
    cfg = state.config
    results.write_json(run_dir / results.PRIVACY, privacy_record(state))
    summary = {
        "accuracy": state.rows[-1].accuracy,
        "loss": state.rows[-1].loss,
        **_privacy_fields(state, engine, overlap),
        "num_rounds": cfg.num_rounds,
        "num_clients": cfg.num_clients,
        "clients_per_round": cfg.clients_per_round,
        # under private cohorts even the sum of the rounds' times tells how many took
        # part (with one large client, how often it did): it stays in private/
        "wall_seconds": None if cfg.dp_user else round(time.time() - started, 2),
        "training": training,
        "software": software(),
        "config": cfg.to_flat(),
    }
    if audit is not None:
        summary["audit"] = audit
    results.write_json(run_dir / results.SUMMARY, summary)
    write_private(state, run_dir)
    return summary


def _privacy_fields(state: RunState, engine: str, overlap: tuple[int, str]) -> dict[str, Any]:
    """``summary.json``'s ε, each with what it means, and the mechanisms' parameters."""
    cfg = state.config
    eps = state.epsilons()
    unit = primary_unit(cfg.dp)
    worst = None
    if cfg.dp_sample and not cfg.dp_user:  # naming the client would reveal a cohort
        worst = privacy.run_epsilon(state.ledger, delta=cfg.delta, accountant=cfg.accountant)[1]
    dp = unit != "none"
    return {
        "epsilon": eps[unit] if dp else None,
        "delta": cfg.delta if dp else None,
        "privacy_unit": unit,
        "accountant": cfg.accountant if dp else None,
        "epsilon_by_unit": eps,
        "guarantees": guarantees(state, eps, engine, overlap),
        "noise": noise_record(state),
        "engine": engine,
        "sampling": {"sample": privacy.SAMPLING, "user": privacy.USER_SAMPLING}.get(unit),
        "client_with_max_epsilon": worst,
        "noise_multiplier": cfg.noise_multiplier if "sample" in eps else None,
        "max_grad_norm": cfg.max_grad_norm if "sample" in eps else None,
        "user_noise_multiplier": cfg.user_noise_multiplier if "user" in eps else None,
        "max_update_norm": cfg.max_update_norm if "user" in eps else None,
        "epsilon_per_round": [r.epsilon if dp else None for r in state.rows],
        "failed_per_round": None  # a failure can tell of a client's data
        if cfg.dp_user
        else {r.round: r.failed for r in state.rows if r.failed},
    }


PRIVATE_NOTE = """Do not publish this folder.

participation.csv names the clients that trained in each round, and why any dropped out,
with the text of every error a client raised (which can quote its data).
Under user-level DP (dp = user or both) the reported epsilon counts amplification by
sampling the cohorts at random, which holds only while they stay secret. ledger.json is
each client's own sample-level ledger, which shows the same. checkpoint.pt (while a run
is unfinished) holds both.
"""


def write_private(state: RunState, run_dir: Path) -> None:
    """``private/``: who trained when, and each client's own ledger under secret cohorts."""
    (run_dir / results.PRIVATE).mkdir(mode=0o700, exist_ok=True)
    results.write_atomic(run_dir / results.PRIVATE_README, PRIVATE_NOTE)
    results.write_csv(
        run_dir / results.PARTICIPATION, state.participation, results.PARTICIPATION_FIELDS
    )
    if state.config.dp_sample and state.config.dp_user:
        results.write_json(run_dir / results.PRIVATE_LEDGER, privacy_record(state, public=False))
