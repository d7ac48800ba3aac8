"""One training step run eagerly against the same step replayed from a CUDA graph.

    python -m experiments.research.bench_graphs [--batch 64,256] [--repeats 30]

On a GPU a small model's step is limited by the host launching kernels (docs/benchmarks.md:
the H100 was busy a quarter of a vectorized cohort's time). A CUDA graph records a step's
kernels once and replays them all with one launch, so it shows what the step costs
without the host: the floor that capturing fedsim's training step would reach. Rows: the
step of ``bench.py`` with (``fast``, noise by ``fedsim.dp.noise``) and without DP, on a
fixed batch (a graph needs fixed shapes; training would pad its Poisson batches), eager
and replayed. The noise generator is registered with the graph, so that every replay
draws fresh noise: the ``fresh noise`` column checks it (two replays' updates differ by
more than their gradients could). A prototype: nothing in training uses graphs yet. On a
CPU only the eager column is measured.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from opacus import PrivacyEngine
from torch import nn

from experiments.research.bench import Step, fixed_batch, fresh_model
from fedsim.dp import make_private_fast


class Case(NamedTuple):
    """One model's training step, in the parts a graph needs."""

    model: nn.Module
    zero_grad: Step
    body: Step  # forward, loss, backward, optimizer step: what the graph records
    generator: torch.Generator | None  # the DP noise's


def build(name: str, batch: int, dp: bool, device: str) -> Case:
    """``bench.py``'s model ``name`` on a fixed batch, with or without DP (``fast``)."""
    rows, x, y = fixed_batch(name, batch, device)
    model = fresh_model(rows[0][1], device)  # the no-DP row's builder
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    criterion: Callable = nn.CrossEntropyLoss()
    generator = torch.Generator(device) if dp else None
    if dp:
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
        model, optimizer, criterion, _, _ = make_private_fast(
            PrivacyEngine(), module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=1.0, max_grad_norm=1.0, noise_generator=generator,
        )  # fmt: skip

    def body() -> None:
        criterion(model(x), y).backward()
        optimizer.step()

    return Case(model, lambda: optimizer.zero_grad(set_to_none=True), body, generator)


def whole_step(case: Case) -> Step:
    """``zero_grad`` then the body: the eager step."""

    def step() -> None:
        case.zero_grad()
        case.body()

    return step


def timed(run: Step, repeats: int, sync: Step) -> float:
    """Median seconds of ``run`` (after ``sync``, so the device's time counts)."""
    times = []
    for _ in range(repeats):
        sync()
        began = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def graphed(case: Case) -> tuple[Step, bool]:
    """The step recorded in a CUDA graph: its replay, and whether replays draw fresh noise.

    Fresh: the gradients (noised and scaled, in the graph's own buffers) of two replays
    differ by more than half their norm, which the noise does (its norm is many times
    the clipped sum's) and a replayed identical draw would not.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch's docs ask
        for _ in range(3):
            whole_step(case)()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    if case.generator is not None:
        graph.register_generator_state(case.generator)
    case.zero_grad()  # the recorded backward then writes the gradients, not adds to them
    with torch.cuda.graph(graph):
        case.body()
    params = list(case.model.parameters())
    grads = []
    for _ in range(2):
        graph.replay()
        grads.append(torch.cat([p.grad.flatten() for p in params if p.grad is not None]))
    fresh = (grads[0] - grads[1]).norm() > 0.5 * grads[0].norm()
    return graph.replay, bool(fresh)


def main(argv: list[str] | None = None) -> None:
    """Print one row per model, batch and DP setting, as soon as it is measured."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="project-cnn,transformer")
    parser.add_argument("--batch", default="64,256")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    cuda = args.device.startswith("cuda")
    sync: Step = torch.cuda.synchronize if cuda else (lambda: None)
    where = torch.cuda.get_device_name() if cuda else "CPU (eager only)"
    print(f"# {where}, torch {torch.__version__}, median of {args.repeats}")
    print("| model | batch | DP | eager ms | graph ms | eager ÷ graph | fresh noise |")
    print("|---|---:|---|---:|---:|---:|---|", flush=True)
    for batch in map(int, args.batch.split(",")):
        for name in args.models.split(","):
            for dp in (False, True):
                case = build(name, batch, dp, args.device)
                whole_step(case)()
                eager = timed(whole_step(case), args.repeats, sync)
                cells = ["", "", ""]
                if cuda:
                    try:
                        replay, fresh = graphed(case)
                        graph = timed(replay, args.repeats, sync)
                        noise = ("yes" if fresh else "NO") if dp else "-"
                        cells = [f"{1e3 * graph:.2f}", f"{eager / graph:.1f}", noise]
                    except Exception as exc:  # a prototype: say what failed, go on
                        cells = [f"failed: {type(exc).__name__}: {str(exc)[:120]}", "", ""]
                print(f"| {name} | {batch} | {'yes' if dp else 'no'} | {1e3 * eager:.2f} | "
                      f"{' | '.join(cells)} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
