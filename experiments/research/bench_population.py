"""Population scale: per-round time and peak memory of `fedsim run` from 1,000 to 100,000 clients.

    python -m experiments.research.bench_population [--data-dir ../shared/data/tinyshakespeare]
        [--populations 1000 10000 100000] [--rounds 8] [--dp none]

Every population does the same work per round: 100 clients a round, each with exactly
``--samples`` training windows (tinyshakespeare's 804,331 windows split iid, capped with
``max-samples``), one local step, central evaluation. Only the number of clients that
exist changes, so any growth is the price of the population itself. Each run is a real
``fedsim run`` in its own session; memory is the peak of the summed resident set of every
process in that session (server, Ray and its workers), sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedsim import results

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared/data/tinyshakespeare"


def session_rss_mb(sid: int) -> float:
    """Summed resident set (MB) of every process in session ``sid``."""
    out = subprocess.run(["ps", "-eo", "sid=,rss="], capture_output=True, text=True).stdout
    pairs = (line.split() for line in out.splitlines())
    return sum(int(rss) for s, rss in pairs if int(s) == sid) / 1024


def run(population: int, args: argparse.Namespace, out: Path) -> dict:
    """One ``fedsim run``; its startup, per-round time and peak memory."""
    sets = {
        "name": f"population-{population}", "model": args.model, "dataset": "shakespeare",
        "data-dir": args.data_dir, "num-clients": population, "partition": "iid",
        "max-samples": args.samples, "batch-size": args.samples, "num-rounds": args.rounds,
        "clients-per-round": 100, "dp": args.dp, "lr": 0.5,
    }  # fmt: skip
    cmd = [sys.executable, "-m", "fedsim.experiments.cli", "run", "--out", str(out)]
    cmd += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, session_rss_mb(proc.pid))
        time.sleep(0.2)
    total = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"population {population} failed: {proc.stderr.read().decode()[-500:]}")
    seconds = results.round_seconds(out)
    summary = json.loads((out / "summary.json").read_text())
    # round 1 includes starting the Ray workers and loading data in them
    steady = statistics.median(seconds[2:])
    return {"population": population, "startup": total - sum(seconds[2:]), "round": steady,
            "peak_mb": peak, "accuracy": summary["accuracy"], "total": total}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Print one row per population, with ratios to the smallest."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--populations", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--model", default="transformer")
    parser.add_argument("--dp", default="none")
    args = parser.parse_args(argv)
    print(f"model {args.model}, dp {args.dp}, 100 clients a round, {args.samples} windows each, "
          f"{args.rounds} rounds")  # fmt: skip
    print("| clients | startup s | s/round (median, rounds 2+) | peak MB | round ratio | "
          "memory ratio | total s |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for population in args.populations:
            r = run(population, args, Path(tmp) / str(population))
            base = base or r
            print(f"| {population:,} | {r['startup']:.1f} | {r['round']:.2f} | {r['peak_mb']:.0f} "
                  f"| {r['round'] / base['round']:.3f} | {r['peak_mb'] / base['peak_mb']:.3f} "
                  f"| {r['total']:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
