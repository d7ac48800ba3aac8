r"""One round of K clients' local training: one after another, or vectorized as one cohort.

    python -m experiments.research.bench_cohort --device cuda --suite
    python -m experiments.research.bench_cohort --model cnn --clients 10 --steps 23 --batch 256
    python -m experiments.research.bench_cohort --model fedavg-cnn --clients 100 --steps 19 \
        --batch 32 --no-dp
    python -m experiments.research.bench_cohort --device cpu --quick

(a) ``sequential``: every client as a worker trains it today: build the model, load the
global weights, ``clients.training.train_local`` (DP-SGD with ``--grad-sample``), read
the state_dict. (b) ``cohort``: ``fedsim.dp.train_cohort`` trains all K at once. Both get
the same data (MNIST-shaped random images, already on the device, as a worker's
``client_tensors``) and identically seeded generators, so the table's last column, the
largest weight difference between (a) and (b), checks that they did the same training.
Client k has ``n_k`` in ``(B·(S−1), B·S]`` examples, so that every client takes S steps
an epoch with batches of B; sizes differ, as in a real cohort. Times are wall seconds,
CUDA synchronised before each clock read, the median of ``--repeats`` after a warm-up.

``--suite`` (the default without ``--model``): issue 14's workloads, each with and
without DP: (1) 10 clients, ``cnn``, 23 steps of 256 (n ≈ 5,900 a client); (2) 100
clients, ``fedavg-cnn``, 19 steps of 32 (n ≈ 600). ``--quick``: the same shapes, tiny,
for a CPU check that everything runs.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

from fedsim.clients.training import train_local
from fedsim.dp import DPRandomness, dp_randomness, seeded_root, train_cohort
from fedsim.errors import FedsimError
from fedsim.models import build_model

SHAPE, CLASSES = (1, 28, 28), 10
LR, SIGMA, CLIP = 0.1, 1.0, 1.0


class Workload(NamedTuple):
    """K clients of ``model``, each taking ``steps`` batches of ``batch`` an epoch."""

    clients: int
    model: str
    steps: int
    batch: int
    dp: bool


SUITE = [
    Workload(10, "cnn", 23, 256, True),
    Workload(10, "cnn", 23, 256, False),
    Workload(100, "fedavg-cnn", 19, 32, True),
    Workload(100, "fedavg-cnn", 19, 32, False),
]
QUICK = [
    Workload(3, "cnn", 3, 16, True),
    Workload(3, "cnn", 3, 16, False),
    Workload(4, "fedavg-cnn", 2, 8, True),
    Workload(4, "fedavg-cnn", 2, 8, False),
]
States = list[dict[str, torch.Tensor]]


def client_data(work: Workload, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random MNIST-shaped data on ``device``; client k has ⌈n_k / B⌉ = S, n_k ragged."""
    generator = torch.Generator().manual_seed(0)
    data = []
    for k in range(work.clients):
        n = work.batch * (work.steps - 1) + 1 + (37 * k) % work.batch
        x = torch.randn(n, *SHAPE, generator=generator)
        y = torch.randint(0, CLASSES, (n,), generator=generator)
        data.append((x.to(device), y.to(device)))
    return data


def randomness(work: Workload, k: int, device: str) -> DPRandomness:
    """Client k's streams; the non-DP shuffle uses a seeded ``batches`` generator."""
    streams = dp_randomness(seeded_root(1), server_round=1, client=k, device=device, secure=False)
    if work.dp:
        return streams
    return DPRandomness(torch.Generator().manual_seed(k), streams.noise, secure=False)


def sequential(work: Workload, data: list, start: dict, args: argparse.Namespace) -> States:
    """(a): a model, a load_state_dict and a ``train_local`` per client, as a worker does."""
    states = []
    for k, (x, y) in enumerate(data):
        model = build_model(work.model, input_shape=SHAPE, num_classes=CLASSES, dp=work.dp)
        model.load_state_dict(start)
        torch.manual_seed(k)  # without DP, train_local shuffles with torch's global generator
        train_local(
            model, x, y, epochs=args.epochs, batch_size=work.batch, lr=LR,
            noise_multiplier=SIGMA if work.dp else None, max_grad_norm=CLIP,
            grad_sample=args.grad_sample, device=args.device,
            randomness=randomness(work, k, args.device),
        )  # fmt: skip
        states.append(model.state_dict())
    return states


def cohort(
    work: Workload, data: list, start: dict, args: argparse.Namespace, clipping: str
) -> States:
    """(b): every client at once, ``fedsim.dp.train_cohort``."""
    model = build_model(work.model, input_shape=SHAPE, num_classes=CLASSES)
    updates = train_cohort(
        model, [start] * work.clients, data, epochs=args.epochs, batch_size=work.batch,
        lr=LR, noise_multiplier=SIGMA if work.dp else None, max_grad_norm=CLIP,
        randomness=[randomness(work, k, args.device) for k in range(work.clients)],
        device=args.device, chunk_size=chunk_size(model, work, args, clipping),
        clipping=clipping,
    )  # fmt: skip
    return [update.state for update in updates]


