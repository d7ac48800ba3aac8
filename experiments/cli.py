"""The ``fedsim`` command, a thin layer over the Python API (``fedsim.experiments.api``).

Parsing and config errors need only the config schema; a handler imports the engine
(torch, Flower, Ray) when it runs, so ``--help`` and one-line config errors answer at
once. User errors print one line and exit 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from fedsim.config import (
    FedsimConfig,
    config_values,
    deploy_config,
    key_table,
    load_config,
    rooted,
)
from fedsim.errors import FedsimError, RunInterrupted, RunStopped, file_error, first_line
from fedsim.experiments.machine import check_machine
from fedsim.experiments.rundir import check_new
from fedsim.experiments.signals import STOP_WITHIN_S
from fedsim.results import Result, find_runs, load_run, report

FRONTIER_DOCS = "README.md, section 'Accuracy against privacy' (fedsim sweep, fedsim report)"
KEYS_HINT = "every config key, its default and meaning: fedsim keys"


def parser() -> argparse.ArgumentParser:
    """The command line of ``fedsim``."""
    top = argparse.ArgumentParser(
        prog="fedsim",
        description="Federated, differentially private learning on Flower and Opacus.",
        epilog=KEYS_HINT,
    )
    top.add_argument("--debug", action="store_true", help="show tracebacks on errors (anywhere)")
    sub = top.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", help="run one experiment in Flower's simulation engine", epilog=KEYS_HINT
    )
    config_arguments(run, "experiment TOML (experiments/configs/*.toml)")
    run.add_argument("--out", type=Path, help="results folder (default results/<name>-<time>)")
    run.add_argument("--resume", type=Path, metavar="DIR", help="continue the unfinished run DIR")
    run.add_argument(
        "--force", action="store_true", help="replace a finished run's folder (nothing else)"
    )
    run.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    sweep = sub.add_parser(
        "sweep", help="run a grid of experiments over seeds; write the frontier", epilog=KEYS_HINT
    )
    config_arguments(sweep, "base experiment TOML")
    sweep.add_argument(
        "--grid", action="append", default=[], required=True, metavar="KEY=V1,V2",
        help="a swept key, e.g. --grid target-epsilon=0.5,1,2,4,8,none (none: no DP)",
    )  # fmt: skip
    sweep.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    sweep.add_argument("--jobs", type=int, default=0, help="runs at a time (default: by CPUs)")
    sweep.add_argument("--out", type=Path, help="sweep folder; the same --out continues a sweep")
    deploy_arguments(sub.add_parser("deploy", help="run one experiment on real Flower processes"))
    report = sub.add_parser("report", help="rebuild tables and plots from result folders")
    report.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="runs, or sweep folders")
    report.add_argument("--out", type=Path, help="where to write the frontier of several runs")
    sub.add_parser("keys", help="list every config key with its default and meaning")
    return top


def config_arguments(parser: argparse.ArgumentParser, config_help: str) -> None:
    """``--config`` and ``--set``, as every command that runs a config takes them."""
    parser.add_argument("--config", type=Path, action="append", default=[], help=config_help)
    parser.add_argument("config_file", nargs="?", type=Path, metavar="CONFIG", help="as --config")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys: --set num-rounds=5, or several: --set 'lr=0.1 seed=2'",
    )


def deploy_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fedsim deploy``."""
    config_arguments(parser, "experiment TOML, as for fedsim run")
    parser.add_argument(
        "--num-nodes", type=int, metavar="N", help="SuperNodes to start (sets num-clients)"
    )
    parser.add_argument("--out", type=Path, help="results folder (default results/<name>-<time>)")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the SuperLink listens on (default 127.0.0.1; others mean TLS and auth)",
    )
    secure = "on unless --host is loopback"
    parser.add_argument(
        "--tls", action=argparse.BooleanOptionalAction,
        help=f"TLS with generated test certificates ({secure})",
    )  # fmt: skip
    parser.add_argument(
        "--auth", action=argparse.BooleanOptionalAction,
        help=f"SuperNode authentication with generated, registered key pairs ({secure})",
    )  # fmt: skip
    parser.add_argument(
        "--node-data-dir", dest="node_data_dirs", action="append", default=[], type=Path,
        metavar="DIR", help="one per SuperNode, in order: its own local dataset",
    )  # fmt: skip
    parser.add_argument(
        "--timeout", type=float, default=0.0, metavar="S", help="give up after S seconds"
    )
    parser.add_argument("--verbose", action="store_true", help="show Flower's log stream")


