"""A check, by running the model, that it keeps the samples of a batch apart.

DP-SGD bounds one sample's influence by clipping that sample's gradient. The bound holds
only if a sample's loss depends on no other sample (no batch statistics, no operation
across the batch) and if every layer's output starts with the batch dimension: the
one-pass rules (``fedsim.dp.clip_rules``), Opacus's grad samplers and the cohort's probes
all read dimension 0 as the sample. Checks by layer type (Opacus's validator,
``check_cohort_model``) miss a parameter-free ``BatchNorm(affine=False,
track_running_stats=False)``, a hand-written ``x - x.mean(0)`` or a time-major layer;
running the model does not.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from fedsim.dp.clip_rules import OPACUS_RNNS
from fedsim.errors import FedsimError

PROBE_SAMPLES = 4  # batches of 3, 3 (one sample replaced) and 2


def check_samples_apart(model: nn.Module, x: Tensor) -> None:
    """Refuse, in one line, a model whose training forward mixes samples or is not batch-first.

    Runs a copy of ``model`` in training mode on ``x[:3]``, on the same batch with its
    first sample replaced by ``x[3]``, and on ``x[:2]``, from the same random state each
    time (so dropout masks agree). The outputs of the samples not replaced must not
    change, and every layer with parameters must return the batch first. With fewer than
    ``PROBE_SAMPLES`` samples there is nothing to compare, and it does nothing.
    """
    if len(x) < PROBE_SAMPLES:
        return
    probe = copy.deepcopy(model).train()
    name = type(model).__name__
    firsts: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    hooks = [
        layer.register_forward_hook(_recorder(path, firsts))
        for path, layer in probe.named_modules()
        # an Opacus DP RNN's parameters are its cells', which see one step (B, .) even
        # where the container runs time-first
        if next(layer.parameters(recurse=False), None) is not None
        and not isinstance(layer, OPACUS_RNNS)
    ]
    try:
        base = _run(probe, x[:3], firsts, name)
        other = _run(probe, torch.cat([x[3:4], x[1:3]]), firsts, name)
        _run(probe, x[:2], firsts, name)
    finally:
        for hook in hooks:
            hook.remove()
    scale = float(base.abs().max()) + 1e-6
    if not torch.allclose(base[1:], other[1:], rtol=1e-4, atol=1e-5 * scale):
        raise FedsimError(
            f"model {name} mixes the samples of a batch in training: changing one sample "
            "changed another's output, so per-sample clipping cannot bound one sample's "
            "influence; remove batch statistics (BatchNorm: use GroupNorm or LayerNorm) "
            "and any operation across the batch"
        )


def _recorder(
    path: str, firsts: list[tuple[str, nn.Module, tuple[int, ...]]]
) -> Callable[[nn.Module, tuple, object], None]:
    def hook(layer: nn.Module, inputs: tuple, output: object) -> None:
        out = output[0] if isinstance(output, tuple | list) else output
        if isinstance(out, Tensor):
            firsts.append((path, layer, tuple(out.shape)))

    return hook


def _run(
    probe: nn.Module, xb: Tensor, firsts: list[tuple[str, nn.Module, tuple[int, ...]]], name: str
) -> Tensor:
    """The output for ``xb`` from a fixed random state; every layer's output batch-first."""
    firsts.clear()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.default_generator.manual_seed(0)  # the CPU one only: fork_rng restores it
        out = probe(xb)
    for path, layer, shape in firsts:
        if not shape or shape[0] != len(xb):
            raise FedsimError(
                f"model {name}: layer '{path}' ({type(layer).__name__}) returned shape "
                f"{shape} for a batch of {len(xb)}; per-sample clipping reads the first "
                "dimension as the sample, so make every layer's output batch-first"
            )
    if not isinstance(out, Tensor) or out.shape[:1] != xb.shape[:1]:
        raise FedsimError(f"model {name} must return a tensor with one row per sample")
    return out
