"""Result rows and files written by the server: rounds.csv, partition, ledger, summary."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from fedsim import results
from fedsim.messages import ClientInfo
from server import privacy
from server.state import RunState

ROUND_FIELDS = (*results.ROUND_FIELDS, "epsilon_sample", "epsilon_user", "clip_norm")


def primary_unit(dp: str) -> str:
    """The unit whose ε heads reports: a user protects all their samples too."""
    return {"none": "none", "sample": "sample", "user": "user", "both": "user"}[dp]


def round_row(state: RunState, server_round: int, loss: float, acc: float, **extra) -> dict:
    """One row of ``rounds.csv``; ``extra`` carries seconds, clients, dropped, clip_norm."""
    eps = state.epsilons()
    unit = primary_unit(state.config.dp)
    headline = float("inf") if unit == "none" and server_round > 0 else eps.get(unit, 0.0)
    return {
        "round": server_round,
        "accuracy": round(acc, 6),
        "loss": round(loss, 6),
        "epsilon": headline,
        "epsilon_sample": eps.get("sample", ""),
        "epsilon_user": eps.get("user", ""),
        **extra,
    }


def write_partition(run_dir: Path, infos: list[ClientInfo], users: list[str] | None) -> None:
    """``partition.csv``: one row per client with its user, size and label counts."""
    num_classes = max(len(i.label_counts) for i in infos)
    user_field = ("user",) if users else ()
    fields = ("client", *user_field, "num_examples", *(f"label_{k}" for k in range(num_classes)))
    rows = [
        {"client": i.partition_id, "num_examples": i.num_examples}
        | ({"user": users[i.partition_id]} if users else {})
        | {f"label_{k}": n for k, n in enumerate(i.label_counts)}
        for i in infos
    ]
    results.write_csv(run_dir / results.PARTITION, rows, fields)


def privacy_record(state: RunState) -> dict:
    """``privacy.json``: the full ledger of every unit the run protects."""
    cfg = state.config
    record = {"accountant": cfg.accountant, "delta": cfg.delta, "units": {}}
    if cfg.dp in ("sample", "both"):
        record["units"]["sample"] = {
            "sampling": privacy.SAMPLING,
            "clients": privacy.ledger_to_json(state.ledger),
        }
    if cfg.dp in ("user", "both"):
        record["units"]["user"] = {
            "sampling": privacy.USER_SAMPLING,
            "max_update_norm": cfg.max_update_norm,
            "clip_quantile": cfg.clip_quantile,
            "rounds": [asdict(e) for e in state.user_ledger],
        }
    return record


def write_final(state: RunState, run_dir: Path, started: float) -> dict:
    """Write ``privacy.json`` and ``summary.json``; return the summary."""
    cfg = state.config
    results.write_json(run_dir / results.PRIVACY, privacy_record(state))
    eps = state.epsilons()
    unit = primary_unit(cfg.dp)
    _, worst = privacy.run_epsilon(state.ledger, delta=cfg.delta, accountant=cfg.accountant)
    last = state.rows[-1]
    dp = unit != "none"
    summary = {
        "accuracy": last["accuracy"],
        "loss": last["loss"],
        "epsilon": eps[unit] if dp else None,
        "delta": cfg.delta if dp else None,
        "privacy_unit": unit,
        "accountant": cfg.accountant if dp else None,
        "epsilon_by_unit": eps,
        "sampling": {"sample": privacy.SAMPLING, "user": privacy.USER_SAMPLING}.get(unit),
        "epsilon_max_client": worst,
        "noise_multiplier": cfg.noise_multiplier if "sample" in eps else 0.0,
        "max_grad_norm": cfg.max_grad_norm if "sample" in eps else None,
        "user_noise_multiplier": cfg.user_noise_multiplier if "user" in eps else None,
        "max_update_norm": cfg.max_update_norm if "user" in eps else None,
        "epsilon_per_round": [r["epsilon"] if dp else None for r in state.rows],
        "dropped_per_round": {r["round"]: r["dropped"] for r in state.rows if r["dropped"]},
        "num_rounds": cfg.num_rounds,
        "num_clients": cfg.num_clients,
        "clients_per_round": cfg.clients_per_round,
        "wall_seconds": round(time.time() - started, 2),
        "config": cfg.to_flat(),
    }
    results.write_json(run_dir / results.SUMMARY, summary)
    return summary
