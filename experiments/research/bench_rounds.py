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

from experiments.research import bench_cohort
from fedsim import results
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
    seconds = results.round_seconds(folder)[1:]
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
        cells = [_cell(v) for v in row.values()]
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


def _cell(value: object) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def round_table(device: str, data_dir: str, *, quick: bool = False, repeats: int = 3) -> str:
    """Issue 14's round table: one round of ``mnist-cnn``, done three ways.

    Its training alone (10 clients, 23 DP steps of 256, ``bench_cohort``'s random
    MNIST-shaped data), one client after another as workers do and vectorized as one
    cohort; then, given MNIST's ``data_dir``, whole runs of ``fedsim run`` with
    ``clients-per-worker`` 1 and 10 (``client-gpus = 0.1`` on a GPU). ``quick``: tiny
    shapes, and the runs on digits, for a CPU check.
    """
    work = (bench_cohort.QUICK if quick else bench_cohort.SUITE)[0]
    args = bench_cohort.parse(["--device", device, "--repeats", str(repeats)])
    one, cohorts, diff = bench_cohort.measure(work, args)
    rows = [
        _way("training only, one client at a time", one, f"{work.clients} clients"),
        _way("training only, vectorized", cohorts[0], f"max abs Δw {diff:.1e}"),
    ]
    if data_dir or quick:
        base = dict(QUICK) if quick else {**MNIST_CNN, "data-dir": data_dir}
        base["client-gpus"] = 0.1 if device.startswith("cuda") else 0.0
        with tempfile.TemporaryDirectory() as tmp:
            for k in (1, base["clients-per-round"]):
                run_row = one_run({**base, "clients-per-worker": k}, Path(tmp) / f"k{k}")
                rows.append(_way(f"fedsim run, clients-per-worker {k}", **_run_cells(run_row)))
    return markdown(rows)


def _way(
    way: str,
    seconds: float,
    note: str = "",
    round_1: float | None = None,
    util: float | None = None,
) -> dict:
    return {
        "way": way,
        "s a round": seconds,
        "round 1 s": round_1,
        "GPU util %": util,
        "note": note,
    }


def _run_cells(row: dict) -> dict:
    return {
        "seconds": row["later rounds s"],
        "round_1": row["round 1 s"],
        "util": row["GPU util %"],
        "note": f"accuracy {row['accuracy']:.4f}, ε {row['epsilon'] or 0:.3f}",
    }


def _toml_value(text: str) -> object:
    return tomllib.loads(f"v = {text}")["v"]


if __name__ == "__main__":
    main()
