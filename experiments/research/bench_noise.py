"""A DP step with Opacus's per-parameter noise against fedsim's one-draw, fused noise.

    python -m experiments.research.bench_noise [--device cuda] [--batch 4,64] [--repeats 21]

Every row is fedsim's DP-SGD step as ``clients.training.train_local`` runs it
(``fedsim.dp.make_private``, ``grad-sample = "fast"``; Poisson rate 1, so every step has the
whole batch): zero_grad, forward, loss, clipping backward, optimizer step. ``opacus`` puts
back Opacus 1.6's own ``add_noise`` and ``scale_grad`` (a zero tensor, a draw, an add and a
division per parameter) and the per-parameter copy of the clipped sum that fedsim used
before ``fedsim.dp.noise``; ``fused`` is the current code. ``none`` is the same model
without DP. The three run round-robin in one process; times are medians (CUDA-synchronised
on a GPU). ``ops/step`` counts the operator calls that compute (``bench.count_ops``): on a
GPU, the kernel launches that limit a small model's step.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from experiments.research.bench import Step, count_ops, fixed_batch, fresh_model
from fedsim.dp import DPRandomness, make_private, poisson_schedule


def opacus_noise(optimizer: DPOptimizer) -> None:
    """Undo ``fedsim.dp.noise.fuse_noise_step``: Opacus's methods, the copy per parameter."""
    for name in ("add_noise", "scale_grad", "accumulate"):
        optimizer.__dict__.pop(name, None)  # the class's own methods show through again
    if isinstance(optimizer, DPOptimizerFastGradientClipping):
        params = optimizer.params

        def accumulate() -> None:
            for p in params:
                summed = getattr(p, "summed_grad", None)
                if summed is not None:
                    summed.add_(p.grad)
                else:
                    p.summed_grad = p.grad.detach().clone()

        optimizer.accumulate = accumulate


def make_step(name: str, noise: str, batch: int, device: str) -> Step:
    """One DP step (``noise``: ``opacus`` or ``fused``; ``none``: no DP) of a fresh model."""
    rows, x, y = fixed_batch(name, batch, device)
    model = fresh_model(rows[0][1], device)  # the no-DP row's builder
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    criterion: Callable[[Tensor, Tensor], Any] = nn.CrossEntropyLoss()
    if noise != "none":
        randomness = DPRandomness(  # masks on the CPU, as Opacus's sampler wants; noise on device
            torch.Generator().manual_seed(1), torch.Generator(device).manual_seed(2), False
        )
        private = make_private(
            PrivacyEngine(), grad_sample="fast", module=model, optimizer=optimizer,
            dataset=TensorDataset(x, y), noise_multiplier=1.0, max_grad_norm=1.0,
            schedule=poisson_schedule(batch, batch_size=batch, epochs=1), randomness=randomness,
        )  # fmt: skip
        optimizer, criterion = private.optimizer, private.criterion
        if noise == "opacus":
            opacus_noise(private.optimizer)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        optimizer.step()

    return step


def measure(name: str, batch: int, repeats: int, device: str) -> list[str]:
    """Table rows of ``name`` at ``batch``: none, opacus, fused."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    steps = {noise: make_step(name, noise, batch, device) for noise in ("none", "opacus", "fused")}
    ops = {}
    for noise, step in steps.items():
        step()  # warm-up
        ops[noise] = count_ops(step)
    times: dict[str, list[float]] = {noise: [] for noise in steps}
    for _ in range(repeats):
        for noise, step in steps.items():
            sync()
            began = time.perf_counter()
            step()
            sync()
            times[noise].append(time.perf_counter() - began)
    base = statistics.median(times["none"])
    return [
        f"| {name} | {batch} | {noise} | {ops[noise]} | {1e3 * statistics.median(t):.2f} | "
        f"{statistics.median(t) / base:.2f} |"
        for noise, t in times.items()
    ]


def main(argv: list[str] | None = None) -> None:
    """Print the table, a row as soon as it is measured."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="project-cnn,transformer,cnn")
    parser.add_argument("--batch", default="4,64", help="batch sizes, e.g. 4,64,256")
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # Opacus's secure-RNG and hook notices
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU, 1 thread"
    print(f"# {where}, torch {torch.__version__}, median of {args.repeats}, round-robin")
    print("| model | batch | noise | ops/step | ms/step | ÷ no DP |")
    print("|---|---:|---|---:|---:|---:|", flush=True)
    for batch in map(int, args.batch.split(",")):
        for name in args.models.split(","):
            print("\n".join(measure(name, batch, args.repeats, args.device)), flush=True)


if __name__ == "__main__":
    main()
