"""DP step time ÷ non-DP step time, per model and per-sample-gradient mode, in one process.

    python -m experiments.research.bench [--repeats 5] [--models cnn,lstm,transformer] [--threads 1]

Each model's steps (one batch of 64: zero_grad, forward, loss, backward, optimizer step)
run round-robin: every repeat times every mode once, so a neighbour's load on a shared
machine hits all modes alike; the table gives medians over the repeats. CPU time is this
process's (robust to being descheduled); wall time is what a user waits. Modes: ``none``
(no DP), Opacus 1.6's ``hooks`` (its default), ``ghost``, ``functorch`` and ``ew``, and fedsim's
``fast`` (one backward pass, ``fedsim.dp.fast_clip``, noise added by ``fedsim.dp.noise``).
The LSTM rows also time the fused ``nn.LSTM`` without DP, the denominator of its ratios,
Opacus's ``DPLSTM``, and ``FastDPLSTM``'s two recurrences (``loop``, ``fused``) apart.
``ops/step`` counts the operator calls of one step that compute: on a GPU, kernel launches,
which limit a small model's step there.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import opacus
import torch
from opacus import PrivacyEngine
from opacus.layers import DPLSTM
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fedsim.dp import FastDPLSTM, make_private_fast
from fedsim.models.image import cnn as project_cnn
from fedsim.models.image import fedavg_cnn

BATCH, STEPS, VOCAB = 64, 80, 80
Step = Callable[[], None]


class CharLSTM(nn.Module):
    """LEAF Shakespeare: 8-dim embedding, 2-layer LSTM of 256, next character of 80."""

    def __init__(self, lstm: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.lstm = lstm(8, 256, num_layers=2, batch_first=True)
        self.fc = nn.Linear(256, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the character after each sequence."""
        out, _ = self.lstm(self.emb(x))
        return self.fc(out[:, -1])


class EncoderBlock(nn.Module):
    """Pre-norm encoder block: attention (nn.Linear projections) and a 4x MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, d)`` -> ``(B, T, d)``."""
        b, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.down(nn.functional.gelu(self.up(self.norm2(x))))


