"""Local training: plain SGD or Opacus DP-SGD with Poisson sampling.

Each call makes a fresh ``PrivacyEngine``; that is safe because the engine's accountant
is not where privacy is counted. The client returns what Opacus recorded for this round
and the server composes it with every earlier round of the same client.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import TensorDataset

from fedsim.dp import (
    DPRandomness,
    make_private,
    new_engine,
    next_char_targets,
    poisson_schedule,
    secure_dp_randomness,
)
from fedsim.messages import PrivacySpent


def train_local(
    model: nn.Module,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    noise_multiplier: float | None = None,
    max_grad_norm: float = 1.0,
    grad_sample: str = "auto",
    device: str = "cpu",
    all_positions: bool = False,
    randomness: DPRandomness | None = None,
    proximal_mu: float = 0.0,
) -> tuple[float, PrivacySpent]:
    """Train ``model`` in place for ``epochs`` over ``(x, y)``.

    Parameters
    ----------
    x, y
        Arrays or tensors; they are moved to ``device`` once (tensors already there stay).
    noise_multiplier
        ``None`` trains without DP. A number trains with DP-SGD on
        :func:`fedsim.dp.schedule.poisson_schedule`: Poisson sampling at rate
        ``1 / ceil(len(x) / batch_size)`` for that many steps an epoch, per-sample clipping
        to ``max_grad_norm`` and Gaussian noise of std ``noise_multiplier × max_grad_norm``.
    all_positions
        Next-character windows only: train every position of a window to predict the
        character after it (the window's own next characters, then the label ``y``),
        not the last position alone. One window's loss is the mean over its positions,
        so DP-SGD still clips one gradient per sample.
    grad_sample
        How per-sample gradients are clipped: ``auto``, ``fast``, ``hooks`` or ``ghost``
        (``fedsim.dp.make_private``); the same DP-SGD step in every mode.
    randomness
        DP-SGD's Poisson-mask and noise generators; by default fresh ones from the
        operating system's CSPRNG, so that no seed anyone knows can rebuild the noise.
        Without DP its ``batches`` generator shuffles (torch's global one if None).
    proximal_mu
        FedProx: after every step, pull the weights toward the round's starting weights
        by ``lr · μ · (w − w₀)``. The pull does not depend on the data, so under DP-SGD it
        costs no privacy (it is applied after the noise).

    Returns
    -------
    tuple
        Mean training loss over all steps, and the privacy spent (empty without DP).

    """
    model.to(device).train()
    # the data goes to the device once; every batch is then one gather there
    xs, ys = torch.as_tensor(x).to(device), torch.as_tensor(y).to(device)
    if noise_multiplier is None:
        loss = _train_plain(
            model, (xs, ys), randomness, epochs=epochs, batch_size=batch_size, lr=lr,
            momentum=momentum, all_positions=all_positions, proximal_mu=proximal_mu,
        )  # fmt: skip
        return loss, PrivacySpent()
    randomness = randomness or secure_dp_randomness(device)
    run = partial(
        _train_dp, model, (xs, ys), randomness, epochs=epochs, batch_size=batch_size, lr=lr,
        momentum=momentum, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        grad_sample=grad_sample, all_positions=all_positions, proximal_mu=proximal_mu,
    )  # fmt: skip
    return _rerun_if_not_finite(model, randomness, run)


def _train_plain(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    randomness: DPRandomness | None,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    all_positions: bool,
    proximal_mu: float,
) -> float:
    """One round of minibatch SGD; ``randomness.batches`` shuffles (None: torch's global)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    shuffle = randomness.batches if randomness is not None else None
    order = [_shuffled_batches(len(data[1]), batch_size, shuffle) for _ in range(epochs)]
    return _epochs(
        model, optimizer, order, data, nn.CrossEntropyLoss(), all_positions,
        _proximal(model, lr * proximal_mu),
    )  # fmt: skip


def _rerun_if_not_finite(
    model: nn.Module, randomness: DPRandomness, run: Callable[..., tuple[float, PrivacySpent]]
) -> tuple[float, PrivacySpent]:
    """``run``'s DP round; again, screening samples, if it leaves a weight not finite."""
    start = _snapshot(model, randomness)
    loss, spent = run(screen=False)
    if not all_finite(model.state_dict()):
        # a sample whose gradient is not finite (an extreme input, say) makes the clipped
        # sum NaN, and a dropped update would tell that it was drawn: the round runs again
        # from the same weights and streams, each such sample left out of its step (its
        # clipped gradient counts as 0, whatever the others hold)
        _restore(model, randomness, start)
        loss, spent = run(screen=True)
    return loss, spent


def _train_dp(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    randomness: DPRandomness,
    *,
    screen: bool,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    noise_multiplier: float,
    max_grad_norm: float,
    grad_sample: str,
    all_positions: bool,
    proximal_mu: float,
) -> tuple[float, PrivacySpent]:
    """One round of DP-SGD; ``screen``: leave samples with non-finite gradients out."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    engine = new_engine()
    private = make_private(
        engine,
        grad_sample=grad_sample,
        module=model,
        optimizer=optimizer,
        dataset=TensorDataset(*data),
        schedule=poisson_schedule(len(data[1]), batch_size=batch_size, epochs=epochs),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        randomness=randomness,
    )
    # the Poisson sampler's index lists, drawn as Opacus's loader draws them, but
    # gathered from the device tensors instead of fetched one sample at a time
    sampler = private.data_loader.batch_sampler
    order = [list(sampler) for _ in range(epochs)]
    loss = _epochs(
        private.module, private.optimizer, order, data, private.criterion, all_positions,
        _proximal(model, lr * proximal_mu), screen=private.sample_norms if screen else None,
    )  # fmt: skip
    private.close()  # drop the per-sample hooks from the module we were given
    return loss, _spent(engine)


def all_finite(state: dict[str, torch.Tensor]) -> bool:
    """Whether every value of a model's ``state`` is finite: one host wait for all of it."""
    return bool(torch.stack([torch.isfinite(t).all() for t in state.values()]).all())


Snapshot = tuple[dict[str, torch.Tensor], list[torch.Tensor]]


def _snapshot(model: nn.Module, randomness: DPRandomness) -> Snapshot:
    """The weights and every generator state a round starts from, to run it again."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return weights, [g.get_state() for g in _generators(model, randomness)]


def _restore(model: nn.Module, randomness: DPRandomness, snapshot: Snapshot) -> None:
    weights, states = snapshot
    model.load_state_dict(weights)
    for generator, state in zip(_generators(model, randomness), states, strict=True):
        generator.set_state(state)


def _generators(model: nn.Module, randomness: DPRandomness) -> list[torch.Generator]:
    """DP-SGD's streams and torch's default generators, which dropout draws from."""
    device = next(model.parameters()).device
    default = [torch.default_generator]
    if device.type == "cuda":
        default.append(torch.cuda.default_generators[device.index or 0])
    return [randomness.batches, randomness.noise, *default]


def _spent(engine: PrivacyEngine) -> PrivacySpent:
    """What Opacus's accountant recorded: its (noise multiplier, sample rate, steps)."""
    history = engine.accountant.history  # [(noise_multiplier, sample_rate, steps), ...]
    return PrivacySpent(
        noise_multiplier=tuple(float(h[0]) for h in history),
        sample_rate=tuple(float(h[1]) for h in history),
        steps=tuple(int(h[2]) for h in history),
    )


def _shuffled_batches(
    n: int, batch_size: int, generator: torch.Generator | None
) -> list[torch.Tensor]:
    """One epoch's minibatches of indices: a permutation cut into pieces."""
    return list(torch.randperm(n, generator=generator).split(batch_size))


def _epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    order: list[list[Any]],
    data: tuple[torch.Tensor, torch.Tensor],
    criterion: Callable[[torch.Tensor, torch.Tensor], Any],
    all_positions: bool,
    after_step: Callable[[], None],
    screen: Callable[[], torch.Tensor | None] | None = None,
) -> float:
    """One step per batch of indices in ``order`` (a list per epoch); the mean batch loss.

    Losses are summed on the device and read once at the end: a ``.item()`` per step
    would make the host wait for the GPU at every step. Empty batches (Poisson
    sampling) step too, with noise only, and count for no loss. ``screen``: the last
    backward pass's per-sample gradient norms; samples whose norm is not finite are
    left out of their step (a host wait per step, so only where a round needs it).
    """
    x, y = data
    total, count = torch.zeros((), device=y.device), 0
    for epoch in order:
        for indices in epoch:
            idx = torch.as_tensor(indices, dtype=torch.long).to(y.device, non_blocking=True)
            xb, yb = x[idx], y[idx]  # (B, ...), (B,) or (B, T)
            optimizer.zero_grad(set_to_none=True)
            loss = _loss(model, xb, yb, criterion, all_positions=all_positions)
            loss.backward()
            norms = screen() if screen is not None else None
            if norms is not None and not bool(torch.isfinite(norms).all()):
                # each sample's own gradient decides, so one sample changes the sum by at
                # most the clip norm; the others' gradients are computed again without it
                keep = torch.isfinite(norms)
                optimizer.zero_grad(set_to_none=True)
                loss = _loss(model, xb[keep], yb[keep], criterion, all_positions=all_positions)
                loss.backward()
            optimizer.step()
            after_step()
            if len(indices):
                total += loss.detach()
                count += 1
    return float(total) / count if count else float("nan")


def _proximal(model: nn.Module, pull: float) -> Callable[[], None]:
    """FedProx's step toward the starting weights, ``w -= pull · (w − w₀)``; none if 0."""
    if pull == 0:
        return lambda: None
    start = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def step() -> None:
        for param, origin in zip(model.parameters(), start, strict=True):
            param.sub_(pull * (param - origin))

    return step


def _loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, criterion, *, all_positions: bool
) -> torch.Tensor:
    if not all_positions:
        return criterion(model(x), y)
    return criterion(model(x, all_positions=True), next_char_targets(x, y))  # logits (N, C, T)
