"""K clients' local training at once: stacked weights, ``torch.func.vmap`` over clients.

One client's round (``clients.training.train_local``) is a few dozen small steps, too
small to keep a GPU busy. Here a cohort of K clients trains together: their weights are
stacked on a leading client axis, each step gathers every client's batch into one
(K, B, ...) tensor, and ``torch.func.vmap`` runs the model over clients. DP-SGD clips in
one backward pass (``cohort_step``: per-layer rules on each layer's inputs and output
gradients, no per-sample copies of linear layers' weights) wherever every trainable
layer has a rule (a linear layer run at every step of a recurrence, as in Opacus's
``DPGRU``, takes its calls together), and from per-sample gradients
(``vmap(grad(...))`` over samples) otherwise.

Each client's mechanism is the one-client path's, draw for draw: its Poisson masks come
from Opacus's own sampler on the client's ``batches`` generator, and its noise is one draw
a step from the client's ``noise`` generator, of all parameters' elements in parameter
order, as ``fedsim.dp.noise`` draws it for one client (``cohort_update``). With equal
generators a client's new weights equal ``train_local``'s up to float rounding
(tests/test_cohort.py). One exception: where a max-pooling window holds near-tied values
(or a ReLU's input is near 0), the cohort's convolutions (batched over clients by vmap)
and one client's may round differently and the sample's gradient flow through another
input; both are valid per-sample gradients, clipped alike. On the digits ``cnn`` (seed 0)
that moved one client of three by up to 2.3e-3 after one epoch (8e-3 after two); with
its inputs jittered by 1e-3, which breaks the ties, it matched to 3e-8. Clients share no
stream and no sample. Dropout draws its masks from torch's global generator, each client
and (with per-sample gradients) each sample its own, so a model with dropout trains as in
``train_local`` but not mask for mask.

Ragged clients (sizes n_k, steps s_k): a step's batches are padded to the widest with
weight-0 rows (copies of a real example, so their gradients are finite and × 0 is an
exact zero), and clients are sorted by step count, so that those still training at step
t are a prefix of the stack; the others are not computed at all.

Cost (experiments/research/bench_cohort.py; docs/benchmarks.md): on a CPU the one-pass
step made ``fedavg-cnn``'s DP round 3.0x faster than per-sample gradients (it never
builds B copies of the 1.6 M-weight linear layer). On an H200, measured with per-sample
clipping, the convolutions' per-sample weight gradients dominated: vmap makes them grouped
convolutions, one group per (client, sample).
"""

from __future__ import annotations

import copy
import itertools
from typing import Literal, NamedTuple

import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import Tensor, nn
from torch.func import vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from fedsim.dp.cohort_step import Step, Weights, canonical_names, client_step
from fedsim.dp.cohort_update import CohortNoise, CohortSGD
from fedsim.dp.randomness import DPRandomness, secure_dp_randomness
from fedsim.dp.recurrent import check_cohort_model, vectorizable
from fedsim.dp.schedule import poisson_schedule
from fedsim.errors import FedsimError

Data = list[tuple[Tensor, Tensor]]  # each client's (x, y)


class CohortUpdate(NamedTuple):
    """One client's result: its new state_dict and its mean loss over non-empty steps."""

    state: dict[str, Tensor]
    loss: float


class _Layout(NamedTuple):
    """Every step's batches, padded; clients in training order (most steps first)."""

    picks: Tensor  # (T, K, W) rows of the concatenated data
    rows: Tensor  # (T, K, W) 1 for a real row, 0 for padding
    means: Tensor  # (T, K, W) float64: 1 / batch size for a real row, so Σ_w is its mean
    active: list[int]  # clients still training at step t: a prefix of the stack
    width: list[int]  # the widest of their batches at step t (>= 1)
    seen: list[int]  # each client's non-empty batches