class Encoder(nn.Module):
    """2-layer Transformer encoder, d = 128, 4 heads, mean-pooled classifier."""

    def __init__(self, d: int = 128, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(VOCAB, d), nn.Embedding(STEPS, d)
        self.blocks = nn.Sequential(*[EncoderBlock(d, heads) for _ in range(layers)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, T)`` -> logits."""
        positions = torch.arange(x.shape[1], device=x.device).repeat(x.shape[0], 1)
        return self.head(self.norm(self.blocks(self.emb(x) + self.pos(positions))).mean(1))


def make_step(build: Callable[[], nn.Module], mode: str, x: torch.Tensor, y: torch.Tensor) -> Step:
    """One training step of a fresh model in ``mode`` on the fixed batch ``(x, y)``."""
    model = fresh_model(build, x.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    criterion = nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(y))
    dp = {"noise_multiplier": 1.0, "max_grad_norm": 1.0}
    if mode == "fast":  # fixed batches: the step's cost, not the sampling's
        model, optimizer, criterion, _, _ = make_private_fast(
            PrivacyEngine(), module=model, optimizer=optimizer, data_loader=loader, **dp
        )
    elif mode != "none":
        private = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
            grad_sample_mode=mode, poisson_sampling=False, **dp,
        )  # fmt: skip
        model, optimizer = private[0], private[1]
        criterion = private[2] if mode == "ghost" else criterion

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        optimizer.step()

    return step


def cases(
    name: str, batch: int = BATCH
) -> tuple[list[tuple[str, Callable[[], nn.Module], str]], torch.Tensor]:
    """(label, model builder, mode) rows of one model and its input; row 0 is the denominator."""
    if name == "cnn":
        modes = ["none", "hooks", "ghost", "functorch", "ew", "fast"]
        build = lambda: fedavg_cnn(input_shape=(1, 28, 28), num_classes=10)  # noqa: E731
        return [(m, build, m) for m in modes], torch.randn(batch, 1, 28, 28)
    if name == "project-cnn":
        build = lambda: project_cnn(input_shape=(1, 28, 28), num_classes=10)  # noqa: E731
        modes = ["none", "hooks", "ghost", "fast"]
        return [(m, build, m) for m in modes], torch.randn(batch, 1, 28, 28)
    tokens = torch.randint(0, VOCAB, (batch, STEPS))
    if name == "transformer":
        modes = ["none", "hooks", "ghost", "functorch", "ew", "fast"]
        return [(m, Encoder, m) for m in modes], tokens
    rows = [("nn.LSTM none", lambda: CharLSTM(nn.LSTM), "none")]
    rows += [("DPLSTM hooks", lambda: CharLSTM(DPLSTM), "hooks")]
    rows += [
        (f"FastDPLSTM {m}", lambda: CharLSTM(FastDPLSTM), m)
        for m in ("none", "hooks", "ghost", "fast")
    ]
    # the rows above use this device's default recurrence: time both, whichever it is
    for way, fused in (("loop", False), ("fused", True)):
        lstm = functools.partial(FastDPLSTM, fused=fused)
        rows.append((f"FastDPLSTM fast, {way}", functools.partial(CharLSTM, lstm), "fast"))
    return rows, tokens


class OpCount(TorchDispatchMode):
    """Counts the operator calls that compute (views and bare allocations are not counted).

    On a GPU each is a kernel launch (``torch._foreach_*``: one for many tensors), which
    is what limits a small model's step there: a count that the CPU measures as well.
    """

    FREE = frozenset(
        {
            "alias", "as_strided", "detach", "empty", "empty_like", "expand", "lift_fresh",
            "new_empty", "permute", "_reshape_alias", "select", "set_", "slice", "split",
            "split_with_sizes", "squeeze", "squeeze_", "t", "transpose", "unbind",
            "unsqueeze", "_unsafe_view", "view",
        }
    )  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        """Count ``func`` unless it only makes a view or an allocation, then run it."""
        if func.namespace == "aten" and func.__name__.split(".")[0] not in self.FREE:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def count_ops(step: Step) -> int:
    """Operator calls that compute in one call of ``step`` (:class:`OpCount`)."""
    with OpCount() as counter:
        step()
    return counter.calls


def fixed_batch(
    name: str, batch: int, device: str
) -> tuple[list[tuple[str, Callable[[], nn.Module], str]], torch.Tensor, torch.Tensor]:
    """:func:`cases` of ``name``, with its batch's inputs and random labels on ``device``."""
    rows, x = cases(name, batch)
    y = torch.randint(0, 10 if "cnn" in name else VOCAB, (batch,))
    return rows, x.to(device), y.to(device)


def fresh_model(build: Callable[[], nn.Module], device: str | torch.device) -> nn.Module:
    """``build()``, from seed 0, on ``device``: every mode starts from the same weights."""
    torch.manual_seed(0)
    return build().to(device)


def measure(
    name: str, repeats: int, *, batch: int = BATCH, device: str = "cpu"
) -> list[tuple[str, float, float, float, float, int]]:
    """(label, CPU ms, CPU ratio, wall ms, wall ratio, ops) per row, medians over ``repeats``.

    On a GPU the wall clock is read after ``torch.cuda.synchronize()``: the step's time
    on the device, not the time to queue its kernels. ``ops``: :func:`count_ops`.
    """
    rows, x, y = fixed_batch(name, batch, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    steps = {}
    for label, build, mode in rows:
        try:
            steps[label] = make_step(build, mode, x, y)
            steps[label]()  # warm up (allocations, lazy initialisation)
        except Exception as exc:  # a mode Opacus does not support for this model
            print(f"  {name} {label}: not run ({type(exc).__name__}: {str(exc)[:80]})")
            steps.pop(label, None)
    ops = {label: count_ops(step) for label, step in steps.items()}
    cpu: dict[str, list[float]] = {label: [] for label in steps}
    wall: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(repeats):
        for label, step in steps.items():
            sync()
            c0, w0 = time.process_time(), time.perf_counter()
            step()
            sync()
            cpu[label].append(time.process_time() - c0)
            wall[label].append(time.perf_counter() - w0)
    base = rows[0][0]
    c_base, w_base = statistics.median(cpu[base]), statistics.median(wall[base])
    return [
        (label, 1e3 * statistics.median(cpu[label]), statistics.median(cpu[label]) / c_base,
         1e3 * statistics.median(wall[label]), statistics.median(wall[label]) / w_base,
         ops[label])
        for label in steps
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Print one table of step times and ratios for the chosen models."""
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # Opacus's secure-RNG and hook notices
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else _cpu_name()
    print(f"# {datetime.date.today()}  {where}  torch {torch.__version__}  "
          f"opacus {opacus.__version__}  threads {args.threads}  "
          f"median of {args.repeats}, interleaved", flush=True)  # fmt: skip
    print("| model | batch | mode | CPU ms/step | CPU ratio | wall ms/step | wall ratio "
          "| ops/step |")  # fmt: skip
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for batch in map(int, args.batch.split(",")):
        for name in args.models.split(","):
            for label, c_ms, c_ratio, w_ms, w_ratio, ops in measure(
                name, args.repeats, batch=batch, device=args.device
            ):
                print(f"| {name} | {batch} | {label} | {c_ms:.1f} | {c_ratio:.2f} | "
                      f"{w_ms:.2f} | {w_ratio:.2f} | {ops} |", flush=True)  # fmt: skip
    if args.rounds:
        from experiments.research import bench_rounds  # the engine: Flower, Ray

        print("\n# one round of mnist-cnn: one client at a time, vectorized, whole runs")
        print(bench_rounds.round_table(args.device, args.data_dir, repeats=args.repeats))
    if args.all:
        from experiments.research import bench_federation, bench_population

        print("\n# federation overhead: fedsim run and pfl against a plain loop", flush=True)
        bench_federation.main([])
        print("\n# population scale", flush=True)
        bench_population.main([])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.research.bench", description=__doc__
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="cnn,project-cnn,lstm,transformer")
    parser.add_argument("--batch", default=str(BATCH), help="batch sizes, e.g. 64,256")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--all",
        action="store_true",
        help="then issue 6's other tables with their defaults: federation overhead "
        "(experiments.research.bench_federation, ~30 min) and population scale "
        "(experiments.research.bench_population, ~3 min)",
    )
    parser.add_argument(
        "--rounds", action="store_true", help="then issue 14's round table (bench_rounds)"
    )
    parser.add_argument("--data-dir", default="", help="MNIST's folder, for --rounds' runs")
    return parser


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            names = [line.split(":", 1)[1].strip() for line in info if "model name" in line]
        return f"{names[0]} x{len(names)}"
    except (OSError, IndexError):
        return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
