"""What a run accumulates, and its checkpoint (plain data and tensors, in ``private/``)."""

from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from fedsim import results
from fedsim.config import FedsimConfig, parse_config
from fedsim.errors import FedsimError
from fedsim.messages import ClientInfo, PrivacySpent
from fedsim.results import RoundRow
from fedsim.server import privacy


@dataclass
class RunState:
    """Everything a run needs to continue after its last finished round.

    Every random choice in a run comes from a stream keyed by (round, client, purpose)
    (``fedsim.dp.randomness``), so no generator state needs saving: a seeded run resumes
    with the same choices as an uninterrupted one. ``rows`` are published (rounds.csv);
    ``participation`` (who trained, who dropped and why) is private under user-level DP.
    """

    config: FedsimConfig
    infos: list[ClientInfo]
    ledger: privacy.Ledger = field(default_factory=dict)  # sample unit, per client
    user_ledger: list[privacy.LedgerEntry] = field(default_factory=list)  # user unit, per round
    rows: list[RoundRow] = field(default_factory=list)
    participation: list[dict] = field(default_factory=list)
    arrays: dict[str, torch.Tensor] | None = None  # global model after the last round
    strategy: dict = field(default_factory=dict)  # the strategy's state (server optimizer)
    clip_norm: float | None = None  # user-level clip norm (moves under adaptive clipping)

    def to_checkpoint(self) -> dict:
        """Plain data for :func:`save_checkpoint`."""
        return {
            "config": self.config.to_flat(),
            "ledger": privacy.ledger_to_json(self.ledger),
            "user_ledger": [asdict(e) for e in self.user_ledger],
            "rows": [asdict(r) for r in self.rows],
            "participation": self.participation,
            "arrays": self.arrays,
            "strategy": self.strategy,
            "clip_norm": self.clip_norm,
        }

    @classmethod
    def from_checkpoint(cls, data: dict, infos: list[ClientInfo]) -> RunState:
        """Inverse of :meth:`to_checkpoint`; ``infos`` come from the clients or the data.

        They are not checkpointed: with a large population they would be most of every
        round's checkpoint, and they are the same on resume. A checkpoint written before
        round times, failure counts and cohort sizes moved to ``private/`` under private
        cohorts has them moved there.
        """
        config = parse_config(data["config"])
        rows = [RoundRow(**r) for r in data["rows"]]
        participation = [dict(p) for p in data["participation"]]
        for row, private in zip(rows, participation, strict=False):
            private.setdefault("seconds", row.seconds)
            private.setdefault("failed", row.failed)
            private.setdefault("cohort", row.cohort)
        if config.dp_user:
            rows = [replace(row, seconds=None, cohort=None, failed=None) for row in rows]
        return cls(
            config=config,
            infos=infos,
            ledger=privacy.ledger_from_json(data["ledger"]),
            user_ledger=[privacy.LedgerEntry(**e) for e in data["user_ledger"]],
            rows=rows,
            participation=participation,
            arrays=data["arrays"],
            strategy=data["strategy"],
            clip_norm=data["clip_norm"],
        )

    @functools.cached_property
    def prescribed(self) -> list[PrivacySpent]:
        """Each client's DP-SGD spend in one round (what it is charged if it is silent)."""
        cfg = self.config
        if not cfg.dp_sample:
            return [PrivacySpent() for _ in self.infos]
        return [
            privacy.prescribed_spend(
                info.num_examples,
                noise_multiplier=cfg.noise_multiplier,
                batch_size=cfg.batch_size,
                epochs=cfg.local_epochs,
            )
            for info in self.infos
        ]

    def epsilons(self, *, public: bool = True) -> dict[str, float]:
        """ε so far under each privacy unit the run protects.

        ``public``: where cohorts are secret (user-level DP), the sample unit's ε charges
        every client for every round, so that it reveals no cohort; ``public=False`` gives
        the ledger's own maximum, for the private part of the results.
        """
        cfg = self.config
        out = {}
        if cfg.dp_sample:
            out["sample"] = self.sample_epsilon(accountant=cfg.accountant, public=public)
        if cfg.dp_user:
            out["user"] = privacy.client_epsilon(
                self.user_ledger, delta=cfg.delta, accountant=cfg.accountant
            )
        return out

    def sample_epsilon(self, *, accountant: str, public: bool = True) -> float:
        """The sample unit's ε under ``accountant``; ``public`` as for :meth:`epsilons`."""
        cfg = self.config
        if public and cfg.dp_user:
            rounds = [e.round for e in self.user_ledger]
            return privacy.all_rounds_epsilon(
                self.ledger, self.prescribed, rounds, delta=cfg.delta, accountant=accountant
            )
        return privacy.run_epsilon(self.ledger, delta=cfg.delta, accountant=accountant)[0]

    def sample_histories(self) -> list[list[tuple[float, float, int]]]:
        """The (σ, q, steps) histories the published sample ε is the largest ε of."""
        if self.config.dp_user:
            rounds = [e.round for e in self.user_ledger]
            return privacy.all_rounds_histories(self.ledger, self.prescribed, rounds)
        return privacy.ledger_histories(self.ledger)


