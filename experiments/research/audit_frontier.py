"""The one-run audit's ε lower bound beside the accountant's ε, at several targets (issue 15).

    python -m experiments.research.audit_frontier [--out results/audit-frontier]
        [--targets 1,2,4,8] [--canaries 1000]

Runs ``fedsim run`` once per target ε (dp = sample), once without DP, and once without DP
and without canaries (the accuracy they cost), one run at a time, on digits with 2 clients,
5 local epochs, 10 rounds, lr 0.2 (the setting where the loss audit sees a dp = none leak).
Prints the table: each target's reported ε, the audit's bound, its guesses, and accuracy.
Runs already in ``--out`` are reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SETTING = ["num-clients=2", "clients-per-round=2", "local-epochs=5", "num-rounds=10", "lr=0.2"]


def run(out: Path, sets: list[str]) -> dict:
    """The summary of the run in ``out``, made with ``sets`` if it is not there yet."""
    if not (out / "summary.json").is_file():
        args = [a for s in SETTING + sets for a in ("--set", s)]
        cmd = [sys.executable, "-m", "fedsim.experiments.cli", "run", "--out", str(out), *args]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def row(name: str, summary: dict) -> str:
    """One Markdown row: the run, reported ε, the audit's bound and guesses, accuracy."""
    audit = summary.get("audit")
    eps = "∞" if summary["epsilon"] is None else f"{summary['epsilon']:.3f}"
    bound = f"{audit['epsilon']:.3f}" if audit else "(no canaries)"
    guesses = f"{audit['correct']}/{audit['guesses']}" if audit else ""
    sigma = summary["noise_multiplier"]
    return f"| {name} | {eps} | {sigma:.3f} | {bound} | {guesses} | {summary['accuracy']:.4f} |"


def main() -> None:
    """Run the targets and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/audit-frontier"))
    parser.add_argument("--targets", default="1,2,4,8")
    parser.add_argument("--canaries", type=int, default=1000)
    args = parser.parse_args()
    canaries = f"audit-canaries={args.canaries}"
    lines = [
        "| run | reported ε | σ | audit ε (95%) | right/guesses | accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for target in args.targets.split(","):
        sets = [f"target-epsilon={target}", canaries, f"name='eps{target}'"]
        lines.append(row(f"ε = {target}", run(args.out / f"eps{target}", sets)))
    lines.append(row("dp = none", run(args.out / "none", ["dp='none'", canaries])))
    plain = run(args.out.parent / f"{args.out.name}-no-canaries" / "none", ["dp='none'"])
    lines.append(row("dp = none, no canaries", plain))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
