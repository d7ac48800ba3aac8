"""The accuracy-versus-ε frontier, rebuilt from result folders alone."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from fedsim.dp import History, pooled_epsilon
from fedsim.results import files
from fedsim.results.plots import plot_frontier
from fedsim.results.report import format_epsilon, format_lower_bound
from fedsim.results.schema import Result, load_run

IGNORED = {"seed", "name", "out-dir"}  # keys that never make two runs different points
# keys the table shows in columns of their own, or as the achieved ε and the unit
SHOWN = {
    "dp", "target-epsilon", "noise-multiplier", "user-noise-multiplier", "max-grad-norm",
    "max-update-norm", "num-rounds", "clients-per-round", "num-clients", "secure-noise",
}  # fmt: skip
FIELDS = (
    "setting", "unit", "epsilon", "delta", "accountant", "accuracy_mean", "accuracy_std", "seeds",
    "epsilon_pooled", "pooled_accountant",
    "noise_multiplier", "clip", "rounds", "clients_per_round", "num_clients", "noise",
    "audit_epsilon", "audit_confidence", "runs",
)  # fmt: skip


def _point_key(summary: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in summary["config"].items() if k not in IGNORED))


def frontier(runs: list[Path]) -> list[dict]:
    """One row per distinct config (seeds pooled), sorted by ε, non-private last."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        result = load_run(run)
        summary = result.summary | {"_dir": run.name, "_privacy": result.privacy}
        groups.setdefault(_point_key(summary), []).append(summary)
    settings = _settings(list(groups))
    rows = [_row(group) | {"setting": settings[key]} for key, group in groups.items()]
    return sorted(rows, key=lambda r: (r["unit"] == "none", r["unit"], r["epsilon"]))


def _settings(keys: list[tuple]) -> dict[tuple, str]:
    """What sets each point apart that no column shows: ``lr=0.1 model=lstm``, say."""
    points = [dict(key) for key in keys]
    names = sorted({k for p in points for k in p} - SHOWN)
    varying = [k for k in names if len({p.get(k) for p in points}) > 1]
    return {
        key: " ".join(f"{k}={p.get(k, '')}" for k in varying)
        for key, p in zip(keys, points, strict=True)
    }


def _row(group: list[dict]) -> dict:
    first = group[0]
    unit = first["privacy_unit"]
    accs = [s["accuracy"] for s in group]
    user = unit == "user"
    return {
        "unit": unit,
        "epsilon": max(s["epsilon"] for s in group) if unit != "none" else math.inf,
        "delta": first["delta"] or "",
        "accountant": first["accountant"] or "",
        "accuracy_mean": round(statistics.fmean(accs), 4),
        "accuracy_std": round(statistics.stdev(accs), 4) if len(accs) > 1 else 0.0,
        "seeds": len(group),
        **_pooled(group, unit),
        "noise_multiplier": _sigma(first["user_noise_multiplier" if user else "noise_multiplier"]),
        "clip": first["max_update_norm"] if user else first["max_grad_norm"] or "",
        "rounds": first["num_rounds"],
        "clients_per_round": first["config"]["clients-per-round"],
        "num_clients": first["num_clients"],
        "noise": first.get("noise", {}).get("kind", "seeded") if unit != "none" else "",
        **_audit(group),
        "runs": " ".join(sorted(s["_dir"] for s in group)),
    }


def _sigma(value: float | None) -> float | str:
    return "" if not value else round(value, 4)  # no DP: no σ (older runs wrote 0.0)


def _pooled(group: list[dict], unit: str) -> dict:
    """ε over all the point's runs, which share their data: composed, not the largest.

    One run's ε is its own; several are composed from their ``privacy.json`` ledgers
    (:func:`fedsim.dp.accounting.pooled_epsilon`).
    """
    if unit == "none":
        return {"epsilon_pooled": math.inf, "pooled_accountant": ""}
    if len(group) == 1:
        return {"epsilon_pooled": group[0]["epsilon"], "pooled_accountant": group[0]["accountant"]}
    runs = [_histories(s["_privacy"]["units"][unit]) for s in group]
    eps, accountant = pooled_epsilon(
        runs, delta=group[0]["delta"], accountant=group[0]["accountant"]
    )
    return {"epsilon_pooled": eps, "pooled_accountant": accountant}


def _histories(record: dict) -> list[History]:
    """A headline unit's histories in ``privacy.json``: per client, or the user unit's.

    The sample unit heads a run only without user-level DP, so it has its clients'
    ledgers, not the per-size schedules it publishes beside secret cohorts.
    """

    def steps(entry: dict) -> tuple[float, float, int]:
        return entry["noise_multiplier"], entry["sample_rate"], entry["steps"]

    if "clients" in record:  # the sample unit: each client's ledger
        return [[steps(e) for e in entries] for entries in record["clients"].values()]
    return [[steps(e) for e in record["rounds"]]]  # the user unit


