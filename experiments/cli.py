"""The ``fedsim`` command: ``fedsim run``, ``deploy``, ``sweep`` and ``report``."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from fedsim.errors import FedsimError

FRONTIER_DOCS = "README.md, section 'Accuracy against privacy' (fedsim sweep, fedsim report)"


def _parser() -> argparse.ArgumentParser:
    from fedsim.experiments.run import add_config_arguments

    parser = argparse.ArgumentParser(prog="fedsim", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one experiment in Flower's simulation engine")
    add_config_arguments(run, "experiment TOML (experiments/configs/*.toml)")
    run.add_argument("--out", type=Path, help="results folder (default results/<name>-<time>)")
    run.add_argument("--resume", type=Path, metavar="DIR", help="continue the unfinished run DIR")
    run.add_argument("--force", action="store_true", help="replace an existing results folder")
    run.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    sw = sub.add_parser("sweep", help="run a grid of experiments over seeds; write the frontier")
    add_config_arguments(sw, "base experiment TOML")
    sw.add_argument(
        "--grid", action="append", default=[], required=True, metavar="KEY=V1,V2",
        help="a swept key, e.g. --grid target-epsilon=0.5,1,2,4,8,none (none: no DP)",
    )  # fmt: skip
    sw.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    sw.add_argument("--jobs", type=int, default=0, help="runs at a time (default: by CPUs)")
    sw.add_argument("--out", type=Path, help="sweep folder; the same --out continues a sweep")
    from fedsim.experiments.deploy import add_arguments

    add_arguments(sub.add_parser("deploy", help="run one experiment on real Flower processes"))
    rep = sub.add_parser("report", help="rebuild tables and plots from result folders")
    rep.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="runs, or sweep folders")
    rep.add_argument("--out", type=Path, help="where to write the frontier of several runs")
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    """Validate the config, run it, print the accuracy-against-ε table."""
    from fedsim.config import load_config
    from fedsim.experiments.run import resume_target, run_experiment
    from fedsim.results import report

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


def cmd_deploy(args: argparse.Namespace) -> int:
    """Run on a local SuperLink and SuperNodes; print the accuracy-against-ε line."""
    from fedsim.experiments.deploy import cmd_deploy as deploy
    from fedsim.results import report

    run_dir = deploy(args)
    summary, _ = report.load_run(run_dir)
    print()
    print(report.summary_line(summary))
    print(f"results: {run_dir}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run the grid, then print and write the frontier."""
    import time

    from fedsim.config import load_config
    from fedsim.experiments.sweep import default_jobs, run_sweep

    base = load_config(args.config, args.overrides)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise FedsimError(f"--seeds expects integers like 0,1,2, got '{args.seeds}'") from None
    out = args.out or Path(base.out_dir) / f"sweep-{base.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    jobs = args.jobs or default_jobs(base.client_cpus)
    run_sweep(
        config=args.config, base=args.overrides, grid=args.grid, seeds=seeds, jobs=jobs, out=out
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Rebuild each run's table and plot, and the frontier of several, from files alone."""
    from fedsim.results import frontier, report

    runs = frontier.find_runs(args.dirs)
    missing = [d for d in args.dirs if not d.is_dir()]
    if missing or not runs:
        bad = missing[0] if missing else args.dirs[0]
        raise FedsimError(f"{bad} has no summary.json; pass finished results or sweep folders")
    for run_dir in runs:
        summary, rounds = report.load_run(run_dir)
        report.plot_run(run_dir)
        if len(runs) == 1:
            print(report.round_table(rounds))
        print(f"{run_dir}: {report.summary_line(summary)}")
    if len(runs) > 1:
        rows = frontier.frontier(runs)
        print(frontier.markdown(rows))
        sweeps = [d for d in args.dirs if not (d / "summary.json").is_file()]
        out = args.out or (sweeps[0] if len(sweeps) == 1 else None)
        if out is not None:
            print(f"frontier: {', '.join(map(str, frontier.write_frontier(rows, out)))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors print one line and exit with status 2."""
    from fedsim.server.rounds import RunInterrupted

    args = _parser().parse_args(argv)
    handlers = {"run": cmd_run, "deploy": cmd_deploy, "sweep": cmd_sweep, "report": cmd_report}
    handler = handlers[args.command]
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
