"""A client's round as plain functions: one client (``train_round``) or a group at once.

``train_group`` trains the clients a worker was sent together (``clients-per-worker``)
with ``fedsim.dp.train_cohort``: the same mechanism per client, draw for draw, as
``train_round`` (Poisson masks and noise from the client's own streams, the same
schedule and so the same ledger entry), vectorized over clients.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from fedsim.clients.task import client_tensors, model_spec
from fedsim.clients.training import all_finite, train_local
from fedsim.config import FedsimConfig
from fedsim.dp import (
    Purpose,
    dp_randomness,
    numpy_generator,
    poisson_schedule,
    secure_root,
    seeded_root,
    stream_seed,
    train_cohort,
)
from fedsim.errors import FedsimError, first_line
from fedsim.messages import PrivacySpent, TrainReport
from fedsim.models import build_model, run_device

State = dict[str, torch.Tensor]


def train_round(
    config: FedsimConfig,
    pid: int,
    server_round: int,
    state: State,
    *,
    local_dir: str | None = None,
) -> tuple[State, TrainReport]:
    """One client's local training in one round.

    Its randomness comes from streams keyed by (round, client) under a root that is
    fresh from the operating system with ``secure-noise``, or the config's seed otherwise.
    """
    torch.set_num_threads(max(1, int(config.client_cpus)))
    return _train_one(config, pid, server_round, state, _root(config), local_dir)


def _train_one(
    config: FedsimConfig,
    pid: int,
    server_round: int,
    state: State,
    root: bytes,
    local_dir: str | None = None,
) -> tuple[State, TrainReport]:
    """:func:`train_round` with the streams of ``root``."""
    device = run_device(config.client_gpus)
    # dropout and other non-DP randomness; torch's global seed keeps only 32 bits of it
    torch.manual_seed(_local_seed(root, server_round, pid))
    randomness = dp_randomness(
        root, server_round=server_round, client=pid, device=device, secure=config.secure_noise
    )
    x, y = client_tensors(config, pid, device=device, local_dir=local_dir)
    spec = model_spec(config, local_dir=local_dir)
    model = build_model(config.model, **spec, dp=config.dp_sample)
    try:
        model.load_state_dict(state)
    except RuntimeError:
        if local_dir is None:
            raise
        raise FedsimError(
            f"this node's data ({config.dataset} in {local_dir}) has input shape "
            f"{spec['input_shape']} and {spec['num_classes']} classes, which do not fit the "
            "server's model; give every node data of the server's dataset format"
        ) from None
    _, spent = train_local(
        model, x, y, **_options(config), grad_sample=config.grad_sample, device=device,
        randomness=randomness,
    )  # fmt: skip
    new_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return new_state, TrainReport(pid, len(y), spent)


def train_group(
    config: FedsimConfig, clients: list[int], server_round: int, state: State
) -> dict[int, tuple[State, TrainReport] | str]:
    """Several clients' :func:`train_round` at once, from one global ``state``.

    Each client's update equals what ``train_round`` gives it, up to float rounding
    (tests/test_grouping.py): its Poisson masks and noise, or without DP its shuffles,
    come from the same streams, drawn in the same order. A client's value is a string
    where it has no update: why. One client's failure takes no other client's update
    with it (a group that fails trains again one client at a time), so a client's data
    changes no other client's reply.
    """
    torch.set_num_threads(max(1, int(config.client_cpus)))
    device = run_device(config.client_gpus)
    root = _root(config)
    try:
        data = [client_tensors(config, pid, device=device) for pid in clients]
        streams = [
            dp_randomness(
                root, server_round=server_round, client=pid, device=device,
                secure=config.secure_noise,
            )
            for pid in clients
        ]  # fmt: skip
        updates = train_cohort(
            # built as train_round builds it: the cohort's template is the model the checks
            # before round 1 (fedsim.models.check_client_model) ran a cohort step of
            build_model(config.model, **model_spec(config), dp=config.dp_sample),
            [state] * len(clients),
            [(torch.as_tensor(x), torch.as_tensor(y)) for x, y in data],
            **_options(config),
            randomness=streams,
            device=device,
        )
    except Exception:  # whichever client raised, the others still train
        return {pid: _alone(config, pid, server_round, state, root) for pid in clients}
    out: dict[int, tuple[State, TrainReport] | str] = {}
    for pid, (_, y), update in zip(clients, data, updates, strict=True):
        if not all_finite(update.state):
            # a sample with a non-finite gradient (an extreme input, say): train_local
            # leaves it out, from the same streams, so the update is what it would be alone
            out[pid] = _alone(config, pid, server_round, state, root)
            continue
        spent = _spent(config, len(y))
        new_state = {k: v.detach().cpu() for k, v in update.state.items()}
        out[pid] = (new_state, TrainReport(pid, len(y), spent))
    return out


def _alone(
    config: FedsimConfig, pid: int, server_round: int, state: State, root: bytes
) -> tuple[State, TrainReport] | str:
    """One client of a group trained on its own, from the group's streams; or why not."""
    try:
        return _train_one(config, pid, server_round, state, root)
    except Exception as exc:  # its own failure, reported as the one-by-one path's would be
        return first_line(exc)


def _options(config: FedsimConfig) -> dict[str, Any]:
    """The training keywords that ``train_local`` and ``train_cohort`` share."""
    return {
        "epochs": config.local_epochs,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "momentum": config.momentum,
        "noise_multiplier": config.noise_multiplier if config.dp_sample else None,
        "max_grad_norm": config.max_grad_norm,
        "all_positions": config.all_positions,
        "proximal_mu": config.proximal_mu,
    }


def _root(config: FedsimConfig) -> bytes:
    return secure_root() if config.secure_noise else seeded_root(config.seed)


def _local_seed(root: bytes, server_round: int, pid: int) -> int:
    seed = stream_seed(root, purpose=Purpose.LOCAL, server_round=server_round, client=pid)
    return int.from_bytes(seed[:8], "little")


def _spent(config: FedsimConfig, num_examples: int) -> PrivacySpent:
    """What Opacus's accountant records for one client's round: one run of equal steps."""
    if not config.dp_sample:
        return PrivacySpent()
    schedule = poisson_schedule(
        num_examples, batch_size=config.batch_size, epochs=config.local_epochs
    )
    return PrivacySpent((config.noise_multiplier,), (schedule.sample_rate,), (schedule.steps,))


def fault_draws(config: FedsimConfig, pid: int, server_round: int) -> tuple[bool, bool]:
    """Whether a client straggles, and whether it drops out, in ``server_round``.

    Drawn as the noise is: from the config's seed, or with ``secure-noise`` from the
    operating system. Under secret cohorts (user-level DP) a straggler that whoever knows
    the seed could name would show, by the round's time, that it was sampled.
    """
    seed = stream_seed(_root(config), purpose=Purpose.FAULTS, server_round=server_round, client=pid)
    straggle, drop = numpy_generator(seed).random(2)
    return bool(straggle < config.straggler_prob), bool(drop < config.client_dropout)


def simulate_faults(config: FedsimConfig, clients: list[int], server_round: int) -> set[int]:
    """Straggle, as configured, after training; the clients that drop out.

    A group waits ``straggler-delay`` once if any of its clients straggles: its clients
    reply together. Dropping out *after* training is the worst case for privacy: the data
    was used but the server never sees the spend, so the server charges the prescribed one.
    """
    draws = {pid: fault_draws(config, pid, server_round) for pid in clients}
    if any(straggles for straggles, _ in draws.values()):
        time.sleep(config.straggler_delay)
    return {pid for pid, (_, drops) in draws.items() if drops}