def headline_audit(summary: dict) -> dict | None:
    """The audit of a run's headline unit: the sample unit's for a run without DP."""
    audits = summary.get("audit") or {}
    unit = summary["privacy_unit"]
    return audits.get("sample" if unit == "none" else unit)


def _audit(group: list[dict]) -> dict:
    """The audit's bound over a point's seeds: the largest, at the union bound's confidence.

    Each seed's bound holds at its confidence 1 − β; the largest of n holds at 1 − n·β.
    """
    audits = [a for a in map(headline_audit, group) if a is not None]
    if not audits:
        return {"audit_epsilon": "", "audit_confidence": ""}
    miss = sum(1.0 - a["confidence"] for a in audits)
    return {
        "audit_epsilon": max(a["epsilon"] for a in audits),
        "audit_confidence": max(0.0, 1.0 - miss),
    }


def markdown(rows: list[dict]) -> str:
    """The frontier as a Markdown table (what goes into docs and papers)."""
    setting = any(r["setting"] for r in rows)  # a column only where points differ so
    cols = ["setting"] * setting
    cols += ["unit", "ε", "δ", "accountant", "accuracy (mean ± std)", "seeds", "ε, seeds pooled"]
    cols += ["σ", "clip"]
    cols += ["rounds", "cohort", "clients", "noise", "audit ε ≥"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append(
            "| "
            + f"{r['setting']} | " * setting
            + f"{r['unit']} | {format_epsilon(r['epsilon'])} | {r['delta']} | {r['accountant']} "
            f"| {r['accuracy_mean']:.4f} ± {_spread(r)} | {r['seeds']} "
            f"| {_pooled_cell(r)} | {r['noise_multiplier']} | {r['clip']} | {r['rounds']} "
            f"| {r['clients_per_round']} | {r['num_clients']} | {r['noise']} "
            f"| {_audit_cell(r)} |"
        )
    note = (
        "\nsetting: the config keys whose values set the row apart and have no column. "
        "ε: the largest of the row's runs, each alone. ε, seeds pooled: the row's runs "
        "share their data, so a reader of all of them (the mean accuracy reads all) faces "
        "their composition, under the accountant in brackets where it is not the row's. "
        "The whole table composes further still, and a row without DP bounds nothing.\n"
        "noise: secure = from the operating system; seeded = from the config's seed, so the ε "
        "holds only against whoever does not know the seed. audit ε ≥: the one-run canary "
        "audit's measured lower bound for the row's unit (sample: canary examples scored by "
        "the final model's loss; user: canary clients scored by cosine) at the confidence "
        "shown, the largest over the seeds; blank without canaries.\n"
    )
    return "\n".join(lines) + "\n" + note


def _spread(row: dict) -> str:
    return f"{row['accuracy_std']:.4f}" if row["seeds"] > 1 else "–"  # one seed: no spread


def _pooled_cell(row: dict) -> str:
    cell = format_epsilon(row["epsilon_pooled"])
    if row["pooled_accountant"] and row["pooled_accountant"] != row["accountant"]:
        cell += f" ({row['pooled_accountant']})"
    return cell


def _audit_cell(row: dict) -> str:
    if row["audit_epsilon"] == "":
        return ""
    return f"{format_lower_bound(row['audit_epsilon'])} ({row['audit_confidence']:.0%})"


def write_frontier(rows: list[dict], out_dir: Path) -> list[Path]:
    """Write ``frontier.csv``, ``frontier.md`` and the plot (PNG and SVG) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    infinite = ("epsilon", "epsilon_pooled")
    csv_rows = [r | {k: "inf" for k in infinite if math.isinf(r[k])} for r in rows]
    files.write_csv(out_dir / "frontier.csv", csv_rows, FIELDS)
    files.write_atomic(out_dir / "frontier.md", markdown(rows))
    plots = plot_frontier(rows, out_dir / "frontier")
    return [out_dir / "frontier.csv", out_dir / "frontier.md", *plots]


@dataclass(frozen=True)
class Sweep:
    """A sweep folder read back: its frontier rows and every finished run in it."""

    path: Path
    frontier: list[dict]
    runs: list[Result]


def load_sweep(path: str | Path) -> Sweep:
    """The :class:`Sweep` in folder ``path`` (a ``fedsim sweep --out``)."""
    runs = files.find_runs([Path(path)])
    return Sweep(Path(path), frontier(runs), [load_run(r) for r in runs])
