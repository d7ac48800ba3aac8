"""Model registry. Every model passes Opacus's ``ModuleValidator`` as built.

GroupNorm replaces BatchNorm throughout: BatchNorm mixes samples in a batch, so it has
no per-sample gradient and breaks DP-SGD's per-example clipping.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def cnn(*, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two conv blocks and a classifier head, sized by the input.

    (C, H, W) -> conv+GN+ReLU+pool -> (c1, H/2, W/2) -> conv+GN+ReLU+pool
    -> (c2, H/4, W/4) -> flatten -> hidden -> num_classes.
    """
    channels, height, width = input_shape
    small = height * width <= 64  # 8×8 digits need far fewer filters than 28×28 or 32×32
    c1, c2, hidden = (16, 32, 64) if small else (32, 64, 128)
    return nn.Sequential(
        nn.Conv2d(channels, c1, kernel_size=3, padding=1),
        nn.GroupNorm(min(8, c1 // 4), c1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, kernel_size=3, padding=1),
        nn.GroupNorm(min(8, c2 // 4), c2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * (height // 4) * (width // 4), hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn": cnn,
}


def build_model(name: str, *, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build a registered model for inputs of ``input_shape`` and ``num_classes`` outputs."""
    return MODELS[name](input_shape=input_shape, num_classes=num_classes)
