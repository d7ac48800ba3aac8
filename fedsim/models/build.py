"""Build a model by name or import path, sized by the dataset it will learn.

GroupNorm replaces BatchNorm throughout the built-in models: BatchNorm mixes samples in
a batch, so it has no per-sample gradient and breaks DP-SGD's per-example clipping.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedsim.data import IMAGE, Dataset
from fedsim.dp import (
    PROBE_SAMPLES,
    check_clippable,
    check_cohort_model,
    check_cohort_step,
    check_samples_apart,
)
from fedsim.errors import FedsimError
from fedsim.registry import MODELS, resolve, tasks_of

if TYPE_CHECKING:
    from fedsim.config import FedsimConfig


def build_model(
    name: str,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    task: str = IMAGE,
    vocab_size: int = 0,
    dp: bool = False,
) -> nn.Module:
    """Build a built-in model, or your own (``"module:attr"``), for ``task`` inputs.

    Parameters
    ----------
    vocab_size
        Number of token ids, for text tasks (``len(Dataset.vocab)``).
    dp
        Build for DP-SGD (per-sample gradients), e.g. ``FastDPLSTM`` for ``lstm``.
        The state_dict is the same either way.

    """
    tasks = tasks_of(name, MODELS, "model")
    if tasks and task not in tasks:
        raise FedsimError(
            f"model {name} does not support task {task}; it supports {', '.join(sorted(tasks))}"
        )
    builder = resolve(name, MODELS, "model")
    model = builder(
        input_shape=input_shape, num_classes=num_classes, task=task, vocab_size=vocab_size, dp=dp
    )
    if not isinstance(model, nn.Module):
        raise FedsimError(f"model '{name}' built a {type(model).__name__}, not a torch.nn.Module")
    return model


def model_kwargs(dataset: Dataset) -> dict[str, Any]:
    """The keywords of :func:`build_model` that ``dataset`` decides."""
    return {
        "input_shape": dataset.input_shape,
        "num_classes": dataset.num_classes,
        "task": dataset.task,
        "vocab_size": len(dataset.vocab or ()),
    }


def check_client_model(config: FedsimConfig, dataset: Dataset) -> None:
    """Refuse, before any round, a client model that DP-SGD or the cohort cannot train.

    Under sample-level DP the model must keep a batch's samples apart
    (:func:`fedsim.dp.check_samples_apart`, run on a few training inputs) and, trained one
    client at a time, take a DP-SGD step in the configured ``grad-sample`` mode
    (:func:`fedsim.dp.check_clippable`); with ``clients-per-worker`` > 1 it must
    vectorize (:func:`fedsim.dp.check_cohort_model`, then a step of
    :func:`fedsim.dp.check_cohort_step`).
    """
    if not (config.dp_sample or config.clients_per_worker > 1):
        return
    model = build_model(config.model, **model_kwargs(dataset), dp=config.dp_sample)
    x = torch.as_tensor(dataset.x_train[:PROBE_SAMPLES])
    y = torch.as_tensor(dataset.y_train[:PROBE_SAMPLES])
    if config.clients_per_worker > 1:  # first: it names the layer
        check_cohort_model(model)
    if config.dp_sample:
        check_samples_apart(model, x)
    if config.clients_per_worker > 1:
        check_cohort_step(model, x, y, dp=config.dp_sample)
    elif config.dp_sample:
        check_clippable(model, x, y, grad_sample=config.grad_sample)