def train_cohort(
    model: nn.Module,
    starts: list[Weights],
    data: Data,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    noise_multiplier: float | None,
    max_grad_norm: float = 1.0,
    randomness: list[DPRandomness] | None = None,
    device: str | torch.device = "cpu",
    all_positions: bool = False,
    proximal_mu: float = 0.0,
    chunk_size: int | None = None,
    clipping: Literal["one-pass", "per-sample"] = "one-pass",
) -> list[CohortUpdate]:
    """Train K clients from their own start weights on their own data, all at once.

    Parameters
    ----------
    model
        The architecture (left untouched); ``starts[k]`` is client k's state_dict.
        Running statistics are refused (:func:`check_cohort_model`); recurrent layers
        train as Opacus's DP RNNs (:func:`fedsim.dp.recurrent.vectorizable`).
    data
        Client k's ``(x, y)``, arrays or tensors of any length n_k >= 1.
    noise_multiplier
        ``None``: plain minibatch SGD, each epoch a permutation drawn from
        ``randomness[k].batches`` cut into batches of ``batch_size``, as ``train_local``
        draws it. A number: DP-SGD on
        :func:`fedsim.dp.schedule.poisson_schedule`, as ``train_local`` does it.
    randomness
        One per client; by default fresh ones from the operating system's CSPRNG.
    all_positions, proximal_mu
        As in ``clients.training.train_local``.
    chunk_size
        Clients per ``vmap`` chunk; ``None``: all. A step holds chunk · B of every layer's
        inputs and output gradients (the per-sample fallback: chunk · B · parameters
        gradients): smaller chunks bound that memory.
    clipping
        DP's clipped sum: ``"one-pass"`` (layer rules on each layer's inputs and output
        gradients; per-sample gradients for a model where a layer has no rule) or
        ``"per-sample"`` (every sample's gradient by ``vmap(grad(...))``: the reference).

    Returns
    -------
    list
        A :class:`CohortUpdate` per client, in the order of ``data``, on ``device``.

    """
    _check_inputs(model, starts, data, randomness)
    rand = randomness or [secure_dp_randomness(device) for _ in data]
    dp = noise_multiplier is not None
    order, plans = _plans(data, rand, batch_size, epochs, dp=dp)
    template = vectorizable(copy.deepcopy(model)).to(device).train()
    names = canonical_names(template)
    weights, consts = _stacked(model, names, [starts[k] for k in order], device)
    x = torch.cat([torch.as_tensor(data[k][0]).to(device) for k in order])  # (Σn, ...)
    y = torch.cat([torch.as_tensor(data[k][1]).to(device) for k in order])  # (Σn, ...)
    sizes = [len(data[k][1]) for k in order]
    layout = _layout(plans, sizes, next(iter(weights.values())).dtype, device)
    noise = None
    if noise_multiplier is not None:
        std = noise_multiplier * max_grad_norm
        noise = CohortNoise([rand[k] for k in order], std, sizes, batch_size=batch_size)
    update = CohortSGD(weights, lr=lr, momentum=momentum, pull=lr * proximal_mu, noise=noise)
    example = ({n: w[0] for n, w in weights.items()}, {n: c[0] for n, c in consts.items()})
    step = client_step(
        template, (*example, x[:1], y[:1]), dp=dp, clip=max_grad_norm,
        all_positions=all_positions, one_pass=clipping == "one-pass",
    )  # fmt: skip
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):  # math attention has vmap rules
        # "different": each client draws its own dropout masks (the noise is drawn outside)
        batched = vmap(step, chunk_size=chunk_size, randomness="different")
        losses = _train(weights, consts, (x, y), layout, batched, update)
    return _unstacked(model, names, {**weights, **consts}, order, losses)


def _plans(
    data: Data, rand: list[DPRandomness], batch_size: int, epochs: int, *, dp: bool
) -> tuple[list[int], list[list]]:
    """The training order (most steps first) and the clients' plans in it, drawn in turn."""
    plans = [
        _plan(len(y), r.batches, batch_size, epochs, dp=dp)
        for (_, y), r in zip(data, rand, strict=True)
    ]
    order = sorted(range(len(data)), key=lambda k: -len(plans[k]))  # stable: most steps first
    return order, [plans[k] for k in order]


def _unstacked(
    model: nn.Module, names: dict[str, str], tensors: Weights, order: list[int], losses: list[float]
) -> list[CohortUpdate]:
    """Each client's row of the stack as a state_dict of ``model``, clients as given."""
    at = {k: j for j, k in enumerate(order)}  # client k's row in the stack
    keys = list(model.state_dict())  # the model's own order (a swapped RNN has its own)
    return [
        CohortUpdate({key: tensors[names[key]][at[k]].clone() for key in keys}, losses[at[k]])
        for k in range(len(order))
    ]


def _check_inputs(
    model: nn.Module, starts: list[Weights], data: Data, randomness: list[DPRandomness] | None
) -> None:
    if not data or len(starts) != len(data) or len(randomness or data) != len(data):
        raise FedsimError(
            f"train_cohort needs one start and one randomness per client: got {len(data)} "
            f"clients, {len(starts)} starts, {len(randomness or data)} randomness"
        )
    for k, (x, y) in enumerate(data):
        if len(y) == 0 or len(x) != len(y):
            raise FedsimError(f"client {k} has {len(x)} inputs and {len(y)} labels; need n >= 1")
    check_cohort_model(model)


