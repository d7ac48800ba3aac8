"""Next-character loss: LEAF's last position against every position, in one process.

Trains the ``lstm`` without DP and without federation on random batches of Shakespeare
windows and prints held-out next-character accuracy as it goes, once per loss. This is
the measurement behind ``next-char-loss`` (docs/results.md)::

    python -m experiments.research.next_char_loss --data-dir ../shared/data/tinyshakespeare
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fedsim.data import load_dataset
from fedsim.models import build_model, evaluate, model_kwargs


def curve(dataset, *, all_positions: bool, args: argparse.Namespace) -> list[tuple]:
    """(step, seconds, held-out accuracy) every ``args.every`` SGD steps."""
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = build_model("lstm", **model_kwargs(dataset))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    x_test, y_test = dataset.x_test[: args.test], dataset.y_test[: args.test]
    rows, started = [], time.time()
    for step in range(1, args.steps + 1):
        idx = rng.integers(0, len(dataset.y_train), args.batch_size)
        x = torch.from_numpy(dataset.x_train[idx])
        y = torch.from_numpy(dataset.y_train[idx])
        model.train()
        optimizer.zero_grad()
        if all_positions:
            targets = torch.cat([x[:, 1:].long(), y[:, None]], dim=1)
            loss = torch.nn.functional.cross_entropy(model(x, all_positions=True), targets)
        else:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if step % args.every == 0:
            _, acc = evaluate(model, x_test, y_test)
            rows.append((step, round(time.time() - started), round(acc, 4)))
            print(
                f"{'all' if all_positions else 'last':>4}  step {step:>5}  "
                f"samples {step * args.batch_size:>7}  accuracy {acc:.4f}",
                flush=True,
            )
    return rows


def main() -> None:
    """Run both losses with the same seed, batches and evaluation windows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/tinyshakespeare")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--test", type=int, default=2000, help="held-out windows to score")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset = load_dataset("shakespeare", args.data_dir)
    for all_positions in (False, True):
        curve(dataset, all_positions=all_positions, args=args)


if __name__ == "__main__":
    main()
