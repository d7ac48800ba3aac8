"""The parts a config names, as light tables: validating a config imports no torch.

A part is a built-in name (``cnn``) or the import path of one of your own
(``"mypkg.nets:MLP"``), the way Flower names an app's components. :func:`resolve` imports
it by that name, which is also how every worker process (Ray's, a SuperNode's) finds it:

- a model is called with the keywords ``input_shape``, ``num_classes``, ``task``,
  ``vocab_size`` and ``dp`` and returns a ``torch.nn.Module`` (``fedsim.models``); a
  ``tasks`` attribute, where it has one, names the tasks it learns;
- a dataset is called with the data folder (a ``Path``, or None) and returns a
  ``fedsim.data.Dataset``;
- a partition is called with ``(dataset, num_clients, rng)`` and returns one array of
  training-sample indices per client (``fedsim.data.partition``);
- a strategy is a Flower Message-API strategy class, built with FedAvg's keyword
  arguments (``fedsim.server.algorithms``).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsim.errors import FedsimError, first_line

# What a dataset asks of a model. Images are float (C, H, W); text is int token ids of a
# fixed length, right-padded; next-char samples are windows of characters whose label is
# the character that follows.
IMAGE, TEXT_CLASSIFICATION, NEXT_CHAR = "image", "text-classification", "next-char"
HUB_PREFIX = "hf:"  # a data-dir that names a Hugging Face hub dataset, not a folder
TASKS = (IMAGE, TEXT_CLASSIFICATION, NEXT_CHAR)


@dataclass(frozen=True)
class Part:
    """A built-in part: where it lives, and the tasks it learns (models) or poses (data)."""

    target: str  # "module:attr"
    tasks: tuple[str, ...] = ()


MODELS: dict[str, Part] = {
    "cnn": Part("fedsim.models.image:cnn", (IMAGE,)),
    "fedavg-cnn": Part("fedsim.models.image:fedavg_cnn", (IMAGE,)),
    "lstm": Part("fedsim.models.sequence:LSTMNet", TASKS),
    "transformer": Part("fedsim.models.sequence:TransformerNet", TASKS),
}
DATASETS: dict[str, Part] = {
    "digits": Part("fedsim.data.dataset:load_digits", (IMAGE,)),
    "mnist": Part("fedsim.data.images:load_mnist", (IMAGE,)),
    "fashion-mnist": Part("fedsim.data.images:load_fashion_mnist", (IMAGE,)),
    "cifar10": Part("fedsim.data.images:load_cifar10", (IMAGE,)),
    "shakespeare": Part("fedsim.data.shakespeare:load_shakespeare", (NEXT_CHAR,)),
    "shakespeare-disjoint": Part("fedsim.data.shakespeare:load_shakespeare_disjoint", (NEXT_CHAR,)),
    "sst2": Part("fedsim.data.text:load_sst2", (TEXT_CLASSIFICATION,)),
    "sms-spam": Part("fedsim.data.text:load_sms_spam", (TEXT_CLASSIFICATION,)),
    "hf-image": Part("fedsim.data.hf:load_hf_image", (IMAGE,)),
    "hf-text": Part("fedsim.data.hf:load_hf_text", (TEXT_CLASSIFICATION,)),
}
PARTITIONS: dict[str, Part] = {
    name: Part(f"fedsim.data.partition:{name}")
    for name in ("iid", "dirichlet", "shards", "natural")
}
_FLOWER = "flwr.serverapp.strategy"
STRATEGIES: dict[str, Part] = {
    "fedavg": Part(f"{_FLOWER}:FedAvg"),
    "fedavgm": Part(f"{_FLOWER}:FedAvgM"),
    "fedprox": Part(f"{_FLOWER}:FedProx"),
    "fedadam": Part(f"{_FLOWER}:FedAdam"),
    "fedyogi": Part(f"{_FLOWER}:FedYogi"),
    "fedadagrad": Part(f"{_FLOWER}:FedAdagrad"),
}
# strategy -> {config key: the keyword of the strategy's class it sets}
_FEDOPT = {
    "server-lr": "eta",
    "server-momentum": "beta_1",
    "server-beta2": "beta_2",
    "server-tau": "tau",
    "lr": "eta_l",
}
STRATEGY_ARGS: dict[str, dict[str, str]] = {
    "fedavgm": {"server-lr": "server_learning_rate", "server-momentum": "server_momentum"},
    "fedprox": {"proximal-mu": "proximal_mu"},
    "fedadam": _FEDOPT,
    "fedyogi": _FEDOPT,
    "fedadagrad": {"server-lr": "eta", "server-tau": "tau", "lr": "eta_l"},
}
# Aggregations whose output one client can move without bound, or that reweight clients
# by their losses: the user-level noise (on a clipped, unweighted sum) does not cover them.
NOT_A_SUM = ("FedMedian", "FedTrimmedAvg", "Krum", "MultiKrum", "Bulyan", "QFedAvg")
# Datasets whose samples belong to natural users, and what one user is.
# built-in datasets that read no data-dir: a node's own folder would be ignored, and every
# node would train on the same examples, which each client's ledger counts as its own
FOLDERLESS = frozenset({"digits"})
NATURAL_USERS: dict[str, str] = {
    "shakespeare": "speaking role",
    "shakespeare-disjoint": "speaking role",
}


def is_import_path(name: str) -> bool:
    """Whether ``name`` is ``"module:attr"`` rather than a built-in name."""
    return ":" in name


# what a part of one's own must have, where that can be seen without calling it
REQUIRED = {"strategy": ("configure_train", "aggregate_train", "configure_evaluate")}


def check_name(name: str, table: Mapping[str, Part], what: str) -> str:
    """``name``, if it is built in or an import path whose object exists; one line if not."""
    if name in table:
        return name
    obj = resolve(name, table, what)
    # a class must have them; a factory's product is checked once it is called
    wanted = REQUIRED.get(what, ()) if isinstance(obj, type) else ()
    missing = [attr for attr in wanted if not hasattr(obj, attr)]
    if missing:
        raise FedsimError(
            f"{what} '{name}': {getattr(obj, '__name__', name)} has no {missing[0]}, so it "
            "is no Flower Message-API strategy; name a subclass of "
            "flwr.serverapp.strategy.Strategy (FedAvg, say)"
        )
    return name


def resolve(name: str, table: Mapping[str, Part], what: str) -> Any:
    """The callable ``name`` stands for: a built-in part, or the one at an import path."""
    if name not in table and not is_import_path(name):
        near = [k for k in table if k.lower() == name.lower()]
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise FedsimError(
            f"unknown {what} '{name}'; {hint}choose one of {', '.join(sorted(table))}, "
            "or give your own as 'module:attr'"
        )
    module_name, _, attr = (table[name].target if name in table else name).partition(":")
    obj: Any = _imported(module_name, f"{what} '{name}'")
    for part in attr.split("."):
        if not hasattr(obj, part):
            where = getattr(importlib.import_module(module_name), "__file__", None)
            found = f" (the module found is {where})" if where else ""
            raise FedsimError(f"{what} '{name}': {module_name} has no attribute {attr}{found}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise FedsimError(f"{what} '{name}': {attr} is a {type(obj).__name__}, not callable")
    return obj


def _imported(module_name: str, what: str) -> Any:
    """The module, or one line: it is missing, or importing it failed (your code's error)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if module_name == missing or module_name.startswith(f"{missing}."):  # it, or a parent
            raise FedsimError(
                f"{what}: cannot import {module_name} ({exc}); put it on PYTHONPATH or install it"
            ) from None
        raise FedsimError(
            f"{what}: importing {module_name} failed: it imports {missing}, which cannot be "
            "found; install it, or fix that import"
        ) from None
    except Exception as exc:  # the module's own code failed: a SyntaxError, a raise
        raise FedsimError(
            f"{what}: importing {module_name} failed ({type(exc).__name__}: "
            f"{first_line(exc)}); fix that module"
        ) from None


def import_roots(names: Iterable[str]) -> list[str]:
    """The folders other processes need on ``PYTHONPATH`` to import these import paths."""
    roots = []
    for name in names:
        top = name.partition(":")[0].split(".")[0]
        spec = importlib.util.find_spec(top)
        if spec is None or spec.origin is None:
            continue
        origin = Path(spec.origin)
        root = origin.parent.parent if spec.submodule_search_locations else origin.parent
        if str(root) not in roots:
            roots.append(str(root))
    return roots


def tasks_of(name: str, table: Mapping[str, Part], what: str) -> tuple[str, ...]:
    """The tasks a part declares: its table entry's, or a ``tasks`` attribute; () if none.

    A declared task that fedsim does not know (``"text"``, a typo) is an error, not a
    part that matches no dataset.
    """
    if name in table:
        return table[name].tasks
    declared = getattr(resolve(name, table, what), "tasks", ())
    tasks = (declared,) if isinstance(declared, str) else declared
    if not isinstance(tasks, tuple | list | set | frozenset) or any(t not in TASKS for t in tasks):
        raise FedsimError(
            f"{what} '{name}': its tasks attribute is {declared!r}; make it a tuple of "
            f"{', '.join(repr(t) for t in TASKS)}, or remove it"
        )
    return tuple(tasks)
