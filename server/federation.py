"""The federated run: discover clients, solve σ, run rounds, account, write results."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType
from flwr.serverapp import Grid

from fedsim import results
from fedsim.config import FedsimConfig, parse_config
from fedsim.data import load_dataset
from fedsim.errors import FedsimError
from fedsim.evaluation import evaluate
from fedsim.messages import ClientInfo, PrivacySpent, decode_client_info, encode_config
from fedsim.models import build_model
from server import privacy
from server.rounds import run_rounds
from server.strategy import PrivacyLedger, SeededFedAvg, sample_clients

RoundCallback = Callable[[dict], None]
CONNECT_TIMEOUT_S = 300.0


@dataclass
class RunState:
    """Everything a run accumulates; what a checkpoint saves."""

    config: FedsimConfig
    infos: list[ClientInfo]
    ledger: privacy.Ledger = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    arrays: dict | None = None  # global model state_dict after the last finished round

    def to_checkpoint(self) -> dict:
        """Plain data for :func:`fedsim.results.save_checkpoint`."""
        return {
            "config": self.config.to_flat(),
            "infos": [asdict(i) for i in self.infos],
            "ledger": privacy.ledger_to_json(self.ledger),
            "rows": self.rows,
            "arrays": self.arrays,
        }

    @classmethod
    def from_checkpoint(cls, data: dict) -> RunState:
        """Inverse of :meth:`to_checkpoint`."""
        infos = [
            ClientInfo(i["partition_id"], i["num_examples"], tuple(i["label_counts"]))
            for i in data["infos"]
        ]
        return cls(
            parse_config(data["config"]),
            infos,
            privacy.ledger_from_json(data["ledger"]),
            list(data["rows"]),
            data["arrays"],
        )


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


def expected_spend(config: FedsimConfig, info: ClientInfo) -> PrivacySpent:
    """What one round of DP-SGD costs a client: charged when its reply is missing."""
    if config.dp != "sample":
        return PrivacySpent()
    q, steps = privacy.dp_schedule(
        info.num_examples, batch_size=config.batch_size, epochs=config.local_epochs
    )
    return PrivacySpent((config.noise_multiplier,), (q,), (steps,))


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


def start_state(grid: Grid, config: FedsimConfig, run_dir: Path) -> tuple[RunState, dict]:
    """A fresh run's state, or the checkpointed one in ``run_dir``; and the client map."""
    clients = discover_clients(grid, config)
    checkpoint = results.load_checkpoint(run_dir)
    if checkpoint is not None:  # resume: the checkpoint's config (σ included) wins
        return RunState.from_checkpoint(checkpoint), clients
    infos = [clients[c][1] for c in sorted(clients)]
    write_partition(run_dir, infos)
    return RunState(resolve_noise(config, infos), infos), clients


def run_federation(
    grid: Grid,
    config: FedsimConfig,
    *,
    run_dir: Path,
    on_round: RoundCallback,
    started: float | None = None,
    stop: threading.Event | None = None,
) -> dict:
    """Run (or resume) a whole experiment on ``grid``, writing results to ``run_dir``.

    Returns
    -------
    dict
        The contents of ``summary.json``.

    """
    started = started or time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    state, clients = start_state(grid, config, run_dir)
    cfg = state.config
    dataset = load_dataset(cfg.dataset, cfg.data_dir)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, input_shape=dataset.input_shape, num_classes=dataset.num_classes)
    if state.arrays is not None:
        model.load_state_dict(state.arrays)
    client_of_node = {node: c for c, (node, _) in clients.items()}
    strategy = PrivacyLedger(
        SeededFedAvg(
            nodes={c: node for c, (node, _) in clients.items()},
            clients_per_round=cfg.clients_per_round,
            seed=cfg.seed,
        ),
        state.ledger,
        client_of_node=client_of_node,
        expected={info.partition_id: expected_spend(cfg, info) for info in state.infos},
    )
    clock = [time.time()]

    def after_round(server_round: int, arrays: ArrayRecord | None, dropped: dict[int, str]) -> None:
        if arrays is not None:
            model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = evaluate(model, dataset.x_test, dataset.y_test)
        row = round_row(cfg, state.ledger, server_round, loss, acc, dropped, time.time() - clock[0])
        clock[0] = time.time()
        state.rows.append(row)
        state.arrays = {k: v.detach().clone() for k, v in model.state_dict().items()}
        results.write_csv(run_dir / results.ROUNDS, state.rows, results.ROUND_FIELDS)
        results.save_checkpoint(run_dir, state.to_checkpoint())
        on_round(row)

    if not state.rows:
        after_round(0, None, {})
    run_rounds(
        strategy,
        grid,
        ArrayRecord(model.state_dict()),
        rounds=range(len(state.rows), cfg.num_rounds + 1),
        train_config=ConfigRecord(cfg.to_flat()),
        client_of_node=client_of_node,
        timeout=cfg.round_timeout,
        min_clients=cfg.min_clients,
        on_round=after_round,
        stop=stop,
    )
    torch.save(state.arrays, run_dir / results.MODEL)
    return write_final(state, run_dir, started)


def round_row(
    cfg: FedsimConfig,
    ledger: privacy.Ledger,
    server_round: int,
    loss: float,
    acc: float,
    dropped: dict[int, str],
    seconds: float,
) -> dict:
    """One row of ``rounds.csv``."""
    eps, _ = privacy.run_epsilon(ledger, delta=cfg.delta, accountant=cfg.accountant)
    if cfg.dp == "none" and server_round > 0:
        eps = float("inf")  # non-private training protects nothing
    chosen = []
    if server_round > 0:
        chosen = sample_clients(
            cfg.num_clients, cfg.clients_per_round, seed=cfg.seed, server_round=server_round
        )
    return {
        "round": server_round,
        "accuracy": round(acc, 6),
        "loss": round(loss, 6),
        "epsilon": eps,
        "seconds": round(seconds, 3),
        "clients": " ".join(map(str, chosen)),
        "dropped": "; ".join(f"{c}: {r}" for c, r in sorted(dropped.items())),
    }


def write_partition(run_dir: Path, infos: list[ClientInfo]) -> None:
    """``partition.csv``: one row per client with its size and label counts."""
    num_classes = max(len(i.label_counts) for i in infos)
    fields = ("client", "num_examples", *(f"label_{k}" for k in range(num_classes)))
    rows = [
        {"client": i.partition_id, "num_examples": i.num_examples}
        | {f"label_{k}": n for k, n in enumerate(i.label_counts)}
        for i in infos
    ]
    results.write_csv(run_dir / results.PARTITION, rows, fields)


def write_final(state: RunState, run_dir: Path, started: float) -> dict:
    """Write ``privacy.json`` and ``summary.json``; return the summary."""
    cfg, ledger = state.config, state.ledger
    eps, worst = privacy.run_epsilon(ledger, delta=cfg.delta, accountant=cfg.accountant)
    dp = cfg.dp == "sample"
    unit = privacy.PRIVACY_UNIT_SAMPLE if dp else "none"
    results.write_json(
        run_dir / results.PRIVACY,
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
        "epsilon_per_round": [r["epsilon"] if dp else None for r in state.rows],
        "dropped_per_round": {r["round"]: r["dropped"] for r in state.rows if r["dropped"]},
        "num_rounds": cfg.num_rounds,
        "num_clients": cfg.num_clients,
        "wall_seconds": round(time.time() - started, 2),
        "config": cfg.to_flat(),
    }
    results.write_json(run_dir / results.SUMMARY, summary)
    return summary
