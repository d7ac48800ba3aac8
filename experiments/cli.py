"""The ``fedsim`` command: ``fedsim run`` and ``fedsim report``."""

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
    rep = sub.add_parser("report", help="rebuild tables and plots from result folders")
    rep.add_argument("dirs", nargs="+", type=Path, metavar="DIR")
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    """Validate the config, run it, print the accuracy-against-ε table."""
    from experiments.run import resume_target, run_experiment
    from fedsim import report
    from fedsim.config import load_config

    out = args.out
    if args.resume is not None:
        if args.config or args.overrides or args.out:
            raise FedsimError(
                "--resume continues a run exactly as it was; drop --config/--set/--out"
            )
        out, config = resume_target(args.resume)
    else:
        config = load_config(args.config, args.overrides)
    print(
        f"fedsim: {config.name}: {config.model} on {config.dataset}, {config.num_clients} "
        f"clients, {config.num_rounds} rounds, dp={config.dp}",
        flush=True,
    )
    run_dir = run_experiment(
        config, out=out, resume=args.resume is not None, force=args.force, verbose=args.verbose
    )
    summary, rounds = report.load_run(run_dir)
    print()
    print(report.round_table(rounds))
    print()
    print(report.summary_line(summary))
    print(f"results: {run_dir}")
    print(f"accuracy-versus-ε frontiers over many runs: see {FRONTIER_DOCS}")
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
    handler = {"run": cmd_run, "report": cmd_report}[args.command]
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
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"fedsim: internal error: {type(exc).__name__}: {_first_line(exc)} "
            "(rerun with --debug for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else ""


if __name__ == "__main__":
    sys.exit(main())
