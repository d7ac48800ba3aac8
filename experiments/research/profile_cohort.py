r"""Where a vectorized cohort's round goes: host time against device time, and the top ops.

    python -m experiments.research.profile_cohort --device cuda       # issue 14's suite
    python -m experiments.research.profile_cohort --device cpu --quick

For each of ``bench_cohort``'s workloads: one warm-up ``train_cohort`` call, then one under
``torch.profiler``. The first line gives the call's wall seconds, the seconds the device
spent in kernels (their durations summed: one stream runs them one after another), how
many kernels ran, and how many operators the host dispatched. Wall far above kernel time
means the step is launch-bound (the host's Python and dispatch are the limit, and fewer
or fused operators would help); close to it means the kernels themselves are the cost,
and the table of the ops that took the most device time says which.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from experiments.research.bench_cohort import (
    CLASSES,
    SHAPE,
    Workload,
    build_model,
    client_data,
    cohort,
    parse,
    workloads,
)


def profiled(work: Workload, args: argparse.Namespace) -> str:
    """One workload's summary line and its top ops by device (CPU: host) time."""
    data = client_data(work, args.device)
    torch.manual_seed(0)
    start = build_model(work.model, input_shape=SHAPE, num_classes=CLASSES).state_dict()
    clipping = "one-pass" if args.clipping == "both" else args.clipping
    cohort(work, data, start, args, clipping)  # warm-up: allocator, cuDNN's choices
    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        began = time.perf_counter()
        cohort(work, data, start, args, clipping)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - began
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    kernel_s = sum(e.device_time_total for e in kernels) / 1e6  # µs -> s
    host_ops = sum(1 for e in events if e.device_type == DeviceType.CPU)
    head = (
        f"K {work.clients} {work.model} steps {work.steps} batch {work.batch} "
        f"DP {'yes' if work.dp else 'no'} ({clipping}): wall {wall:.3f} s, kernels "
        f"{kernel_s:.3f} s ({len(kernels)} launches), {host_ops} host ops"
    )
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    return head + "\n" + prof.key_averages().table(sort_by=key, row_limit=args.rows)


def main(argv: list[str] | None = None) -> None:
    """Print each workload's profile as soon as it is measured."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--rows", type=int, default=12)
    known, rest = parser.parse_known_args(argv)
    args = parse(rest)
    args.rows = known.rows
    torch.backends.cudnn.allow_tf32 = not args.no_tf32
    for work in workloads(args):
        print(profiled(work, args), flush=True)


if __name__ == "__main__":
    main()
