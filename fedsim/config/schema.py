"""The config's schema: every key, its type, default and meaning, and how keys fit together.

Facts derived from the config (how many simulation workers, which units an audit covers)
are properties here, so every part of a run reads them from one place.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fedsim import registry
from fedsim.config.checks import check_audit, check_options, check_strategy, check_task
from fedsim.errors import FedsimError

_MAX_INT = 2**63 - 1  # the largest whole number a key takes (see _fits_64_bits)


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value it holds; anything else as it is."""
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


_PART_TABLES = {
    "model": registry.MODELS,
    "dataset": registry.DATASETS,
    "partition": registry.PARTITIONS,
    "strategy": registry.STRATEGIES,
}


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
        description="names the results folder (not given: DATASET-MODEL)",
    )
    model: str = Field(
        "cnn", description="cnn, fedavg-cnn, lstm, transformer, or your own as 'module:attr'"
    )
    dataset: str = Field(
        "digits",
        description="digits (embedded), mnist, fashion-mnist, cifar10, shakespeare, "
        "shakespeare-disjoint, sst2, "
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
    grad_sample: Literal["auto", "fast", "hooks", "ghost"] = Field(
        "auto",
        description="per-sample clipping: fast (one pass), hooks or ghost (Opacus); "
        "auto: fast, or hooks for tied weights",
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
            values = {key: _plain(value) for key, value in values.items()}
            if "name" not in values:  # a run of one's own parts is not named digits-cnn
                parts = [values.get(k, cls.model_fields[k].default) for k in ("dataset", "model")]
                name = "-".join(str(p).rpartition(":")[2] for p in parts)
                values["name"] = re.sub(r"[^A-Za-z0-9._-]", "_", name)
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
        check_options(self)
        check_strategy(self)
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
        check_audit(self, task[0] if task else None)
        if self.client_gpus > 1 and self.client_gpus != int(self.client_gpus):
            raise ValueError("client-gpus above 1 must be a whole number of GPUs")
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

    @property
    def cohort_rate(self) -> float:
        """The chance that a client trains in a round: user-level DP's sampling rate q."""
        return self.clients_per_round / self.num_clients

    @property
    def all_positions(self) -> bool:
        """A next-character model's loss averages every position, not only the last."""
        return self.next_char_loss == "all"

    def to_flat(self) -> dict[str, Any]:
        """Kebab-case dict of plain scalars: a TOML table, run config or ConfigRecord."""
        return self.model_dump(by_alias=True)
