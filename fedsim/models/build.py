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
    choose_grad_sample,
    cohort_clipping,
    dp_attention,
    dp_recurrent,
)
from fedsim.errors import FedsimError, blamed
from fedsim.registry import MODELS, resolve, tasks_of

if TYPE_CHECKING:
    from fedsim.config import FedsimConfig


BUILD_KEYWORDS = ("input_shape", "num_classes", "task", "vocab_size", "dp")


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
        Build for DP-SGD (per-sample gradients): ``FastDPLSTM`` for ``lstm``, and in any
        model ``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and ``nn.MultiheadAttention`` swapped
        for layers that compute the same with per-sample gradients
        (:func:`fedsim.dp.dp_recurrent`, :func:`fedsim.dp.dp_attention`). The state_dict
        is the same either way.

    """
    tasks = tasks_of(name, MODELS, "model")
    if tasks and task not in tasks:
        raise FedsimError(
            f"model {name} does not support task {task}; it supports {', '.join(sorted(tasks))}"
        )
    builder = resolve(name, MODELS, "model")
    keywords = ", ".join(BUILD_KEYWORDS)
    fix = f"fedsim builds it with the keywords {keywords}: accept them (**kwargs takes the rest)"
    with blamed(f"model '{name}' could not be built", fix):
        model = builder(
            input_shape=input_shape, num_classes=num_classes, task=task, vocab_size=vocab_size,
            dp=dp,
        )  # fmt: skip
    if not isinstance(model, nn.Module):
        raise FedsimError(f"model '{name}' built a {type(model).__name__}, not a torch.nn.Module")
    return dp_attention(dp_recurrent(model)) if dp else model


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

    Any model must train something and score a batch (:func:`check_outputs`). Under
    sample-level DP it must keep a batch's samples apart
    (:func:`fedsim.dp.check_samples_apart`, run on a few test inputs) and, trained one
    client at a time, take a DP-SGD step in the configured ``grad-sample`` mode
    (:func:`fedsim.dp.check_clippable`); with ``clients-per-worker`` > 1 it must
    vectorize (:func:`fedsim.dp.check_cohort_model`, then a step of
    :func:`fedsim.dp.check_cohort_step`).
    """
    model = build_model(config.model, **model_kwargs(dataset), dp=config.dp_sample)
    # the probes come from the public test split: whether a run may start must not
    # depend on one training example (an extreme one would fail every check)
    x = torch.as_tensor(dataset.x_test[:PROBE_SAMPLES])
    y = torch.as_tensor(dataset.y_test[:PROBE_SAMPLES])
    check_outputs(model, x, num_classes=dataset.num_classes, name=config.model)
    if not (config.dp_sample or config.clients_per_worker > 1):
        return
    if config.clients_per_worker > 1:  # first: it names the layer
        check_cohort_model(model)
    if config.dp_sample:
        check_samples_apart(model, x)
    if config.clients_per_worker > 1:
        check_cohort_step(model, x, y, dp=config.dp_sample, all_positions=config.all_positions)
    elif config.dp_sample:
        check_clippable(
            model, x, y, grad_sample=config.grad_sample, all_positions=config.all_positions
        )


def clipping_path(config: FedsimConfig, dataset: Dataset) -> str | None:
    """How the clients clip per-sample gradients; ``None`` without sample-level DP.

    The ``grad-sample`` mode that training one client at a time uses (``auto``'s choice
    where ``auto``), or with ``clients-per-worker`` > 1 the cohort's clipping:
    ``cohort, one-pass`` or ``cohort, per-sample``.
    """
    if not config.dp_sample:
        return None
    with torch.random.fork_rng(devices=[]):  # it draws nothing from the run's RNG
        model = build_model(config.model, **model_kwargs(dataset), dp=True)
        if config.clients_per_worker == 1:
            return choose_grad_sample(config.grad_sample, model)
        # a held-out example: the published answer must not depend on training data
        x, y = torch.as_tensor(dataset.x_test[:1]), torch.as_tensor(dataset.y_test[:1])
        clipping = cohort_clipping(model, x, y, all_positions=config.all_positions)
    return f"cohort, {clipping}"


def check_outputs(model: nn.Module, x: torch.Tensor, *, num_classes: int, name: str) -> None:
    """Refuse a model with nothing to train, or that cannot score ``x`` as evaluation does.

    Evaluation calls the model in eval mode on a batch of the dataset's inputs and reads
    its output as logits, ``(batch, num_classes)``. ``model`` is left in train mode.
    """
    if not any(p.requires_grad for p in model.parameters()):
        raise FedsimError(
            f"model {name} has no trainable parameters; give it at least one (an nn.Linear "
            "head) or set requires_grad on the ones it should learn"
        )
    model.eval()
    what = (
        f"model {name} failed on {len(x)} of the dataset's inputs, shape {tuple(x.shape)} {x.dtype}"
    )
    try:
        with blamed(what, "make its forward take a batch of them"), torch.no_grad():
            out = model(x)
    finally:
        model.train()
    want = (len(x), num_classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise FedsimError(
            f"model {name} returned {got} for {len(x)} inputs; it must return logits of "
            f"shape (batch, num_classes) = {want} in eval mode"
        )
