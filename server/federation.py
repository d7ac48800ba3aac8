"""The federated run: discover clients, solve σ, train with FedAvg, account, write results."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid

from fedsim import results
from fedsim.config import FedsimConfig
from fedsim.data import Dataset, load_dataset, vocab_record
from fedsim.errors import FedsimError
from fedsim.evaluation import evaluate
from fedsim.messages import ClientInfo, decode_client_info, encode_config
from fedsim.models import build_model, model_kwargs
from fedsim.partition import partition_dataset
from server import privacy
from server.strategy import PrivacyLedger, SeededFedAvg, sample_clients

RoundCallback = Callable[[dict], None]
CONNECT_TIMEOUT_S = 300.0


@dataclass
class RunState:
    """What the server accumulates while a run goes on."""

    config: FedsimConfig
    run_dir: Path
    started: float
    ledger: privacy.Ledger = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    last_time: float = 0.0


def discover_clients(grid: Grid, config: FedsimConfig) -> dict[int, tuple[int, ClientInfo]]:
    """Ask every node for its partition; map partition id -> (node id, info)."""
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while len(nodes := sorted(grid.get_node_ids())) < config.num_clients:
        if time.monotonic() > deadline:
            raise FedsimError(
                f"only {len(nodes)} of {config.num_clients} clients connected in "
                f"{CONNECT_TIMEOUT_S:.0f} s; start more SuperNodes or lower num-clients"
            )
        time.sleep(0.5)
    content = encode_config(config)
    replies = grid.send_and_receive(
        [Message(content, node, MessageType.QUERY) for node in nodes], timeout=CONNECT_TIMEOUT_S
    )
    found: dict[int, tuple[int, ClientInfo]] = {}
    for msg in replies:
        if msg.has_error():
            raise FedsimError(f"node {msg.metadata.src_node_id} failed: {msg.error.reason}")
        info = decode_client_info(msg.content)
        found[info.partition_id] = (msg.metadata.src_node_id, info)
    if sorted(found) != list(range(config.num_clients)):
        raise FedsimError(
            f"clients reported partition ids {sorted(found)}; expected each of "
            f"0..{config.num_clients - 1} exactly once"
        )
    return found


def resolve_noise(config: FedsimConfig, infos: list[ClientInfo]) -> FedsimConfig:
    """Fix σ before round 1 so a client in every round ends at ε ≤ target-epsilon."""
    if config.dp != "sample" or config.noise_multiplier > 0:
        return config
    schedules = []
    for info in infos:
        q, steps = privacy.dp_schedule(
            info.num_examples, batch_size=config.batch_size, epochs=config.local_epochs
        )
        schedules.append((q, steps * config.num_rounds))
    sigma = privacy.solve_noise_multiplier(
        target_epsilon=config.target_epsilon,
        delta=config.delta,
        accountant=config.accountant,
        schedules=schedules,
    )
    return config.model_copy(update={"noise_multiplier": sigma})


def run_federation(
    grid: Grid,
    config: FedsimConfig,
    *,
    run_dir: Path,
    on_round: RoundCallback,
    started: float | None = None,
) -> dict:
    """Run a whole experiment on ``grid`` and write its results to ``run_dir``.

    Returns
    -------
    dict
        The contents of ``summary.json``.

    """
    run_dir.mkdir(parents=True, exist_ok=True)
    state = RunState(config, run_dir, started or time.time())
    clients = discover_clients(grid, config)
    infos = [clients[c][1] for c in sorted(clients)]
    dataset = load_dataset(config.dataset, config.data_dir)
    write_partition(run_dir, infos, natural_users(dataset, config))
    if dataset.vocab is not None:
        results.write_json(run_dir / results.VOCAB, vocab_record(dataset))
    config = state.config = resolve_noise(config, infos)

    torch.manual_seed(config.seed)
    # evaluation needs no per-sample gradients; the DP layers share this state_dict
    model = build_model(config.model, **model_kwargs(dataset), dp=False)
    inner = SeededFedAvg(
        nodes={c: clients[c][0] for c in clients},
        clients_per_round=config.clients_per_round,
        seed=config.seed,
    )

    def central_eval(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = evaluate(model, dataset.x_test, dataset.y_test)
        row = round_row(state, server_round, loss, acc)
        results.write_csv(run_dir / results.ROUNDS, state.rows, results.ROUND_FIELDS)
        on_round(row)
        return MetricRecord({"accuracy": acc, "loss": loss})

    state.last_time = time.time()
    outcome = PrivacyLedger(inner, state.ledger).start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=config.num_rounds,
        train_config=ConfigRecord(config.to_flat()),
        evaluate_fn=central_eval,
    )
    torch.save(outcome.arrays.to_torch_state_dict(), run_dir / results.MODEL)
    return write_final(state)


def round_row(state: RunState, server_round: int, loss: float, acc: float) -> dict:
    """Append the row of ``rounds.csv`` for one evaluated round."""
    cfg = state.config
    eps, _ = privacy.run_epsilon(state.ledger, delta=cfg.delta, accountant=cfg.accountant)
    if cfg.dp == "none" and server_round > 0:
        eps = float("inf")  # non-private training protects nothing
    now = time.time()
    chosen = (
        sample_clients(
            cfg.num_clients, cfg.clients_per_round, seed=cfg.seed, server_round=server_round
        )
        if server_round > 0
        else []
    )
    row = {
        "round": server_round,
        "accuracy": round(acc, 6),
        "loss": round(loss, 6),
        "epsilon": eps,
        "seconds": round(now - state.last_time, 3),
        "clients": " ".join(map(str, chosen)),
    }
    state.last_time = now
    state.rows.append(row)
    return row


def natural_users(dataset: Dataset, config: FedsimConfig) -> list[str] | None:
    """The user (e.g. speaking role) behind each client of a natural partition."""
    if config.partition != "natural" or dataset.users is None or dataset.client_ids is None:
        return None
    parts = partition_dataset(dataset, config)
    return [dataset.users[dataset.client_ids[part[0]]] for part in parts]


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


def write_final(state: RunState) -> dict:
    """Write ``privacy.json`` and ``summary.json``; return the summary."""
    cfg, ledger = state.config, state.ledger
    eps, worst = privacy.run_epsilon(ledger, delta=cfg.delta, accountant=cfg.accountant)
    dp = cfg.dp == "sample"
    unit = privacy.PRIVACY_UNIT_SAMPLE if dp else "none"
    results.write_json(
        state.run_dir / results.PRIVACY,
        {
            "privacy_unit": unit,
            "accountant": cfg.accountant,
            "delta": cfg.delta,
            "sampling": privacy.SAMPLING,
            "clients": privacy.ledger_to_json(ledger),
        },
    )
    last = state.rows[-1]
    summary = {
        "accuracy": last["accuracy"],
        "loss": last["loss"],
        "epsilon": eps if dp else None,
        "delta": cfg.delta if dp else None,
        "privacy_unit": unit,
        "accountant": cfg.accountant if dp else None,
        "sampling": privacy.SAMPLING if dp else None,
        "epsilon_max_client": worst,
        "noise_multiplier": cfg.noise_multiplier if dp else 0.0,
        "max_grad_norm": cfg.max_grad_norm if dp else None,
        "epsilon_per_round": [r["epsilon"] for r in state.rows],
        "num_rounds": cfg.num_rounds,
        "num_clients": cfg.num_clients,
        "wall_seconds": round(time.time() - state.started, 2),
        "config": cfg.to_flat(),
    }
    results.write_json(state.run_dir / results.SUMMARY, summary)
    return summary
