"""Federation overhead: `fedsim run` against the same work in one plain loop.

    python -m experiments.research.bench_federation [--data-dir ../shared/data/mnist] [--rounds 30]
        [--model fedavg-cnn] [--dp none,sample]

The workload of issue 6: MNIST, the FedAvg paper's CNN, 100 clients, 10 per round, 1 local
epoch, batch 32, central evaluation every round; with and without DP. The plain loop does
the same local steps (same partitions, seeds and library functions) and evaluations in one
process with the same total torch threads; the ratio is the price of Flower, Ray and
messaging. Each side runs as its own process and is timed from launch to exit, imports
included: "per round" is the mean of rounds 2..N (round 1 also pays for the workers'
warm-up), and "startup" is the rest of the total.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fedsim import results
from fedsim.config import FedsimConfig, parse_config, toml_literal

PLAIN, FEDSIM, PFL = "plain loop", "fedsim run", "pfl 0.6"
Side = tuple[float, list[float], float]

ROOT = Path(__file__).resolve().parents[2]  # the checkout: research runs from it


def workload(data_dir: str, rounds: int, dp: str, model: str) -> FedsimConfig:
    """The benchmark's config (σ fixed so both sides do identical DP work)."""
    return parse_config(
        {"name": f"bench-{dp}", "dataset": "mnist", "data-dir": data_dir, "model": model,
         "num-clients": 100, "clients-per-round": 10, "num-rounds": rounds, "local-epochs": 1,
         "batch-size": 32, "lr": 0.05, "dp": dp,
         "noise-multiplier": 1.0 if dp == "sample" else 0.0}
    )  # fmt: skip


def plain_loop(config: FedsimConfig) -> tuple[list[float], float]:
    """Seconds of each round and the final accuracy of the same work in one loop.

    Round 0 is loading the data and the first evaluation, as in ``fedsim run``.
    """
    import torch

    from fedsim.clients.local import train_round
    from fedsim.data import load_dataset
    from fedsim.dp import seeded_root
    from fedsim.models import build_model, evaluate, model_kwargs
    from fedsim.server.strategy import sample_clients

    clock = time.perf_counter()
    dataset = load_dataset(config.dataset, config.data_dir)
    torch.manual_seed(config.seed)
    model = build_model(config.model, **model_kwargs(dataset))
    evaluate(model, dataset.x_test, dataset.y_test)
    seconds = [time.perf_counter() - clock]
    for r in range(1, config.num_rounds + 1):
        clock = time.perf_counter()
        chosen = sample_clients(config.num_clients, config.clients_per_round,
                                root=seeded_root(config.seed), server_round=r)  # fmt: skip
        states, sizes = [], []
        for c in chosen:
            state, report = train_round(config, c, r, model.state_dict())
            states.append(state)
            sizes.append(report.num_examples)
        weights = np.array(sizes) / sum(sizes)
        model.load_state_dict(
            {k: sum(w * s[k] for w, s in zip(weights, states, strict=True)) for k in states[0]}
        )
        accuracy = evaluate(model, dataset.x_test, dataset.y_test)[1]
        seconds.append(time.perf_counter() - clock)
    return seconds, accuracy


def run_side(side: str, config: FedsimConfig, python: str = sys.executable) -> Side:
    """(total wall s from launch to exit, seconds of rounds 0..N, final accuracy)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sets = [a for k, v in config.to_flat().items() for a in ("--set", f"{k}={toml_literal(v)}")]
        (folder / "config.json").write_text(json.dumps(config.to_flat()))
        command = {
            PLAIN: ["-m", "experiments.research.bench_federation", "--plain", tmp],
            FEDSIM: ["-m", "fedsim.experiments.cli", "run", "--out", str(folder / "run"), *sets],
            PFL: ["-m", "experiments.research.bench_pfl", tmp],
        }[side]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}  # pfl's environment finds fedsim here
        start = time.perf_counter()
        done = subprocess.run([python, *command], capture_output=True, text=True, cwd=ROOT, env=env)
        total = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"bench_federation: the {side} side failed:\n{done.stderr[-3000:]}")
        if side == FEDSIM:
            seconds = results.round_seconds(folder / "run")
            accuracy = json.loads((folder / "run" / "summary.json").read_text())["accuracy"]
        else:
            seconds, accuracy = json.loads((folder / "result.json").read_text())
    return total, seconds, accuracy


def default_pfl_python() -> str | None:
    """This Python if it can import pfl, else the one ``./install.sh --pfl`` made, else None."""
    if importlib.util.find_spec("pfl"):
        return sys.executable
    made = ROOT / ".venv-pfl" / "bin" / "python"
    return str(made) if made.exists() else None


def split_total(total: float, seconds: list[float]) -> tuple[float, float]:
    """(startup s, steady s per round): the mean of rounds 2..N, the rest is startup."""
    steady = seconds[2:] or seconds[1:]
    per_round = sum(steady) / len(steady)
    return total - per_round * (len(seconds) - 1), per_round


def main(argv: list[str] | None = None) -> None:
    """Print the overhead table, one row per (dp, side)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared/data/mnist"))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--model", default="fedavg-cnn")
    parser.add_argument("--dp", default="none,sample", help="comma-separated dp modes")
    parser.add_argument(
        "--pfl-python",
        default=default_pfl_python(),
        help="a Python with pfl[pytorch] (and fedsim's dependencies) installed: adds pfl's "
        "row to the dp=none table (default: this Python if it has pfl, else "
        ".venv-pfl/bin/python if ./install.sh --pfl made it)",
    )
    parser.add_argument("--plain", help=argparse.SUPPRESS)  # internal: run one plain loop
    args = parser.parse_args(argv)
    if args.plain:  # a folder holding config.json; the result goes to plain.json
        config = parse_config(json.loads((Path(args.plain) / "config.json").read_text()))
        (Path(args.plain) / "result.json").write_text(json.dumps(plain_loop(config)))
        return
    print("| dp | side | startup s | s/round | total s | accuracy | ratio/round | ratio total |")
    print("|---|---|---|---|---|---|---|---|")
    for dp in args.dp.split(","):
        config = workload(args.data_dir, args.rounds, dp, args.model)
        # the loop trains one client at a time on both cores; the simulation runs two
        # one-thread clients at once: the same two cores either way
        floor = run_side(PLAIN, config.model_copy(update={"client_cpus": 2.0}))
        base_round = split_total(floor[0], floor[1])[1]
        sides = {PLAIN: floor, FEDSIM: run_side(FEDSIM, config)}
        if args.pfl_python and dp == "none":  # pfl has no per-sample DP-SGD
            sides[PFL] = run_side(PFL, config.model_copy(update={"client_cpus": 2.0}),
                                  args.pfl_python)  # fmt: skip
        for side, (total, seconds, accuracy) in sides.items():
            startup, per_round = split_total(total, seconds)
            print(f"| {dp} | {side} | {startup:.1f} | {per_round:.2f} | {total:.0f} "
                  f"| {accuracy:.4f} | {per_round / base_round:.3f} | {total / floor[0]:.3f} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
