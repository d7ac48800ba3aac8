"""The one-run audit's ε lower bound beside the accountant's ε, at several targets (issue 15).

    python -m experiments.research.audit_frontier [--out results/audit-frontier]
        [--targets 1,2,4,8] [--canaries 1000] [--unit sample|user]

Sample unit: runs ``fedsim run`` once per target ε (dp = sample), once without DP, and
once without DP and without canaries (the accuracy they cost), one run at a time, on
digits with 2 clients, 5 local epochs, 10 rounds, lr 0.2 (the setting where the loss
audit sees a dp = none leak). User unit: once per target ε with dp = user and canary
clients, and once per target without them (the accuracy they cost), on digits with 100
clients, 25 a round, 20 rounds. Prints the table: each target's reported ε, the audit's
bound, its guesses, and accuracy. Runs already in ``--out`` are reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from fedsim.results import report

SETTINGS = {
    "sample": ["num-clients=2", "clients-per-round=2", "local-epochs=5", "num-rounds=10", "lr=0.2"],
    "user": ["dp='user'", "num-clients=100", "clients-per-round=25", "num-rounds=20"],
}


def run(out: Path, sets: list[str]) -> dict:
    """The summary of the run in ``out``, made with ``sets`` if it is not there yet."""
    if not (out / "summary.json").is_file():
        args = [a for s in sets for a in ("--set", s)]
        cmd = [sys.executable, "-m", "fedsim.experiments.cli", "run", "--out", str(out), *args]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def row(name: str, summary: dict, unit: str) -> str:
    """One Markdown row: the run, reported ε, the audit's bound and guesses, accuracy."""
    audit = (summary.get("audit") or {}).get(unit)
    eps = report.format_epsilon(summary["epsilon"], places=3)  # up, and the bound down
    bound = report.format_lower_bound(audit["epsilon"], places=3) if audit else "(no canaries)"
    guesses = f"{audit['correct']}/{audit['guesses']}" if audit else ""
    estimate = f"{audit['estimate']:.3f}" if audit and audit.get("estimate") is not None else ""
    sigma = summary["noise_multiplier" if unit == "sample" else "user_noise_multiplier"] or 0
    return (
        f"| {name} | {eps} | {sigma:.3f} | {bound} | {guesses} | {estimate} "
        f"| {summary['accuracy']:.4f} |"
    )


def main() -> None:
    """Run the targets and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/audit-frontier"))
    parser.add_argument("--targets", default="1,2,4,8")
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--unit", choices=sorted(SETTINGS), default="sample")
    args = parser.parse_args()
    unit, setting = args.unit, SETTINGS[args.unit]
    canaries = f"audit-canaries={args.canaries}"
    budget = "target-epsilon" if unit == "sample" else "user-target-epsilon"
    lines = [
        "| run | reported ε | σ | audit ε (95%) | right/guesses | estimate | accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for target in args.targets.split(","):
        sets = [*setting, f"{budget}={target}", f"name='eps{target}'"]
        lines.append(row(f"ε = {target}", run(args.out / f"eps{target}", [*sets, canaries]), unit))
        if unit == "user":  # what the canary clients cost, target by target
            plain = run(args.out.parent / f"{args.out.name}-no-canaries" / f"eps{target}", sets)
            lines.append(row(f"ε = {target}, no canaries", plain, unit))
    if unit == "sample":
        none = run(args.out / "none", [*setting, "dp='none'", canaries])
        lines.append(row("dp = none", none, unit))
        plain = run(
            args.out.parent / f"{args.out.name}-no-canaries" / "none", [*setting, "dp='none'"]
        )
        lines.append(row("dp = none, no canaries", plain, unit))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