def one_config(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the config file given either way (``CONFIG`` or ``--config``) as ``config``."""
    given = getattr(args, "config_file", None)
    configs = [*([given] if given is not None else []), *getattr(args, "config", [])]
    if len(configs) > 1:  # a later one would replace the first unread, even a missing one
        raise FedsimError(
            f"{len(configs)} configs given ({', '.join(map(str, configs))}); give one, and "
            "change its keys with --set"
        )
    if hasattr(args, "config"):
        args.config = shipped(configs[0]) if configs else None
    return args


SHIPPED = Path(__file__).parent / "configs"  # experiments/configs, installed with fedsim


def shipped(path: Path) -> Path:
    """``path``, or where no such file is here, the shipped config of that name.

    ``fedsim run mnist-cnn`` (or ``mnist-cnn.toml``) then works in any folder.
    """
    if path.exists() or path.parent != Path():
        return path
    found = SHIPPED / (path.name if path.suffix == ".toml" else f"{path.name}.toml")
    if not found.is_file():
        names = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.toml")))
        raise FedsimError(
            f"config file {path} does not exist here, and no shipped config has that name; "
            f"pass an existing .toml file, or one of: {names}"
        )
    print(f"fedsim: config {path}: the shipped {found}", flush=True)
    return found


def cmd_run(args: argparse.Namespace) -> int:
    """Validate the config, run (or resume) it, print the accuracy-against-ε table."""
    if args.resume is not None and (args.config or args.overrides or args.out or args.force):
        raise FedsimError(
            "--resume continues a run exactly as it was; drop --config/--set/--out/--force"
        )
    if args.resume is not None:
        from fedsim.experiments import api  # the engine: torch, Flower, Ray

        result = api.resume(args.resume, verbose=args.verbose, stop_within=STOP_WITHIN_S)
    else:
        result = _run(rooted(load_config(args.config, args.overrides)), args)
    _print_result(result, table=True)
    print(f"accuracy-versus-ε frontiers over many runs: see {FRONTIER_DOCS}")
    return 0


def _run(config: FedsimConfig, args: argparse.Namespace) -> Result:
    """Run ``config``, with Ray starting while the engine imports (5-12 s each).

    The data is checked first (numpy only): a wrong data-dir or an infeasible partition
    fails in a second or two, before Ray has to be started and stopped again.
    """
    print(
        f"fedsim: {config.name}: {config.model} on {config.dataset}, {config.num_clients} "
        f"clients, {config.num_rounds} rounds, dp={config.dp}",
        flush=True,
    )
    from fedsim.data import load_checked  # numpy: the other commands do without it

    check_machine(config)  # no GPU where one is certainly absent: said before Ray starts
    dataset = load_checked(config)
    if args.out is not None:
        check_new(args.out, force=args.force)  # a taken or unwritable --out, before Ray (8 s)
    from fedsim.experiments.raystart import RayStart  # Ray alone: 0.5 s

    with RayStart(config, verbose=args.verbose) as ray_start:
        from fedsim.experiments.run import run_experiment  # the engine: torch, Opacus, Flower

        folder = run_experiment(
            config,
            out=args.out,
            force=args.force,
            verbose=args.verbose,
            ray_start=ray_start,
            dataset=dataset,
            stop_within=STOP_WITHIN_S,
        )
    return load_run(folder)


def cmd_deploy(args: argparse.Namespace) -> int:
    """Run on a local SuperLink and SuperNodes; print the accuracy-against-ε line."""
    values = config_values(args.config, args.overrides)
    # a bad config or data fails before the engine imports (10 s)
    config = deploy_config(values, args.num_nodes, args.node_data_dirs)
    from fedsim.data import check_node_data, load_checked  # numpy

    check_machine(config)  # the SuperNodes run here
    dataset = None
    if args.node_data_dirs:
        check_node_data(config, args.node_data_dirs)
    else:
        dataset = load_checked(config)
    if args.out is not None:
        check_new(args.out)  # a taken or unwritable --out, before the engine imports
    from fedsim.experiments import deploy  # the engine: torch, Flower, certificates

    folder = deploy.deploy(
        config,
        out=args.out,
        host=args.host,
        tls=args.tls,
        auth=args.auth,
        node_data_dirs=tuple(args.node_data_dirs),
        timeout=args.timeout,
        verbose=args.verbose,
        dataset=dataset,
    )
    result = load_run(folder)
    _print_result(result, table=False)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run the grid, then print and write the frontier."""
    values = config_values(args.config, args.overrides)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise FedsimError(f"--seeds expects integers like 0,1,2, got '{args.seeds}'") from None
    from fedsim.experiments import api, sweep  # the engine

    grid = sweep.grid_axes(args.grid)
    api.sweep(values, grid=grid, seeds=seeds, jobs=args.jobs, out=args.out)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Rebuild each run's table and plot, and the frontier of several, from files alone."""
    runs = find_runs(args.dirs)
    missing = [d for d in args.dirs if not d.is_dir()]
    if missing or not runs:
        bad = missing[0] if missing else args.dirs[0]
        raise FedsimError(f"{bad} has no summary.json; pass finished results or sweep folders")
    from fedsim.results import plots  # matplotlib: 1 s

    for run_dir in runs:
        result = load_run(run_dir)
        try:
            plots.plot_run(result)
        except OSError as exc:  # a colleague's or an archived folder: report it all the same
            print(f"{run_dir}: its plot was not redrawn ({exc.strerror or exc})")
        if len(runs) == 1:
            print(report.round_table(result.rounds))
        print(f"{run_dir}: {report.summary_line(result.summary)}")
    if len(runs) > 1:
        from fedsim.results import frontier  # its pooled ε: the accountants, torch, Opacus

        rows = frontier.frontier(runs)
        print(frontier.markdown(rows))
        sweeps = [d for d in args.dirs if not (d / "summary.json").is_file()]
        out = args.out or (sweeps[0] if len(sweeps) == 1 else None)
        if out is not None:
            try:
                written = frontier.write_frontier(rows, out)
            except OSError as exc:
                raise file_error(exc.filename or out, exc, "give another --out") from None
            print(f"frontier: {', '.join(map(str, written))}")
    elif args.out is not None:
        print("no frontier: it compares several runs; --out is for their frontier")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """Every config key with its default and meaning."""
    rows = key_table()
    width = max(len(key) for key, _, _ in rows)
    for key, default, meaning in rows:
        print(f"{key:<{width}}  {default:<12}  {meaning}")
    return 0


def _print_result(result: Result, *, table: bool) -> None:
    print()
    if table:
        print(report.round_table(result.rounds))
        print()
    print(report.summary_line(result.summary))
    print(f"results: {result.path}")


HANDLERS = {
    "run": cmd_run,
    "deploy": cmd_deploy,
    "sweep": cmd_sweep,
    "report": cmd_report,
    "keys": cmd_keys,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors print one line and exit with status 2."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    # taken anywhere: an error says "rerun with --debug", and that is added at the end
    argv = [arg for arg in argv if arg != "--debug"]
    # your own parts ("mymodels:MLP") import from the folder you run in, as with
    # `python -m`; appended, so that a local folder never hides an installed package
    sys.path.append(os.getcwd())
    try:
        args = one_config(parser().parse_args(argv))
        return HANDLERS[args.command](args)
    except (RunInterrupted, RunStopped) as exc:  # RunStopped: the API's, where it calls it
        print(f"fedsim: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except FedsimError as exc:
        if debug:
            traceback.print_exc()
        print(f"fedsim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedsim: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        print(
            f"fedsim: internal error: {type(exc).__name__}: {str(exc).strip() and first_line(exc)} "
            "(rerun with --debug for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    from fedsim.experiments.console import main as console_main  # the installed command's way

    console_main()
