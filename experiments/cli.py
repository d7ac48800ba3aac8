"""The ``fedsim`` command: ``fedsim run``, ``fedsim deploy`` and ``fedsim report``."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from fedsim.errors import FedsimError

FRONTIER_DOCS = "README.md, section 'Accuracy against privacy'"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsim", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one experiment in Flower's simulation engine")
    run.add_argument("--config", type=Path, help="experiment TOML (experiments/configs/*.toml)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set num-rounds=5 (repeatable)",
    )
    run.add_argument("--out", type=Path, help="results folder (default results/<name>-<time>)")
    run.add_argument("--resume", type=Path, metavar="DIR", help="continue the unfinished run DIR")
    run.add_argument("--force", action="store_true", help="replace an existing results folder")
    run.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    from experiments.deploy import add_arguments

    add_arguments(sub.add_parser("deploy", help="run one experiment on real Flower processes"))
    rep = sub.add_parser("report", help="rebuild tables and plots from result folders")
    rep.add_argument("dirs", nargs="+", type=Path, metavar="DIR")
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    """Validate the config, run it, print the accuracy-against-ε table."""
    from experiments.run import run_experiment
    from fedsim import report
    from fedsim.config import load_config

    config = load_config(args.config, args.overrides)
    print(
        f"fedsim: {config.name}: {config.model} on {config.dataset}, "
        f"{config.num_clients} clients, {config.num_rounds} rounds, dp={config.dp}",
        flush=True,
    )
    run_dir = run_experiment(config, out=args.out, verbose=args.verbose)
    summary, rounds = report.load_run(run_dir)
    print()
    print(report.round_table(rounds))
    print()
    print(report.summary_line(summary))
    print(f"results: {run_dir}")
    print(f"accuracy-versus-ε frontiers over many runs: see {FRONTIER_DOCS}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    """Run on a local SuperLink and SuperNodes; print the accuracy-against-ε table."""
    from experiments.deploy import cmd_deploy as deploy
    from fedsim import report

    run_dir = deploy(args)
    summary, _ = report.load_run(run_dir)
    print()
    print(report.summary_line(summary))
    print(f"results: {run_dir}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Print each run's table and rebuild its plot from its files."""
    from fedsim import report

    for run_dir in args.dirs:
        if not (run_dir / "summary.json").is_file():
            raise FedsimError(f"{run_dir} has no summary.json; pass a finished results folder")
        summary, rounds = report.load_run(run_dir)
        print(f"== {run_dir}")
        print(report.round_table(rounds))
        print(report.summary_line(summary))
        print(f"plot: {report.plot_run(run_dir)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors print one line and exit with status 2."""
    from server.rounds import RunInterrupted

    args = _parser().parse_args(argv)
    handler = {"run": cmd_run, "deploy": cmd_deploy, "report": cmd_report}[args.command]
    try:
        return handler(args)
    except RunInterrupted as exc:
        print(
            f"fedsim: {exc}; continue with: fedsim run --resume <the folder above>", file=sys.stderr
        )
        return 130
    except FedsimError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"fedsim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedsim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
