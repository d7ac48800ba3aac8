"""Checks that need more than one key, or the dataset's task, or the engine that runs.

The schema (``schema.py``) runs ``check_options``, ``check_strategy``, ``check_audit`` and,
where a built-in dataset names its task, ``check_task`` as it validates. ``check_task``
runs again once a dataset of your own is loaded; ``check_deployment`` where a SuperNode
or the deployment's server reads the config; ``check_budget`` on the keys a user wrote.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedsim import registry
from fedsim.errors import FedsimError

if TYPE_CHECKING:
    from fedsim.config.schema import FedsimConfig


BUDGETS = {"noise-multiplier": "target-epsilon", "user-noise-multiplier": "user-target-epsilon"}


def check_budget(*layers: Mapping[str, Any]) -> None:
    """One error line where a σ in effect would leave an ε budget given with it unmet.

    ``layers`` are what a user wrote, earliest first (a file, then overrides; a sweep's
    base, then its grid point). A σ above 0 is used as given and ε is what it gives, so a
    budget set in the σ's layer or a later one would be silently ignored. A σ set after
    a budget overrides it knowingly (a shipped config's budget, a fixed σ on top); a
    resolved config, which keeps its budget beside the σ solved from it, is no layer.

    Parameters
    ----------
    *layers : mapping of str to Any
        Kebab-case keys, each layer as the user gave it.

    Raises
    ------
    FedsimError
        One line naming the σ, the budget it would ignore, and what to do.

    """
    for sigma, budget in BUDGETS.items():
        given = [i for i, layer in enumerate(layers) if sigma in layer]
        if not given or not layers[given[-1]][sigma]:
            continue
        later = [layer for layer in layers[given[-1] :] if budget in layer]
        if later:
            raise FedsimError(
                f"config: {sigma} = {layers[given[-1]][sigma]} fixes σ, so {budget} = "
                f"{later[-1][budget]} would not be used (ε is what that σ gives); remove one "
                f"of them ({sigma} = 0 solves σ for the budget)"
            )


def check_deployment(config: FedsimConfig) -> FedsimConfig:
    """``config``, if it fits the deployment engine; one error line otherwise.

    The server is not trusted there: its clients' noise must not come from the seed
    that the server sends them.
    """
    if not config.secure_noise:
        raise FedsimError(
            "config: secure-noise = false is refused under the deployment engine: the "
            "server knows the seed, so seeded client noise would not protect against it; "
            "set secure-noise = true (the default there)"
        )
    if config.clients_per_worker > 1:
        raise FedsimError(
            "config: clients-per-worker > 1 groups a round's clients on simulation workers; "
            "under the deployment engine each SuperNode is one client: set "
            "clients-per-worker = 1"
        )
    return config


def check_delta(config: FedsimConfig, examples: int) -> None:
    """Refuse a δ that is not below 1/n for the records each unit protects.

    A mechanism that publishes one record whole, chosen at random, meets (0, 1/n)-DP: a δ
    of 1/n or more bounds nothing. ``examples``: the run's training examples, over all
    clients (the sample unit's records); the user unit's are the ``num-clients`` clients.
    """
    units = []
    if config.dp_sample:
        units.append((examples, "training examples"))
    if config.dp_user:
        units.append((config.num_clients, "clients"))
    for n, what in units:
        if n > 0 and config.delta >= 1 / n:
            raise FedsimError(
                f"delta {config.delta:g} is not below 1/n = {1 / n:.3g} for the run's {n} "
                f"{what}: a mechanism that publishes one of them whole meets that δ; set "
                f"delta well below 1/n, e.g. {1 / (10 * n):.1g} or less"
            )


def check_task(config: FedsimConfig, task: str) -> None:
    """One error line if ``config``'s model cannot learn ``task``, or an option does not fit."""
    tasks = registry.tasks_of(config.model, registry.MODELS, "model")
    if tasks and task not in tasks:
        fits = sorted(m for m, part in registry.MODELS.items() if task in part.tasks)
        raise FedsimError(
            f"model {config.model} cannot learn dataset {config.dataset} ({task}); "
            f"use model {' or '.join(fits)} for it, or a dataset of task "
            f"{' or '.join(tasks)} for {config.model}"
        )
    if config.next_char_loss != "last" and task != registry.NEXT_CHAR:
        raise FedsimError(
            f"next-char-loss {config.next_char_loss} applies only to next-char datasets "
            f"(shakespeare), not {config.dataset}; remove it"
        )


def check_options(config: FedsimConfig) -> None:
    """Options that fit the dataset and the privacy unit (``ValueError``: the schema words it)."""
    builtin = config.dataset in registry.DATASETS
    if config.partition == "natural" and builtin and config.dataset not in registry.NATURAL_USERS:
        raise ValueError(
            f"partition natural needs a dataset with natural users "
            f"({', '.join(sorted(registry.NATURAL_USERS))}); dataset {config.dataset} has none, "
            "use iid, dirichlet or shards"
        )
    if config.partition != "natural" and config.min_samples != 1:
        raise ValueError("min-samples selects users and applies only to partition natural")
    if config.dp_user and config.min_clients > 1:
        raise ValueError(
            "min-clients > 1 is refused under user-level DP (dp = user or both): a run that "
            "stopped for failed clients would tell of their data, outside the ε; failed "
            "clients count as zero and the round is released; leave min-clients at 1"
        )


def check_audit(config: FedsimConfig, task: str | None) -> None:
    """Sample-level canaries are images: an audit of that unit needs an image dataset."""
    if "sample" in config.audit_units and task is not None and task != registry.IMAGE:
        raise ValueError(
            f"audit-canaries audits the sample unit with image canaries: it supports image "
            f"datasets only, not {config.dataset} ({task}); set audit-canaries = 0"
            + (" or dp = user" if config.dp == "both" else "")
        )


def check_strategy(config: FedsimConfig) -> None:
    """Strategy options only for strategies that take them; no DP wrappers, sums only."""
    used = registry.STRATEGY_ARGS.get(config.strategy, {})
    defaults = type(config).model_fields
    for key in ("proximal-mu", "server-lr", "server-momentum", "server-beta2", "server-tau"):
        name = key.replace("-", "_")
        if key not in used and getattr(config, name) != defaults[name].default:
            takers = sorted(s for s, args in registry.STRATEGY_ARGS.items() if key in args)
            raise ValueError(
                f"{key} does not apply to strategy {config.strategy}; "
                f"set strategy to {' or '.join(takers)}, or remove {key}"
            )
    if registry.is_import_path(config.strategy):
        found = registry.resolve(config.strategy, {}, "strategy")
        refusal = strategy_refusal(config, found)
        if refusal:
            raise ValueError(refusal)


def strategy_refusal(config: FedsimConfig, strategy: object) -> str:
    """Why ``config`` cannot use the strategy class ``strategy`` (or its instance); "" if it can.

    Checked on the class a config names, and again on what a factory of one's own builds.
    """
    cls = strategy if isinstance(strategy, type) else type(strategy)
    names = {c.__name__ for c in cls.__mro__}
    if names & {"DifferentialPrivacyFixedClippingBase", "DifferentialPrivacyAdaptiveBase"}:
        return (
            "Flower's DP wrappers noise a weighted mean and count only RDP; fedsim adds "
            "and counts DP itself: use a plain strategy with dp = user or both"
        )
    if config.dp_user and names & set(registry.NOT_A_SUM):
        return (
            f"strategy {config.strategy} does not aggregate by a sum: one client can "
            "move its output without bound, which the user-level noise does not "
            "cover; use a FedAvg-like strategy with dp = user or both"
        )
    return ""
