r"""Whole ``fedsim run``\ s side by side: seconds a round, and the GPU's utilization.

    python -m experiments.research.bench_rounds --data-dir ../shared/data/mnist \
        --set "client-gpus=0.1" --workers 1,5,10
    python -m experiments.research.bench_rounds --quick        # digits, CPU: does it run

Each ``--workers`` value K is one run of issue 14's ``mnist-cnn`` workload (10 clients a
round, DP, batch 256) with ``clients-per-worker = K``; ``--set`` adds keys to every run.
The table gives round 1 (start-up: Ray's workers, imports, CUDA), the median of the later
rounds, the final accuracy and ε (equal for every K with one seed, up to float rounding:
the same mechanism and ledger), and, where ``nvidia-smi`` exists, the GPU's mean
utilization over the run, sampled every 100 ms.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import tomllib
from pathlib import Path

from fedsim.experiments.api import run

MNIST_CNN = {
    "name": "mnist-cnn",
    "model": "cnn",
    "dataset": "mnist",
    "num-clients": 10,
    "clients-per-round": 10,
    "batch-size": 256,
    "lr": 0.5,
    "dp": "sample",
    "target-epsilon": 8.0,
    "num-rounds": 5,
}
QUICK = {"num-rounds": 3, "num-clients": 6, "clients-per-round": 6}


def utilization_probe(out: Path) -> subprocess.Popen | None:
    """``nvidia-smi`` writing one utilization percentage a line to ``out``; None: no GPU."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"]
    return subprocess.Popen(["nvidia-smi", *query], stdout=out.open("w"))


def one_run(config: dict, folder: Path) -> dict:
    """Run ``config`` into ``folder``; its row of the table."""
    samples = folder.with_suffix(".util")
    probe = utilization_probe(samples)
    try:
        result = run(config, out=folder)
    finally:
        if probe is not None:
            probe.terminate()
    seconds = [r.seconds for r in result.rounds[1:]]
    util = [float(v) for v in samples.read_text().split()] if probe is not None else []
    return {
        "K": config.get("clients-per-worker", 1),
        "round 1 s": seconds[0],
        "later rounds s": statistics.median(seconds[1:]) if len(seconds) > 1 else float("nan"),
        "accuracy": result.rounds[-1].accuracy,
        "epsilon": result.summary.get("epsilon"),
        "GPU util %": statistics.fmean(util) if util else None,
    }


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    """Parse the flags, run each K, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="", help="MNIST's folder (not with --quick)")
    parser.add_argument("--workers", default="1,10", help="clients-per-worker values")
    parser.add_argument("--set", default="", help="extra keys, 'a=1 b=2' (TOML values)")
    parser.add_argument("--quick", action="store_true", help="digits, 3 rounds: a CPU check")
    args = parser.parse_args()
    base = dict(QUICK) if args.quick else {**MNIST_CNN, "data-dir": args.data_dir}
    for pair in args.set.split():
        key, value = pair.split("=", 1)
        base[key] = _toml_value(value)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in (int(v) for v in args.workers.split(",")):
            rows.append(one_run({**base, "clients-per-worker": k}, Path(tmp) / f"k{k}"))
    print(markdown(rows))


def _toml_value(text: str) -> object:
    return tomllib.loads(f"v = {text}")["v"]


if __name__ == "__main__":
    main()