def save_tensors(path: Path, obj: Any) -> None:
    """Atomically ``torch.save`` ``obj`` (tensors and plain data) to ``path``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    results.write_atomic(path, buf.getvalue())


CHECKPOINT_MAGIC = b"fedsim-checkpoint 1 sha256="


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Atomically save a run's state as ``private/checkpoint.pt``; only its owner reads it.

    The file starts with the SHA-256 of what follows, so that a damaged or edited
    checkpoint is refused on resume instead of being trusted (a lower ε, say).
    """
    (run_dir / results.PRIVATE).mkdir(mode=0o700, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    results.write_atomic(run_dir / results.CHECKPOINT, CHECKPOINT_MAGIC + digest + b"\n" + payload)


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The state saved by :func:`save_checkpoint`, or None where there is none.

    Raises
    ------
    FedsimError
        The file is damaged, edited, or not a fedsim checkpoint.

    """
    path = run_dir / results.CHECKPOINT
    if not path.is_file():
        return None
    data = path.read_bytes()
    header, _, payload = data.partition(b"\n")
    digest = header.removeprefix(CHECKPOINT_MAGIC)
    if (
        not header.startswith(CHECKPOINT_MAGIC)
        or hashlib.sha256(payload).hexdigest().encode() != digest
    ):
        raise _damaged(path, "its contents do not match their SHA-256")
    try:
        state = torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as exc:  # any unpickling failure means the same to the user
        raise _damaged(path, f"it does not load ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not state.keys() >= CHECKPOINT_KEYS:
        raise _damaged(path, "it lacks parts of a run's state")
    return state


def restore(run_dir: Path, infos: list[ClientInfo]) -> RunState | None:
    """The checkpointed state of the run in ``run_dir``, checked; None where there is none.

    ``infos``: the clients' sizes (an empty list where only the state is checked).
    """
    data = load_checkpoint(run_dir)
    if data is None:
        return None
    path = run_dir / results.CHECKPOINT
    try:
        state = RunState.from_checkpoint(data, infos)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _damaged(
            path, f"its state does not read back ({type(exc).__name__}: {exc})"
        ) from None
    check_ledger(state, path)
    return state


def check_ledger(state: RunState, path: Path) -> None:
    """Refuse a checkpoint whose ledgers miss a charge for a round already run.

    Every client in a round's cohort (also one that failed) must be charged in the
    sample unit's ledger; every round, in the user unit's. A checkpoint that lost a
    charge would report a lower ε than the run spent.
    """
    cfg, rounds = state.config, [row.round for row in state.rows]
    if rounds != list(range(len(rounds))) or len(state.participation) != len(rounds):
        raise _damaged(path, "its rounds are not 0, 1, 2, ... in order")
    charged = {(e.round, c) for c, entries in state.ledger.items() for e in entries}
    for entry in state.participation[1:]:
        cohort = [int(c) for c in str(entry["clients"]).split()]
        missing = [c for c in cohort if (int(entry["round"]), c) not in charged]
        if cfg.dp_sample and missing:
            raise _damaged(path, f"its ledger lacks client {missing[0]} in round {entry['round']}")
    user_rounds = [e.round for e in state.user_ledger]
    if cfg.dp_user and user_rounds != rounds[1:]:
        raise _damaged(path, "its user-level ledger does not cover every round")


def _damaged(path: Path, why: str) -> FedsimError:
    return FedsimError(
        f"checkpoint {path} cannot be trusted: {why}; remove {path.parent.parent} and "
        "start the run again (a damaged checkpoint is never resumed)"
    )


CHECKPOINT_KEYS = frozenset(
    {"config", "ledger", "user_ledger", "rows", "participation", "arrays", "strategy", "clip_norm"}
)
