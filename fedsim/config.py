"""One typed, validated experiment config, with Flower-style kebab-case keys.

The same schema is read from a TOML file, from ``--set KEY=VALUE`` overrides, from
Flower's run config (``[tool.flwr.app.config]``) and from the config record the server
sends to clients, so every entry point validates identically before any work starts.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fedsim import registry
from fedsim.errors import FedsimError

_MAX_INT = 2**63 - 1  # the largest whole number a key takes (see _fits_64_bits)
# built-in models that fedsim.dp.train_cohort refuses, and why
_NOT_VECTORIZED = {"lstm": "vmap has no batching rule for its recurrent layer"}


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value it holds; anything else as it is."""
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


class FedsimConfig(BaseModel):
    """A complete experiment. Defaults are the default experiment (digits, CNN, ε ≤ 8).

    Keys are kebab-case (``num-clients``) as in Flower's run config; ``noise-multiplier``
    0 means "solve it from ``target-epsilon`` before round 1". ``dp``: ``sample`` protects one
    training example (DP-SGD in each client), ``user`` one client's whole data (DP-FedAvg:
    server-side clipping to ``max-update-norm`` and noise, ``user-*`` keys), ``both`` both
    at once. ``secure-noise`` draws every DP noise value and sample from the operating
    system's CSPRNG instead of from ``seed``; ``share-label-counts`` lets clients report
    their label counts (published in ``partition.csv``). A round goes on with the
    clients that replied within ``round-timeout`` seconds while at least ``min-clients``
    did; ``client-dropout`` and ``straggler-*`` simulate clients that fail or are slow.
    """

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        alias_generator=_kebab,
        populate_by_name=True,
        allow_inf_nan=False,
        # a value has its key's type: `num-rounds = true` or "3" is a mistake, not 1 or 3;
        # only an int may stand for a float (`target-epsilon = 8`)
        strict=True,
    )

    name: str = Field(
        "digits-cnn",
        min_length=1,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="names the results folder",
    )
    model: str = Field(
        "cnn", description="cnn, fedavg-cnn, lstm, transformer, or your own as 'module:attr'"
    )
    dataset: str = Field(
        "digits",
        description="digits (embedded), mnist, fashion-mnist, cifar10, shakespeare, sst2, "
        "sms-spam, hf-image, hf-text, or your own loader as 'module:attr'",
    )
    data_dir: str = Field("", description="the folder the dataset is read from")
    num_clients: int = Field(5, ge=1, description="simulated clients")
    partition: str = Field(
        "iid",
        description="iid, dirichlet (label skew), shards, natural (one client per user), "
        "or your own as 'module:attr'",
    )
    dirichlet_alpha: float = Field(0.5, gt=0, description="dirichlet's α: small, few labels each")
    shards_per_client: int = Field(2, ge=1, description="shards: label-sorted shards per client")
    min_samples: int = Field(1, ge=1, description="natural: users with fewer samples stay out")
    max_samples: int = Field(0, ge=0, description="> 0: a client keeps a seeded random this many")
    next_char_loss: Literal["last", "all"] = Field(
        "last", description="next-char data: train the last position only, or all of them"
    )
    num_rounds: int = Field(30, ge=1, description="federated rounds")
    clients_per_round: int = Field(
        5, ge=1, description="clients sampled a round (the expected number under user-level DP)"
    )
    local_epochs: int = Field(1, ge=1, description="local epochs a round")
    batch_size: int = Field(64, ge=1, description="local batch size (expected, under DP-SGD)")
    lr: float = Field(0.5, gt=0, description="local SGD learning rate")
    momentum: float = Field(0.0, ge=0, lt=1, description="local SGD momentum")
    dp: Literal["none", "sample", "user", "both"] = Field(
        "sample",
        description="none; sample: DP-SGD in each client (one example); user: DP-FedAvg "
        "(one client's whole data); both",
    )
    target_epsilon: float = Field(8.0, gt=0, description="sample unit: the ε budget")
    noise_multiplier: float = Field(
        0.0, ge=0, description="sample unit: σ (0: solve it from the budget before round 1)"
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="δ for every unit")
    max_grad_norm: float = Field(1.0, gt=0, description="sample unit: per-example clip C")
    user_target_epsilon: float = Field(8.0, gt=0, description="user unit: the ε budget")
    user_noise_multiplier: float = Field(0.0, ge=0, description="user unit: σ (0: solve it)")
    max_update_norm: float = Field(1.0, gt=0, description="user unit: per-client update clip S")
    clip_quantile: float = Field(
        0.0, ge=0, lt=1, description="adaptive user-level clipping: target quantile (0: off)"
    )
    clip_lr: float = Field(0.2, gt=0, description="adaptive clipping: step η")
    clip_count_noise: float = Field(0.0, ge=0, description="adaptive clipping: count noise σ_b")
    strategy: str = Field(
        "fedavg",
        description="fedavg, fedavgm, fedprox, fedadam, fedyogi, fedadagrad (Flower's), or "
        "your own Flower strategy class as 'module:attr'",
    )
    proximal_mu: float = Field(0.0, ge=0, description="fedprox: the proximal term's weight μ")
    server_lr: float = Field(
        1.0, gt=0, description="fedavgm, fedadam, fedyogi, fedadagrad: server learning rate"
    )
    server_momentum: float = Field(
        0.0, ge=0, lt=1, description="fedavgm: server momentum; fedadam, fedyogi: β₁"
    )
    server_beta2: float = Field(0.99, gt=0, lt=1, description="fedadam, fedyogi: β₂")
    server_tau: float = Field(1e-3, gt=0, description="fedadam, fedyogi, fedadagrad: adaptivity τ")
    audit_canaries: int = Field(
        0, ge=0, description="canaries of a one-run privacy audit of each unit (0: no audit)"
    )
    audit_confidence: float = Field(
        0.95, gt=0, lt=1, description="the audit's ε lower bound holds at this confidence"
    )
    accountant: Literal["rdp", "prv", "pld"] = Field(
        "rdp", description="rdp or prv (Opacus), pld (Google's dp-accounting)"
    )
    secure_noise: bool = Field(
        False,
        description="DP noise, samples and cohorts from the OS, not from seed (on, and "
        "required, under the deployment engine)",
    )
    share_label_counts: bool = Field(
        False, description="clients report label counts, published unnoised in partition.csv"
    )
    grad_sample: Literal["fast", "hooks", "ghost"] = Field(
        "fast", description="per-sample clipping: fast (one pass), hooks or ghost (Opacus)"
    )
    seed: int = Field(
        0, ge=0, description="seeds partitions, model, faults; and DP noise unless secure-noise"
    )
    round_timeout: float = Field(600.0, gt=0, description="seconds a round waits for replies")
    min_clients: int = Field(1, ge=1, description="fewest usable replies for a round to count")
    client_dropout: float = Field(
        0.0, ge=0, lt=1, description="simulated: chance a sampled client drops out"
    )
    straggler_prob: float = Field(
        0.0, ge=0, le=1, description="simulated: chance a sampled client is slow"
    )
    straggler_delay: float = Field(0.0, ge=0, description="simulated: a straggler's delay, s")
    client_cpus: float = Field(1.0, gt=0, description="Ray CPUs per client (torch threads too)")
    client_gpus: float = Field(0.0, ge=0, description="Ray GPUs per client; 0.25: four a GPU")
    clients_per_worker: int = Field(
        1, ge=1, description="simulation: clients a worker trains at once, vectorized (1: one)"
    )
    ray_address: str = Field(
        "", description="'' a Ray of the run's own; HOST:PORT a cluster's head; auto"
    )
    out_dir: str = Field("results", description="where runs write their folders")

    @model_validator(mode="before")
    @classmethod
    def _plain_scalars(cls, values: Any) -> Any:
        # numpy scalars (a seed from np.arange, an lr from np.linspace) are plain numbers
        # to a user; strict types would refuse np.int64 as an int
        if isinstance(values, dict):
            return {key: _plain(value) for key, value in values.items()}
        return values

    @field_validator("*")
    @classmethod
    def _fits_64_bits(cls, value: Any) -> Any:
        # torch.manual_seed and Flower's messages take 64-bit whole numbers: a larger one
        # would pass here and crash once the run has started
        if isinstance(value, int) and not isinstance(value, bool) and value > _MAX_INT:
            raise ValueError(
                "must be at most 2**63 - 1 (a 64-bit whole number, what torch and Flower's "
                "messages carry); use a smaller value"
            )
        return value

    @field_validator("model", "dataset", "partition", "strategy")
    @classmethod
    def _known_part(cls, value: str, info: ValidationInfo) -> str:
        what = info.field_name or "part"
        try:  # a built-in name, or an import path whose object is importable
            return registry.check_name(value, _PART_TABLES[what], what)
        except FedsimError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("ray_address")
    @classmethod
    def _ray_address(cls, value: str) -> str:
        if not re.fullmatch(r"|auto|(ray://)?\S+:\d{1,5}", value):
            raise ValueError(
                "ray-address must be empty (start a local Ray), 'auto' (the cluster "
                "`ray start` made on this machine) or HOST:PORT of a Ray head"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> FedsimConfig:
        task = registry.tasks_of(self.dataset, registry.DATASETS, "dataset")
        try:  # a dataset of your own states its task once loaded: check_task then
            if task:
                check_task(self, task[0])
        except FedsimError as exc:
            raise ValueError(str(exc)) from None
        _check_options(self)
        _check_strategy(self)
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"clients-per-round ({self.clients_per_round}) exceeds num-clients "
                f"({self.num_clients}); lower clients-per-round or raise num-clients"
            )
        if self.min_clients > self.clients_per_round:
            raise ValueError(
                f"min-clients ({self.min_clients}) exceeds clients-per-round "
                f"({self.clients_per_round}); a round could never succeed"
            )
        if self.dp_user and self.clip_quantile > 0 and self.clip_count_noise == 0:
            raise ValueError(
                "adaptive clipping (clip-quantile > 0) needs clip-count-noise > 0; "
                "Andrew et al. suggest clients-per-round / 20"
            )
        _check_audit(self, task[0] if task else None)
        if self.client_gpus > 1 and self.client_gpus != int(self.client_gpus):
            raise ValueError("client-gpus above 1 must be a whole number of GPUs")
        if self.clients_per_worker > 1 and self.model in _NOT_VECTORIZED:
            raise ValueError(
                f"clients-per-worker > 1 trains clients with torch.func.vmap, which cannot "
                f"batch model {self.model} ({_NOT_VECTORIZED[self.model]}); set "
                "clients-per-worker = 1"
            )
        return self

    @property
    def simulation_workers(self) -> int:
        """Flower nodes a simulation runs: one per ``clients-per-worker`` of a round's clients.

        Flower's simulation engine polls every node for messages ten times a second, so
        a node per client would make each round cost O(num-clients). A Poisson cohort
        larger than ``clients-per-round`` gives some worker more clients.
        """
        cohort = min(self.num_clients, self.clients_per_round)
        return -(-cohort // self.clients_per_worker)  # ceil

    @property
    def own_parts(self) -> list[str]:
        """The model, dataset and partition given as import paths (``"module:attr"``)."""
        return [p for p in (self.model, self.dataset, self.partition) if registry.is_import_path(p)]

    @property
    def audit_units(self) -> list[str]:
        """The units ``audit-canaries`` audits, each with canaries of its own.

        Canary examples in the clients' data audit the sample unit (and measure the leak
        of a run without DP); canary clients inside DP-FedAvg audit the user unit.
        """
        if self.audit_canaries == 0:
            return []
        return (["sample"] if self.dp != "user" else []) + (["user"] if self.dp_user else [])

    @property
    def dp_sample(self) -> bool:
        """DP-SGD in each client protects one training example."""
        return self.dp in ("sample", "both")

    @property
    def dp_user(self) -> bool:
        """DP-FedAvg at the server protects one client's whole data."""
        return self.dp in ("user", "both")

    def to_flat(self) -> dict[str, Any]:
        """Kebab-case dict of plain scalars: a TOML table, run config or ConfigRecord."""
        return self.model_dump(by_alias=True)


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


def check_task(config: FedsimConfig, task: str) -> None:
    """One error line if ``config``'s model cannot learn ``task``, or an option does not fit."""
    tasks = registry.tasks_of(config.model, registry.MODELS, "model")
    if tasks and task not in tasks:
        fits = sorted(m for m, part in registry.MODELS.items() if task in part.tasks)
        raise FedsimError(
            f"model {config.model} cannot learn dataset {config.dataset} ({task}); "
            f"use model {' or '.join(fits)} for it, or an image dataset for {config.model}"
        )
    if config.next_char_loss != "last" and task != registry.NEXT_CHAR:
        raise FedsimError(
            f"next-char-loss {config.next_char_loss} applies only to next-char datasets "
            f"(shakespeare), not {config.dataset}; remove it"
        )


def _check_options(config: FedsimConfig) -> None:
    builtin = config.dataset in registry.DATASETS
    if config.partition == "natural" and builtin and config.dataset not in registry.NATURAL_USERS:
        raise ValueError(
            f"partition natural needs a dataset with natural users "
            f"({', '.join(sorted(registry.NATURAL_USERS))}); dataset {config.dataset} has none, "
            "use iid, dirichlet or shards"
        )
    if config.partition != "natural" and config.min_samples != 1:
        raise ValueError("min-samples selects users and applies only to partition natural")


def _check_audit(config: FedsimConfig, task: str | None) -> None:
    if "sample" in config.audit_units and task is not None and task != registry.IMAGE:
        raise ValueError(
            f"audit-canaries audits the sample unit with image canaries: it supports image "
            f"datasets only, not {config.dataset} ({task}); set audit-canaries = 0"
            + (" or dp = user" if config.dp == "both" else "")
        )


def _check_strategy(config: FedsimConfig) -> None:
    used = registry.STRATEGY_ARGS.get(config.strategy, {})
    defaults = FedsimConfig.model_fields
    for key in ("proximal-mu", "server-lr", "server-momentum", "server-beta2", "server-tau"):
        name = key.replace("-", "_")
        if key not in used and getattr(config, name) != defaults[name].default:
            takers = sorted(s for s, args in registry.STRATEGY_ARGS.items() if key in args)
            raise ValueError(
                f"{key} does not apply to strategy {config.strategy}; "
                f"set strategy to {' or '.join(takers)}, or remove {key}"
            )
    if registry.is_import_path(config.strategy):
        classes = getattr(registry.resolve(config.strategy, {}, "strategy"), "__mro__", ())
        names = {c.__name__ for c in classes}
        if names & {"DifferentialPrivacyFixedClippingBase", "DifferentialPrivacyAdaptiveBase"}:
            raise ValueError(
                "Flower's DP wrappers noise a weighted mean and count only RDP; fedsim adds "
                "and counts DP itself: use a plain strategy with dp = user or both"
            )
        if config.dp_user and names & set(registry.NOT_A_SUM):
            raise ValueError(
                f"strategy {config.strategy} does not aggregate by a sum: one client can "
                "move its output without bound, which the user-level noise does not "
                "cover; use a FedAvg-like strategy with dp = user or both"
            )


_PART_TABLES = {
    "model": registry.MODELS,
    "dataset": registry.DATASETS,
    "partition": registry.PARTITIONS,
    "strategy": registry.STRATEGIES,
}


def parse_config(values: dict[str, Any]) -> FedsimConfig:
    """Validate a flat kebab-case mapping into a config.

    Raises
    ------
    FedsimError
        One line naming the first bad key, what is wrong, and what to do instead.

    """
    unknown = [key for key in values if key not in _KEYS]
    if unknown:
        raise FedsimError(_unknown_key_message(unknown[0]))
    try:
        return FedsimConfig.model_validate(values)
    except ValidationError as exc:
        raise FedsimError(_format_error(exc)) from None


ConfigLike = Union["FedsimConfig", Mapping[str, Any], str, Path, None]


def as_config(config: ConfigLike = None, **overrides: Any) -> FedsimConfig:
    """A validated config from a config, a mapping, a TOML file's path, or the defaults.

    ``overrides`` are keys as Python names (``num_rounds=3``); a mapping's keys may be
    kebab-case or Python names. The whole result is validated again.
    """
    return parse_config(config_mapping(config, **overrides))


def config_mapping(config: ConfigLike = None, **overrides: Any) -> dict[str, Any]:
    """The unvalidated kebab-case ``{key: value}`` of what :func:`as_config` takes."""
    if isinstance(config, FedsimConfig):
        values = config.to_flat()
    elif isinstance(config, str | Path):
        values = read_toml(Path(config))
    else:
        values = dict(config or {})
    return {key.replace("_", "-"): value for key, value in (values | overrides).items()}


def key_table() -> list[tuple[str, str, str]]:
    """(key, default, meaning) of every config key, in schema order."""
    return [
        (field.alias or name, toml_literal(field.default), field.description or "")
        for name, field in FedsimConfig.model_fields.items()
    ]


def toml_literal(value: Any) -> str:
    """``value`` as a TOML literal: what ``--set`` and run-config files hold."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return repr(value)


def toml_table(values: Mapping[str, Any]) -> str:
    """A flat TOML table of ``values``."""
    return "".join(f"{key} = {toml_literal(value)}\n" for key, value in values.items())


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> FedsimConfig:
    """Read an optional TOML file, apply ``KEY=VALUE`` overrides, and validate.

    Parameters
    ----------
    path
        A TOML file of kebab-case keys, flat or under ``[tool.flwr.app.config]``.
    overrides
        ``KEY=VALUE`` strings; values are TOML literals, or plain strings otherwise.

    """
    return parse_config(config_values(path, overrides))


def config_values(path: Path | None, overrides: list[str] | None) -> dict[str, Any]:
    """The unvalidated ``{key: value}`` of an optional TOML file and ``KEY=VALUE`` overrides.

    One override may hold several pairs, as Flower's ``--run-config`` does:
    ``"num-rounds=3 data-dir='/my data'"``.
    """
    values: dict[str, Any] = read_toml(path) if path is not None else {}
    for item in overrides or []:
        values.update(parse_override(pair) for pair in _pairs(item))
    return values


_PAIR = r"""[^\s=]+=(?:"[^"]*"|'[^']*'|\S*)"""


def _pairs(item: str) -> list[str]:
    """``KEY=VALUE`` pairs of one override; quoted values may hold spaces."""
    if re.fullmatch(rf"\s*(?:{_PAIR}\s*)+", item):
        return re.findall(_PAIR, item)
    return [item]  # not a list of pairs: parse_override says what is wrong with it


def read_toml(path: Path) -> dict[str, Any]:
    """Read a config file; Flower's pyproject layout is accepted too."""
    if not path.is_file():
        raise FedsimError(f"config file {path} does not exist; pass an existing .toml file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise FedsimError(f"config file {path} is not valid TOML: {exc}") from None
    return _app_config(path, data)


def _app_config(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """A Flower pyproject's ``[tool.flwr.app.config]`` table, or else the file's keys."""
    table: Any = data
    for level in ("tool", "flwr", "app"):
        table = table.get(level) if isinstance(table, dict) else None
    if not isinstance(table, dict) or "config" not in table:
        return data  # a flat config: a stray `tool` is then an unknown key
    if not isinstance(table["config"], dict):
        raise FedsimError(
            f"config file {path}: tool.flwr.app.config is {toml_literal(table['config'])}, "
            "not a table; put the config keys under a [tool.flwr.app.config] header"
        )
    return dict(table["config"])


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``KEY=VALUE``; ``VALUE`` is a TOML literal (1, 0.5, true) or a bare string."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise FedsimError(f"--set expects KEY=VALUE, got '{item}'; for example --set num-rounds=5")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


_KEYS = {field.alias or name for name, field in FedsimConfig.model_fields.items()}


def _unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, sorted(_KEYS), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(sorted(_KEYS))}"
    return f"config: unknown key '{key}'; {hint}"


_DEFAULTS = {
    field.alias or name: field.default for name, field in FedsimConfig.model_fields.items()
}
# pydantic's strict type errors, as what a TOML value should have been
_EXPECTED = {
    "int_type": "a whole number",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
}
_KINDS: dict[type, str] = {
    bool: "a boolean",
    int: "a whole number",
    float: "a number",
    str: "a string",
    dict: "a table",
    list: "an array",
}


def _format_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    key = ".".join(str(part) for part in error["loc"]) or "config"
    if error["type"] in _EXPECTED and key in _DEFAULTS:
        return _type_message(key, _EXPECTED[error["type"]], error["input"])
    message = error["msg"].removeprefix("Value error, ")
    if error["loc"]:
        return f"config: {key}: {message} (got {error['input']!r})"
    return f"config: {message}"


def _type_message(key: str, expected: str, value: Any) -> str:
    """``key`` holds a value of the wrong type: what it got, and one that would do."""
    got = f"{toml_literal(value)} ({_KINDS.get(type(value), type(value).__name__)})"
    if expected == _EXPECTED["string_type"] and isinstance(value, int | float):  # bools too
        fix = f"quote it: {key} = {json.dumps(toml_literal(value))}"
    else:
        fix = f"for example {key} = {toml_literal(_DEFAULTS[key])}"
    return f"config: {key}: expected {expected}, got {got}; {fix}"
