"""The aggregation and server optimizer of a run: one of Flower's strategies, or yours.

``strategy`` names fedavg, fedavgm, fedprox, fedadam, fedyogi or fedadagrad from
``flwr.serverapp.strategy``, or the import path of a Message-API strategy class, built
with FedAvg's keyword arguments. fedsim samples each round's cohort itself and gives the
strategy the replies in client order (``server.strategy.Cohorts``); under user-level DP
it gives the strategy only the noised average, so that whatever the strategy does after
(a server optimizer) is post-processing.

A strategy's state (server momentum, Adam's moments) is checkpointed every round, so a
resumed run continues where it stopped.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from fedsim.config import FedsimConfig, strategy_refusal
from fedsim.errors import FedsimError
from fedsim.messages import ARRAYS, CONFIG, WEIGHT_KEY
from fedsim.registry import STRATEGIES, STRATEGY_ARGS, resolve

# fedsim places clients on nodes and evaluates centrally: the strategy samples "all" of
# the one template node it is shown and never configures federated evaluation
COMMON = {
    "fraction_train": 1.0,
    "fraction_evaluate": 0.0,
    "min_train_nodes": 1,
    "min_evaluate_nodes": 1,
    "min_available_nodes": 1,
    "weighted_by_key": WEIGHT_KEY,
    "arrayrecord_key": ARRAYS,
    "configrecord_key": CONFIG,
}


def build_algorithm(config: FedsimConfig) -> Strategy:
    """The strategy ``config`` names, with the keys that apply to it."""
    flat = config.to_flat()
    args = {arg: flat[key] for key, arg in STRATEGY_ARGS.get(config.strategy, {}).items()}
    factory = resolve(config.strategy, STRATEGIES, "strategy")
    try:
        strategy = factory(**COMMON, **args)
    except TypeError as exc:
        raise FedsimError(
            f"strategy '{config.strategy}' could not be built with FedAvg's keyword "
            f"arguments ({exc}); give a class that takes them, as Flower's strategies do"
        ) from None
    if not isinstance(strategy, Strategy):
        raise FedsimError(
            f"strategy '{config.strategy}' built a {type(strategy).__name__}, not a "
            "flwr.serverapp.strategy.Strategy"
        )
    refusal = strategy_refusal(config, strategy)  # a factory's product: seen only now
    if refusal:
        raise FedsimError(f"config: {refusal}")
    return strategy


def algorithm_state(strategy: Strategy) -> dict[str, tuple[str, Any]]:
    """The strategy's arrays (server optimizer state), as tensors a checkpoint can hold."""
    state: dict[str, tuple[str, Any]] = {}
    for name, value in vars(strategy).items():
        if isinstance(value, ArrayRecord):
            state[name] = ("arrays", value.to_torch_state_dict())
        elif isinstance(value, np.ndarray):
            state[name] = ("ndarray", torch.from_numpy(value.copy()))
        elif isinstance(value, list) and _arrays(value):
            state[name] = ("list", [torch.from_numpy(v.copy()) for v in value])
        elif isinstance(value, dict) and _arrays(list(value.values())):
            state[name] = ("dict", {k: torch.from_numpy(v.copy()) for k, v in value.items()})
    return state


def restore_algorithm(strategy: Strategy, state: dict[str, tuple[str, Any]]) -> None:
    """Put a checkpoint's :func:`algorithm_state` back into ``strategy``."""
    for name, (kind, value) in state.items():
        if kind == "arrays":
            setattr(strategy, name, ArrayRecord(value))
        elif kind == "ndarray":
            setattr(strategy, name, value.numpy())
        elif kind == "list":
            setattr(strategy, name, [v.numpy() for v in value])
        else:
            setattr(strategy, name, {k: v.numpy() for k, v in value.items()})


def _arrays(items: list) -> bool:
    return bool(items) and all(isinstance(v, np.ndarray) for v in items)
