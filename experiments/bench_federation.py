"""Federation overhead: `fedsim run` against the same work in one plain loop.

    python -m experiments.bench_federation [--data-dir ../shared/data/mnist] [--rounds 30]

The workload of issue 6: MNIST, 100 clients, 10 per round, 1 local epoch, batch 32,
central evaluation every round; with and without DP. The plain loop does the same local
steps (same partitions, seeds and library functions) and evaluations in one process with
the same total torch threads; the ratio is the price of Flower, Ray and messaging.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clients.client_app import train_round
from fedsim.config import FedsimConfig, parse_config
from fedsim.data import load_dataset
from fedsim.evaluation import evaluate
from fedsim.models import build_model
from server.strategy import sample_clients


def workload(data_dir: str, rounds: int, dp: str) -> FedsimConfig:
    """The benchmark's config (σ fixed so both sides do identical DP work)."""
    return parse_config(
        {"name": f"bench-{dp}", "dataset": "mnist", "data-dir": data_dir, "num-clients": 100,
         "clients-per-round": 10, "num-rounds": rounds, "local-epochs": 1, "batch-size": 32,
         "lr": 0.05, "dp": dp, "noise-multiplier": 1.0 if dp == "sample" else 0.0}
    )  # fmt: skip


def plain_loop(config: FedsimConfig) -> tuple[float, float, float]:
    """(startup s, seconds per round, final accuracy) of the same work in one loop."""
    start = time.perf_counter()
    dataset = load_dataset(config.dataset, config.data_dir)
    torch.manual_seed(config.seed)
    model = build_model(config.model, input_shape=dataset.input_shape, num_classes=10)
    evaluate(model, dataset.x_test, dataset.y_test)
    setup = time.perf_counter() - start
    for r in range(1, config.num_rounds + 1):
        chosen = sample_clients(100, 10, seed=config.seed, server_round=r)
        states, sizes = [], []
        for c in chosen:
            state, report = train_round(config, c, r, model.state_dict())
            states.append(state)
            sizes.append(report.num_examples)
        weights = np.array(sizes) / sum(sizes)
        model.load_state_dict(
            {k: sum(w * s[k] for w, s in zip(weights, states, strict=True)) for k in states[0]}
        )
        evaluate(model, dataset.x_test, dataset.y_test)
    per_round = (time.perf_counter() - start - setup) / config.num_rounds
    return setup, per_round, evaluate(model, dataset.x_test, dataset.y_test)[1]


def simulation(config: FedsimConfig) -> tuple[float, float, float]:
    """(startup s, seconds per round, final accuracy) of the same run through `fedsim run`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        sets = [a for k, v in config.to_flat().items() for a in ("--set", f"{k}={v}")]
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "experiments.cli", "run", "--out", str(out), *sets],
                       check=True, capture_output=True)  # fmt: skip
        total = time.perf_counter() - start
        rounds = [
            float(line.split(",")[4]) for line in (out / "rounds.csv").read_text().splitlines()[2:]
        ]
        summary = json.loads((out / "summary.json").read_text())
    per_round = sum(rounds) / len(rounds)
    return total - sum(rounds), per_round, summary["accuracy"]


def main() -> None:
    """Print the overhead table for dp=none and dp=sample."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--data-dir", default=str(Path(__file__).parents[1].parent / "shared/data/mnist")
    )
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    print("| dp | side | startup s | s/round | total s | accuracy | ratio/round | ratio total |")
    print("|---|---|---|---|---|---|---|---|")
    for dp in ("none", "sample"):
        config = workload(args.data_dir, args.rounds, dp)
        # the loop trains one client at a time on both cores; the simulation runs two
        # one-thread clients at once: the same two cores either way
        floor = plain_loop(config.model_copy(update={"client_cpus": 2.0}))
        sim = simulation(config)
        for side, (setup, per_round, acc) in (("plain loop", floor), ("fedsim run", sim)):
            total = setup + per_round * args.rounds
            base = floor[0] + floor[1] * args.rounds
            print(f"| {dp} | {side} | {setup:.1f} | {per_round:.2f} | {total:.0f} | {acc:.4f} "
                  f"| {per_round / floor[1]:.3f} | {total / base:.3f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
