"""The federated run: discover clients, solve σ, run rounds, account, write results."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from fedsim import results
from fedsim.config import FedsimConfig, check_delta
from fedsim.data import (
    Dataset,
    load_dataset,
    natural_users,
    partition_dataset,
    vocab_record,
)
from fedsim.dp import (
    UserCanaries,
    run_schedules,
    secure_root,
    seeded_root,
    solve_noise_multiplier,
)
from fedsim.messages import ClientInfo
from fedsim.models import build_model, check_client_model, evaluate, model_kwargs, run_device
from fedsim.results import RoundRow
from fedsim.server import audit, outputs
from fedsim.server.algorithms import algorithm_state, build_algorithm, restore_algorithm
from fedsim.server.discovery import discover_clients, partition_infos, wait_for_nodes
from fedsim.server.grouping import GroupedGrid
from fedsim.server.rounds import PULL_INTERVAL_S, SIMULATION_PULL_S, ReplyFn, run_rounds
from fedsim.server.state import RunState, restore, save_checkpoint, save_tensors
from fedsim.server.strategy import Cohorts, OwnStrategy, PrivacyLedger
from fedsim.server.user_dp import UserLevelDP, running_variances

RoundCallback = Callable[[RoundRow], None]


def resolve_noise(config: FedsimConfig, infos: list[ClientInfo]) -> FedsimConfig:
    """Fix every σ left at 0 before round 1, so the run ends within its target ε.

    The sample unit's σ is solved on the schedule each client's loader runs
    (:func:`fedsim.dp.schedule.poisson_schedule`), the one its ledger records.
    """
    sizes = [info.num_examples for info in infos]
    check_delta(config, sum(sizes))  # each node's own data, under deployment
    update = {}
    for key, (target, schedules) in noise_targets(config, sizes).items():
        update[key] = solve_noise_multiplier(
            target_epsilon=target, delta=config.delta, accountant=config.accountant,
            schedules=schedules,
        )  # fmt: skip
    return config.model_copy(update=update)


def noise_targets(
    config: FedsimConfig, sizes: list[int]
) -> dict[str, tuple[float, list[tuple[float, int]]]]:
    """Each σ left at 0, by field: its target ε and the (q, steps) schedules it is solved on.

    ``sizes``: the clients' example counts. The sample unit's schedules are the ones each
    client's loader runs; the user unit's is the cohort rate over all rounds.
    """
    targets = {}
    if config.dp_sample and config.noise_multiplier == 0:
        schedules = run_schedules(
            sizes, batch_size=config.batch_size, epochs=config.local_epochs,
            rounds=config.num_rounds,
        )  # fmt: skip
        targets["noise_multiplier"] = (config.target_epsilon, schedules)
    if config.dp_user and config.user_noise_multiplier == 0:
        user = [(config.cohort_rate, config.num_rounds)]
        targets["user_noise_multiplier"] = (config.user_target_epsilon, user)
    return targets


def build_strategy(
    state: RunState,
    nodes: list[int],
    *,
    bound: bool,
    root: bytes,
    canaries: UserCanaries | None = None,
    variances: frozenset[str] = frozenset(),
) -> tuple[PrivacyLedger, UserLevelDP | None, Strategy]:
    """The configured strategy in fedsim's cohorts, user-level DP and the ledger around it.

    Returns the outermost wrapper, the user-level DP wrapper (or None) and the strategy
    itself (its state is checkpointed). ``nodes`` and ``bound`` place clients on Flower
    nodes (:func:`fedsim.server.strategy.place`); ``root`` is the run's randomness root
    (``fedsim.dp.randomness``) for cohorts and noise; ``canaries``: a user-level audit's
    canary clients, which take part inside DP-FedAvg; ``variances``: the model's running
    variances (``user_dp.running_variances``), which DP-FedAvg clips at 0.
    """
    cfg = state.config
    algorithm = build_algorithm(cfg)
    restore_algorithm(algorithm, state.strategy)
    own = ":" in cfg.strategy  # a strategy of one's own: its errors name it
    strategy: Strategy = Cohorts(
        OwnStrategy(algorithm, cfg.strategy) if own else algorithm,
        num_clients=cfg.num_clients,
        nodes=nodes,
        bound=bound,
        clients_per_round=cfg.clients_per_round,
        root=root,
        poisson=cfg.dp_user,
    )
    user_dp = None
    if cfg.dp_user:
        strategy = user_dp = UserLevelDP(
            strategy,
            ledger=state.user_ledger,
            sample_rate=cfg.cohort_rate,
            noise_multiplier=cfg.user_noise_multiplier,
            clip_norm=state.clip_norm or cfg.max_update_norm,
            expected_cohort=cfg.clients_per_round,
            root=root,
            clip_quantile=cfg.clip_quantile,
            clip_lr=cfg.clip_lr,
            count_noise=cfg.clip_count_noise,
            canaries=canaries,
            nonnegative=variances,
        )
    ledger = PrivacyLedger(strategy, state.ledger, expected=lambda c: state.prescribed[c])
    return ledger, user_dp, algorithm


def start_state(
    grid: Grid, config: FedsimConfig, dataset: Dataset, run_dir: Path, *, node_per_client: bool
) -> tuple[RunState, list[int]]:
    """A fresh run's state, or the checkpointed one in ``run_dir``; and the node list.

    With ``node_per_client`` (SuperNodes, each with its partition or its own data) every
    node is asked what it holds, and ``nodes[c]`` is client c's node. Otherwise (a
    simulation) the nodes are workers: the server reads the partition sizes from its own
    copy of the data and asks no node anything.
    """
    parts = None
    if node_per_client:
        clients = discover_clients(grid, config)
        infos = [clients[c][1] for c in sorted(clients)]
        nodes = [clients[c][0] for c in sorted(clients)]
    else:
        parts = partition_dataset(dataset, config)
        infos = partition_infos(dataset, parts, share_labels=config.share_label_counts)
        infos = audit.with_canaries(infos, config, dataset)  # σ and the ledger count them
        nodes = wait_for_nodes(grid, config.simulation_workers)
    resumed = restore(run_dir, infos)
    if resumed is not None:  # resume: the checkpoint's config (σ included) wins
        return resumed, nodes
    outputs.write_partition(run_dir, infos, natural_users(dataset, config, parts))
    if dataset.vocab is not None:
        results.write_json(run_dir / results.VOCAB, vocab_record(dataset))
    return RunState(resolve_noise(config, infos), infos), nodes


def checked_dataset(config: FedsimConfig) -> Dataset:
    """The config's data, loaded, with the model checked against it.

    For ``flwr run``: ``fedsim run`` and ``fedsim deploy`` check both before the engine
    starts and pass the dataset in.
    """
    dataset = load_dataset(config.dataset, config.data_dir)
    check_client_model(config, dataset)
    return dataset


def server_model(
    config: FedsimConfig, dataset: Dataset, arrays: dict[str, torch.Tensor] | None, device: str
) -> tuple[nn.Module, np.ndarray, tuple[torch.Tensor, torch.Tensor]]:
    """The server's model on ``device`` (where the clients train), and the test split there.

    Returns the model (holding ``arrays``, a resumed run's weights, where given), the
    seed's initial weights as one vector (the audit's start, resumed or not), and
    ``(x_test, y_test)``, moved once. Evaluation needs no per-sample gradients: DP layers
    share the plain model's state_dict.
    """
    torch.manual_seed(config.seed)
    model = build_model(config.model, **model_kwargs(dataset), dp=False).to(device)
    start = audit.model_vector(model.state_dict())
    if arrays is not None:
        model.load_state_dict(arrays)
    test = torch.as_tensor(dataset.x_test).to(device), torch.as_tensor(dataset.y_test).to(device)
    return model, start, test


def save_round(
    state: RunState, run_dir: Path, weights: dict[str, torch.Tensor], strategy: dict
) -> None:
    """Keep a finished round in ``state`` and on disk: the checkpoint, then rounds.csv.

    In that order a round is never in rounds.csv without being in the checkpoint: a run
    killed between the two resumes after the round, and never releases it a second time
    with fresh noise.
    """
    state.arrays = {k: v.detach().cpu().clone() for k, v in weights.items()}
    state.strategy = strategy
    save_checkpoint(run_dir, state.to_checkpoint())
    results.write_csv(
        run_dir / results.ROUNDS, [r.to_csv() for r in state.rows], results.ROUND_FIELDS
    )


AfterRound = Callable[[int, ArrayRecord | None, dict[int, str]], None]


def round_recorder(
    state: RunState,
    run_dir: Path,
    *,
    model: nn.Module,
    test: tuple[torch.Tensor, torch.Tensor],
    device: str,
    wrappers: tuple[PrivacyLedger, UserLevelDP | None, Strategy],
    on_round: RoundCallback,
) -> AfterRound:
    """What follows each round: load the aggregate, evaluate, keep the row, save, report.

    ``wrappers`` is what :func:`build_strategy` returns. The returned function takes the
    round's number, its aggregated weights (``None`` for round 0 or a round without an
    aggregate) and the clients dropped from it.
    """
    ledger, user_dp, algorithm = wrappers
    clock = [time.time()]

    def after_round(server_round: int, arrays: ArrayRecord | None, dropped: dict[int, str]) -> None:
        if arrays is not None:
            model.load_state_dict(arrays.to_torch_state_dict())
        if user_dp is not None:
            state.clip_norm = user_dp.clip_norm
        loss, acc = evaluate(model, *test, device=device)
        # seconds since the last round's row: training, aggregation, evaluation, accounting
        # and the last round's checkpoint: no time between rounds goes unrecorded
        now = time.time()
        row, participation = outputs.round_rows(
            state,
            server_round,
            loss,
            acc,
            cohort=ledger.sampled.get(server_round, []),
            dropped=dropped,
            clip_norm=state.clip_norm if user_dp is not None else None,
            seconds=now - clock[0],
        )
        clock[0] = now
        state.rows.append(row)
        state.participation.append(participation)
        save_round(state, run_dir, model.state_dict(), algorithm_state(algorithm))
        on_round(row)

    return after_round


def run_federation(
    grid: Grid,
    config: FedsimConfig,
    *,
    run_dir: Path,
    on_round: RoundCallback,
    dataset: Dataset | None = None,
    started: float | None = None,
    stop: threading.Event | None = None,
    node_per_client: bool = True,
    on_reply: ReplyFn | None = None,
) -> dict:
    """Run (or resume) a whole experiment on ``grid``, writing results to ``run_dir``.

    ``node_per_client`` False: a simulation with ``config.simulation_workers`` worker nodes;
    True: the deployment engine, one SuperNode per client.
    ``dataset``: the config's data, where the caller has already loaded it.
    ``on_round`` gets each finished round's row, ``on_reply`` each reply inside a round.

    Returns
    -------
    dict
        The contents of ``summary.json``.

    """
    started = started or time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    # one copy for partitions, partition.csv, vocab.json and evaluation
    dataset = checked_dataset(config) if dataset is None else dataset
    state, nodes = start_state(grid, config, dataset, run_dir, node_per_client=node_per_client)
    cfg = state.config
    if not node_per_client and cfg.clients_per_worker > 1:
        grid = GroupedGrid(grid, cfg.clients_per_worker)
    device = run_device(cfg.client_gpus)
    model, start, test = server_model(cfg, dataset, state.arrays, device)
    # before any round: nothing here may fail after the training it describes
    training = outputs.training_record(cfg, dataset, device, per_node=node_per_client)
    # never stored: with secure-noise nobody, not even this folder, can rebuild the noise
    root = secure_root() if cfg.secure_noise else seeded_root(cfg.seed)
    canaries = audit.user_canaries(cfg, len(start))
    variances = running_variances(model)  # DP-FedAvg clips them at 0
    wrappers = build_strategy(
        state, nodes, bound=node_per_client, root=root, canaries=canaries, variances=variances
    )
    after_round = round_recorder(
        state, run_dir, model=model, test=test, device=device, wrappers=wrappers, on_round=on_round
    )
    if not state.rows:
        after_round(0, None, {})
    run_rounds(
        wrappers[0],  # the outermost: the ledger around user-level DP, cohorts, strategy
        grid,
        ArrayRecord({k: v.cpu() for k, v in model.state_dict().items()}),
        rounds=range(len(state.rows), cfg.num_rounds + 1),
        train_config=ConfigRecord(cfg.to_flat()),
        timeout=cfg.round_timeout,
        min_clients=cfg.min_clients,
        on_round=after_round,
        stop=stop,
        on_reply=on_reply,
        abandon=not node_per_client,
        poll_s=PULL_INTERVAL_S if node_per_client else SIMULATION_PULL_S,
        secret=cfg.dp_user,
        withhold=cfg.dp_sample,
    )
    save_tensors(run_dir / results.MODEL, state.arrays)
    engine = "deployment" if node_per_client else "simulation"
    record = audit.audit_final_model(cfg, dataset, model, device=device, start=start)
    return outputs.write_final(
        state, run_dir, started, engine=engine, training=training, audit=record,
        overlap=dataset.overlap,
    )  # fmt: skip
