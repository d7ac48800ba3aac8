"""Image classifiers: a small CNN sized by the input, and the FedAvg paper's CNN.

No BatchNorm anywhere: it mixes the samples of a batch, so it has no per-sample gradient
(GroupNorm stands in where normalization helps).
"""

from __future__ import annotations

from torch import nn


def cnn(*, input_shape: tuple[int, ...], num_classes: int, **_: object) -> nn.Module:
    """Two conv blocks and a classifier head, sized by the input.

    28×28 images (MNIST, Fashion-MNIST) get :func:`tanh_cnn_28`; other sizes get
    (C, H, W) -> conv+GN+ReLU+pool -> (c1, H/2, W/2) -> conv+GN+ReLU+pool
    -> (c2, H/4, W/4) -> flatten -> hidden -> num_classes.
    """
    channels, height, width = input_shape
    if (height, width) == (28, 28):
        return tanh_cnn_28(channels=channels, num_classes=num_classes)
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


def tanh_cnn_28(*, channels: int, num_classes: int) -> nn.Module:
    """The small tanh CNN for 28×28 images of Opacus's MNIST example and Tramèr & Boneh (2021).

    (C, 28, 28) -> conv 16 k8 s2 + tanh + pool 2/1 -> (16, 13, 13) -> conv 32 k4 s2 + tanh
    + pool 2/1 -> (32, 4, 4) -> fc 32 + tanh -> num_classes. 26k parameters, no
    normalization: under DP-SGD a small model with bounded activations learns more per
    unit of noise, and its per-sample gradients cost a tenth of a wider CNN's on a CPU.
    """
    return nn.Sequential(
        nn.Conv2d(channels, 16, kernel_size=8, stride=2, padding=3),
        nn.Tanh(),
        nn.MaxPool2d(2, stride=1),
        nn.Conv2d(16, 32, kernel_size=4, stride=2),
        nn.Tanh(),
        nn.MaxPool2d(2, stride=1),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 32),
        nn.Tanh(),
        nn.Linear(32, num_classes),
    )


def fedavg_cnn(*, input_shape: tuple[int, ...], num_classes: int, **_: object) -> nn.Module:
    """The CNN of McMahan et al. (2017), "Communication-efficient learning ... (FedAvg)".

    (C, H, W) -> conv 32 k5 + ReLU + pool 2 -> (32, H/2, W/2) -> conv 64 k5 + ReLU + pool 2
    -> (64, H/4, W/4) -> fc 512 + ReLU -> num_classes. 1,663,370 parameters at 28×28: the
    model of federated-learning benchmarks (and of issue 6's federation workload), large
    enough that a round's compute, not messaging, should dominate.
    """
    channels, height, width = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 32, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * (height // 4) * (width // 4), 512),
        nn.ReLU(),
        nn.Linear(512, num_classes),
    )