def _stacked(
    model: nn.Module,
    canonical: dict[str, str],
    states: list[Weights],
    device: str | torch.device,
) -> tuple[Weights, Weights]:
    """The trainable weights and the other state of every client, stacked: (K, *shape) each.

    Copies, which training updates in place; the other state (buffers, frozen weights) is
    passed to the model as it is and returned unchanged, all keyed by attribute path.
    ``canonical``: :func:`canonical_names` of the template, one path per tensor. The
    weights are in the order of ``model.parameters()``, the order the one-client path draws
    their noise in, also where the template's recurrent layers
    (:func:`fedsim.dp.recurrent.vectorizable`) order them otherwise.
    """
    key_of: dict[int, str] = {}  # each tensor's first state_dict key
    for key, tensor in model.state_dict(keep_vars=True).items():
        key_of.setdefault(id(tensor), key)
    names = [canonical[key_of[id(p)]] for p in model.parameters() if p.requires_grad]
    key_at: dict[str, str] = {}  # each path's first state_dict key, in order
    for key, path in canonical.items():
        key_at.setdefault(path, key)
        if any(key not in state for state in states):
            raise FedsimError(f"a start state_dict lacks '{key}', which the model has")
    # clients usually share one start: each distinct tensor goes to the device once
    moved = {id(s[key]): s[key].detach().to(device) for s in states for key in key_at.values()}
    stacked = {
        path: torch.stack([moved[id(s[key])] for s in states]) for path, key in key_at.items()
    }
    weights = {name: stacked.pop(name) for name in names}
    return weights, stacked


def _plan(n: int, generator: torch.Generator, batch_size: int, epochs: int, *, dp: bool) -> list:
    """One client's batches of indices for every step, drawn as ``train_local`` draws them.

    Every client's draws are sequential calls on its own CPU generator (K · T small
    ``torch.rand``); exactness needs them, and they cost far less than the steps.
    """
    if not dp:  # train_local: a permutation an epoch, all drawn before training
        perms = [torch.randperm(n, generator=generator) for _ in range(epochs)]
        return [batch for perm in perms for batch in perm.split(batch_size)]
    schedule = poisson_schedule(n, batch_size=batch_size, epochs=epochs)
    # what fedsim.dp.poisson_loader's DPDataLoader samples with: rate q, the schedule's steps
    sampler = UniformWithReplacementSampler(
        num_samples=n, sample_rate=schedule.sample_rate, generator=generator, steps=schedule.batches
    )
    return [torch.tensor(b, dtype=torch.long) for _ in range(epochs) for b in sampler]


def _layout(
    plans: list[list], sizes: list[int], dtype: torch.dtype, device: str | torch.device
) -> _Layout:
    """The plans (most steps first) as padded (T, K, W) index and row-weight tensors."""
    offsets = [0, *itertools.accumulate(sizes)][:-1]  # client k's rows in the concatenation
    steps = len(plans[0])
    active = [sum(len(plan) > t for plan in plans) for t in range(steps)]
    width = [max([1, *(len(plan[t]) for plan in plans[:k])]) for t, k in enumerate(active)]
    index = torch.zeros(steps, len(plans), max(width), dtype=torch.long)
    rows = torch.zeros(steps, len(plans), max(width), dtype=torch.float64)
    for k, (plan, offset) in enumerate(zip(plans, offsets, strict=True)):
        index[:, k] = offset  # padding reads the client's first example: finite gradients
        for t, batch in enumerate(plan):
            index[t, k, : len(batch)] += batch
            rows[t, k, : len(batch)] = 1
    means = rows / rows.sum(2, keepdim=True).clamp(min=1)
    seen = (rows.sum(2) > 0).sum(0).tolist()  # on the host: a plan, not a device result
    return _Layout(index.to(device), rows.to(device, dtype), means.to(device), active, width, seen)


def _train(
    weights: Weights,
    consts: Weights,
    data: tuple[Tensor, Tensor],
    layout: _Layout,
    step: Step,
    update: CohortSGD,
) -> list[float]:
    """Every step of the cohort; each client's mean loss over its non-empty steps.

    Nothing here waits for the device: shapes come from the host-side plan, and the
    per-sample losses are kept on the device, weighed by the plan's ``means`` and read
    once at the end (a batch's mean loss, summed over steps: one copy a step, not a
    reduction and an accumulation).
    """
    x, y = data
    losses = torch.zeros_like(layout.rows)  # (T, K, W), the weights' dtype
    for t, (k, width) in enumerate(zip(layout.active, layout.width, strict=True)):
        index, rows = layout.picks[t, :k, :width], layout.rows[t, :k, :width]  # (k, W)
        grads, loss = step(
            {n: p[:k] for n, p in weights.items()},
            {n: c[:k] for n, c in consts.items()},
            x[index],  # (k, W, ...)
            y[index],
            rows,
        )
        update(grads, k)
        losses[t, :k, :width] = loss  # (k, W); an empty batch's rows weigh 0
    total = (losses.double() * layout.means).sum((0, 2)).tolist()
    # no non-empty step: nan, as train_local
    return [s / n if n else float("nan") for s, n in zip(total, layout.seen, strict=True)]
