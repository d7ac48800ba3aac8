"""What each ε of a run means, and the ledger behind it: ``privacy.json``'s records.

A guarantee names its unit, the neighbouring relation (what two datasets differ in, and
what is public anyway), the accountant, who must be trusted and whom it protects against
(README, "Who the privacy protects against"); the noise record says whether anyone can
recompute the noise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from fedsim.config import FedsimConfig
from fedsim.dp import accounting
from fedsim.server import privacy
from fedsim.server.state import RunState

# (unit, engine) -> (who must be trusted, who the ε protects against)
TRUST = {
    ("sample", "simulation"): ("the machine that runs the simulation", "readers of the results"),
    ("sample", "deployment"): (
        "each client's own machine",
        "the server (honest but curious: it runs fedsim and reads all it receives) and "
        "readers of the results",
    ),
    ("user", "simulation"): (
        "the machine that runs the simulation",
        "readers of the results, as long as private/ is not published",
    ),
    ("user", "deployment"): (
        "the server: it sees every client's update before adding noise",
        "readers of the results, as long as private/ is not published",
    ),
}
LABEL_PARTITIONS = ("dirichlet", "shards")  # which client holds an example depends on its label
RELATION = {
    "sample": "zero out one training example of a client (its gradient counts as 0; for "
    "Poisson sampling the same ε as adding or removing it; example counts are public)",
    "user": "zero out one client's whole data (its update counts as 0, and with adaptive "
    "clipping so does its clip bit, centred to ±1/2; who takes part and each client's "
    "example count are public)",
    "replace": "replace one training example of a client by another, or change any of its "
    "data: what the user-level guarantee implies for one example",
}


def relation(config: FedsimConfig, unit: str, overlap: tuple[int, str] = (1, "sample")) -> str:
    """What two neighbouring datasets differ in, for ``unit``, and what is public anyway.

    ``overlap``: the dataset's (samples one piece of data lies in, the piece's name).
    """
    words = RELATION[unit]
    count, piece = overlap
    if unit == "sample" and count != 1:
        many = f"up to {count}" if count else "several"
        words += (
            f"; here one {piece} of the data lies in {many} samples, so this ε "
            f"protects a sample, not a {piece}: see the {piece} guarantee"
        )
    elif unit == "sample" and piece != "sample":
        words += (
            f"; here one {piece} of the data lies in one sample: zeroing it out is this "
            f"relation, and the {piece} guarantee changes it"
        )
    if unit != "user" and config.partition in LABEL_PARTITIONS:
        words += (
            f"; partition {config.partition} places each example by its label, so the "
            "published example counts tell of the labels, outside this ε"
        )
    if config.share_label_counts:
        words += "; each client's label counts are published, outside this ε"
    return words


def privacy_record(state: RunState, *, public: bool = True) -> dict:
    """``privacy.json``: the ledger of every unit the run protects.

    ``public`` with secret cohorts (user-level DP): the sample unit gives each client
    size's schedule, charged for every round, instead of who trained when.
    """
    cfg = state.config
    record: dict = {"accountant": cfg.accountant, "delta": cfg.delta, "units": {}}
    if cfg.dp_sample:
        sample: dict[str, Any] = {"sampling": privacy.SAMPLING, "relation": relation(cfg, "sample")}
        if public and cfg.dp_user:
            sample["charged"] = "every client, every round: cohorts are secret"
            sample["rounds"] = [e.round for e in state.user_ledger]
            sample["schedules"] = _schedules(state)
        else:
            sample["clients"] = privacy.ledger_to_json(state.ledger)
        record["units"]["sample"] = sample
    if cfg.dp_user:
        record["units"]["user"] = {
            "sampling": privacy.USER_SAMPLING,
            "relation": relation(cfg, "user"),
            "max_update_norm": cfg.max_update_norm,
            "clip_quantile": cfg.clip_quantile,
            "rounds": [asdict(e) for e in state.user_ledger],
        }
    return record


def _schedules(state: RunState) -> list[dict]:
    """Each distinct prescribed spend, with how many clients have it."""
    counts: dict = {}
    for spend in state.prescribed:
        counts[spend] = counts.get(spend, 0) + 1
    ordered = sorted(counts.items(), key=lambda item: item[0].sample_rate)
    return [{"spend_per_round": asdict(s), "clients": n} for s, n in ordered]


def noise_record(state: RunState) -> dict:
    """Which kind of randomness the run's DP mechanisms used, in words."""
    if state.config.secure_noise:
        return {
            "kind": "secure",
            "meaning": "every noise value and sample came from the operating system's "
            "random source; no one can recompute them",
        }
    return {
        "kind": "seeded",
        "meaning": f"noise and samples derive from the config's seed ({state.config.seed}, "
        "written in this file): anyone who knows the seed can recompute and remove the "
        "noise, so every ε here holds only against parties who do not know it; use "
        "secure-noise = true for results you publish",
    }