def chunk_size(
    model: torch.nn.Module, work: Workload, args: argparse.Namespace, clipping: str
) -> int | None:
    """Clients per vmap chunk so that DP's per-sample gradients fit in ``--memory-gib``.

    A Poisson batch rarely exceeds twice its expectation B; float32 gradients. One-pass
    clipping builds no per-sample copies of the big (linear) weights: one chunk.
    """
    memory_gib = args.memory_gib
    if not work.dp or clipping == "one-pass":
        return None
    per_client = 2 * work.batch * sum(p.numel() for p in model.parameters()) * 4
    chunk = max(1, int(memory_gib * 2**30 // per_client))
    return None if chunk >= work.clients else chunk


def timed(run: Callable[[], States], device: str) -> tuple[float, States]:
    """Wall seconds of ``run()``, the device synchronised before each clock read."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    states = run()
    sync()
    return time.perf_counter() - start, states


def measure(work: Workload, args: argparse.Namespace) -> tuple[float, list[float], float]:
    """Median seconds of (a) and of (b) per clipping, and the largest weight difference."""
    data = client_data(work, args.device)
    torch.manual_seed(0)
    start = build_model(work.model, input_shape=SHAPE, num_classes=CLASSES).state_dict()
    runs = [functools.partial(sequential, work, data, start, args)]
    runs += [functools.partial(cohort, work, data, start, args, c) for c in clippings(work, args)]
    for _ in range(args.warmup):  # allocator, cuDNN's choices, Opacus's first imports
        for run in runs:
            timed(run, args.device)
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(args.repeats):  # interleaved, so that drift hits all alike
        results = [timed(run, args.device) for run in runs]
        for seconds, (took, _) in zip(times, results, strict=True):
            seconds.append(took)
    want = results[0][1]
    diff = max(
        (sa[key].float() - sb[key].float()).abs().max().item()
        for _, states in results[1:]
        for sa, sb in zip(want, states, strict=True)
        for key in sa
    )
    medians = [statistics.median(t) for t in times]
    return medians[0], medians[1:], diff


def clippings(work: Workload, args: argparse.Namespace) -> list[str]:
    """The cohort's clipping variants to time (without DP there is nothing to clip)."""
    if not work.dp:
        return ["one-pass"]
    return ["one-pass", "per-sample"] if args.clipping == "both" else [args.clipping]


def main(argv: list[str] | None = None) -> None:
    """Print the device, then one table row per workload as soon as it is measured."""
    args = parse(argv)
    # TF32 rounds (a) and (b) differently (other kernels, other shapes): Δw then grows
    # with the steps, chaotically without clipping. Without it, Δw checks the mechanism.
    torch.backends.cudnn.allow_tf32 = not args.no_tf32
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device")
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"device: {name}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(
        f"epochs {args.epochs}, lr {LR}, DP: σ {SIGMA}, C {CLIP}, "
        f"grad-sample {args.grad_sample}, cohort clipping {args.clipping}"
    )
    tf32 = "off" if args.no_tf32 else "on (cuDNN's default)"
    tf32 = f"; TF32 convolutions {tf32}" if args.device.startswith("cuda") else ""
    print(f"median of {args.repeats} after {args.warmup} warm-up{tf32}\n")
    print("| device | torch | K | model | steps | batch | DP | sequential s | cohort s "
          "| speedup | max abs Δw |")  # fmt: skip
    print("|---|---|--:|---|--:|--:|---|--:|--:|--:|--:|", flush=True)
    for work in workloads(args):
        head = (
            f"| {name} | {torch.__version__} | {work.clients} | {work.model} | {work.steps} "
            f"| {work.batch} | {'yes' if work.dp else 'no'} |"
        )
        try:
            a, cohorts, diff = measure(work, args)
        except (RuntimeError, FedsimError) as error:  # e.g. out of memory: say so, go on
            print(f"{head} failed: {str(error).splitlines()[0][:120]} | | | |", flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        b = " / ".join(f"{t:.3f}" for t in cohorts)
        print(f"{head} {a:.3f} | {b} | {a / cohorts[0]:.1f}× | {diff:.1e} |", flush=True)


def workloads(args: argparse.Namespace) -> list[Workload]:
    """The suite (tiny with ``--quick``), or the one workload the flags describe."""
    if args.quick:
        return QUICK
    if args.suite or args.model is None:
        return SUITE
    return [Workload(args.clients, args.model, args.steps, args.batch, not args.no_dp)]


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=cuda, help=f"default: {cuda}")
    parser.add_argument("--suite", action="store_true", help="issue 14's workloads")
    parser.add_argument("--quick", action="store_true", help="the suite, tiny (a CPU check)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--model", default=None, help="cnn, fedavg-cnn, transformer or lstm")
    parser.add_argument("--steps", type=int, default=23, help="steps an epoch per client")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--no-dp", action="store_true")
    parser.add_argument(
        "--no-tf32", action="store_true", help="full-float32 convolutions (cuDNN's default: TF32)"
    )
    parser.add_argument("--grad-sample", default="fast", help="(a)'s mode: fast, hooks, ghost")
    parser.add_argument(
        "--clipping", default="one-pass", choices=["one-pass", "per-sample", "both"],
        help="(b)'s DP clipping: one backward pass (default), per-sample gradients, or both "
        "(cohort column: one-pass / per-sample; speedup: one-pass's)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=None, help="default 3; 2 with --quick")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--memory-gib", type=float, default=32.0, help="for (b)'s per-sample gradients"
    )
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    return args


if __name__ == "__main__":
    main()
