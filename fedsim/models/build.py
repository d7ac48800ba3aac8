"""Build a model by name or import path, sized by the dataset it will learn.

GroupNorm replaces BatchNorm throughout the built-in models: BatchNorm mixes samples in
a batch, so it has no per-sample gradient and breaks DP-SGD's per-example clipping.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fedsim.data import IMAGE, Dataset
from fedsim.errors import FedsimError
from fedsim.registry import MODELS, resolve, tasks_of


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