@dataclass(frozen=True)
class Guarantee:
    """One ε, with what it protects, how it was counted and against whom it holds."""

    unit: str
    epsilon: float | None  # None: no bound is computed (the relation says why)
    delta: float
    accountant: str
    relation: str
    trusted: str
    protects_against: str
    implied_by: str | None = None  # the unit whose guarantee this one follows from


def guarantees(
    state: RunState, eps: dict[str, float], engine: str, overlap: tuple[int, str] = (1, "sample")
) -> list[dict]:
    """Each ε with its unit, relation, accountant and who it protects against.

    ``overlap``: the dataset's (how many samples one piece of data lies in, its name);
    for a piece other than a sample, the sample unit's ε is joined by the piece's
    (:func:`group_guarantee`).
    """
    cfg = state.config
    out = [
        Guarantee(
            unit, value, cfg.delta, cfg.accountant, relation(cfg, unit, overlap),
            *TRUST[(unit, engine)],
        )
        for unit, value in eps.items()
    ]  # fmt: skip
    if cfg.dp_sample and overlap[1] != "sample":
        out.append(group_guarantee(state, engine, *overlap))
    if cfg.dp_user:
        replace = privacy.client_epsilon(
            state.user_ledger, delta=cfg.delta, accountant=accounting.REPLACE_ONE
        )
        trust = TRUST[("user", engine)]
        implied = relation(cfg, "replace")
        out.append(
            Guarantee("sample", replace, cfg.delta, accounting.REPLACE_ONE, implied, *trust, "user")
        )
    return [asdict(g) for g in out]


def group_guarantee(state: RunState, engine: str, count: int, piece: str) -> Guarantee:
    """The ε of one ``piece`` of a client's data, which lies in up to ``count`` samples.

    Above one sample: zeroing out every sample that holds it, a group whose ε
    (:func:`fedsim.dp.group_accountant`) is far above one sample's; computed where each
    user's data is one client's (``partition = natural``), as other partitions spread a
    piece's samples over clients, and where the count is known. Changing the piece's
    value replaces those samples, which costs more and is not computed. In one sample:
    changing it replaces that sample, dp-accounting's replace-one ε.
    """
    cfg = state.config
    trust = TRUST[("sample", engine)]
    if count == 1:
        words = f"change one {piece} of a client's data: it lies in one sample, replaced"
        one = accounting.REPLACE_ONE
        replaced = state.sample_epsilon(accountant=one)
        return Guarantee(piece, replaced, cfg.delta, one, words, *trust, "sample")
    accountant = accounting.group_accountant(count) if count else "pld-group"
    words = _group_relation(cfg, count, piece)
    counted = count > 0 and cfg.partition == "natural"
    epsilon = _group_epsilon(state, accountant) if counted else None
    return Guarantee(piece, epsilon, cfg.delta, accountant, words, *trust, "sample")


def _group_relation(config: FedsimConfig, count: int, piece: str) -> str:
    zeroed = f"zero out every training sample that holds one {piece} of a client's data"
    if count == 0:
        return f"{zeroed}: how many depends on the training data, which a count would publish"
    zeroed += f" (up to {count}; their gradients count as 0, the sample relation for a group"
    if config.partition != "natural":
        return (
            f"{zeroed}), which partition {config.partition} spreads over clients: no ε is "
            "computed (where the data has users, partition natural keeps each one's samples "
            "on one client)"
        )
    return (
        f"{zeroed}: k of them in a Poisson batch move the clipped sum by up to k·C, their "
        f"clipped gradients aligned, the worst case); changing the {piece}'s value replaces "
        "those samples, which costs more and is not counted here"
    )


def _group_epsilon(state: RunState, accountant: str) -> float:
    """The group's ε; 0.3-4 s a history, so one history that bounds every client size."""
    histories = privacy.dominating(state.sample_histories())
    delta = state.config.delta
    return max(
        (accounting.history_epsilon(h, delta=delta, accountant=accountant) for h in histories),
        default=0.0,
    )
