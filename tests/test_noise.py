"""DP-SGD's noise (fedsim.dp.noise): measured, and checked against a step done by hand."""

from __future__ import annotations

import math

import pytest
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import TensorDataset

from fedsim.dp import DPRandomness, make_private, poisson_schedule
from fedsim.dp.noise import gaussian_noise, split_like

pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off")


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("secure", [False, True])
def test_noise_has_the_asked_std_and_no_mean(secure):
    draws = gaussian_noise(
        3.0, 200_000, generator=generator(1), secure=secure, device="cpu", dtype=torch.float64
    )
    assert draws.shape == (200_000,)
    assert draws.std().item() == pytest.approx(3.0, rel=0.01)
    assert abs(draws.mean().item()) < 5 * 3.0 / math.sqrt(len(draws))
    # a Gaussian's fourth moment is 3 σ⁴: a uniform or a sum of two would be off
    kurtosis = (draws**4).mean() / draws.var() ** 2
    assert kurtosis.item() == pytest.approx(3.0, abs=0.05)


def test_no_noise_at_std_zero_and_each_draw_is_fresh():
    assert torch.equal(
        gaussian_noise(0.0, 5, generator=None, secure=True, device="cpu", dtype=torch.float32),
        torch.zeros(5),
    )
    g = generator(2)
    first, second = (
        gaussian_noise(1.0, 1000, generator=g, secure=False, device="cpu", dtype=torch.float32)
        for _ in range(2)
    )
    assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1].item()) < 0.1


def test_split_like_cuts_views_in_order():
    flat = torch.arange(2 * 11.0).view(2, 11)  # two clients' draws
    parts = split_like(flat, [torch.Size([2, 3]), torch.Size([5])])
    assert [p.shape for p in parts] == [(2, 2, 3), (2, 5)]
    assert torch.equal(parts[1][1], torch.arange(17.0, 22.0))
    assert parts[0].data_ptr() == flat.data_ptr()  # views, no copies


class TwinLayers(nn.Module):
    """Two weights of one shape: noise drawn once and reused for both would show."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 64, bias=False), nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def one_step_training(model, x, y, *, grad_sample, secure):
    """DP-SGD on ``(x, y)`` of 8 examples: q = 1, σ = 2, C = 1, lr 1, noise from seed 4."""
    return make_private(
        PrivacyEngine(accountant="rdp"),
        grad_sample=grad_sample,
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        dataset=TensorDataset(x, y),
        schedule=poisson_schedule(8, batch_size=8, epochs=1),
        noise_multiplier=2.0,
        max_grad_norm=1.0,
        randomness=DPRandomness(generator(3), generator(4), secure),
    )


@pytest.mark.parametrize("grad_sample", ["fast", "hooks", "ghost"])
@pytest.mark.parametrize("secure", [False, True])
def test_a_step_is_the_clipped_sum_plus_one_draw_over_the_expected_batch(grad_sample, secure):
    # one step of n = B = 8 (q = 1: every example), σ = 2, C = 1, lr 1, computed by hand
    torch.manual_seed(0)
    model, x, y = TwinLayers(), torch.randn(8, 64), torch.randint(0, 64, (8,))
    start = [p.detach().clone() for p in model.parameters()]
    clipped = clipped_sum(model, x, y)
    private = one_step_training(model, x, y, grad_sample=grad_sample, secure=secure)
    private.optimizer.zero_grad()
    private.criterion(private.module(x), y).backward()
    private.optimizer.step()
    private.close()
    total = sum(p.numel() for p in start)
    flat = gaussian_noise(
        2.0, total, generator=generator(4), secure=secure, device="cpu", dtype=torch.float32
    )
    noise = split_like(flat, [p.shape for p in start])
    for p, p0, c, z in zip(model.parameters(), start, clipped, noise, strict=True):
        torch.testing.assert_close(p.detach(), p0 - (c + z) / 8, rtol=0, atol=1e-5)
    a, b = noise[0].flatten(), noise[1].flatten()  # the two weights got different draws
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.1


def clipped_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Σ_b min(1, C / (|g_b| + 1e-6)) g_b with C = 1, one sample at a time (the definition)."""
    total = [torch.zeros_like(p) for p in model.parameters()]
    for xb, yb in zip(x, y, strict=True):
        grads = torch.autograd.grad(
            nn.functional.cross_entropy(model(xb[None]), yb[None]), list(model.parameters())
        )
        norm = torch.cat([g.flatten() for g in grads]).norm()
        coef = min(1.0, 1.0 / (norm.item() + 1e-6))
        total = [t + coef * g for t, g in zip(total, grads, strict=True)]
    return total


class Calls(TorchDispatchMode):
    """The operators a block calls, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("secure", [False, True])
def test_a_step_draws_its_noise_in_one_call_not_one_per_parameter(secure):
    model, x, y = TwinLayers(), torch.randn(8, 64), torch.randint(0, 64, (8,))
    private = one_step_training(model, x, y, grad_sample="fast", secure=secure)
    private.criterion(private.module(x), y).backward()
    with Calls() as calls:
        private.optimizer.step()
    private.close()
    # three parameters; secure noise is Opacus's: one draw thrown away, four summed
    assert calls.names.count("normal") == (5 if secure else 1)
    assert "div_" not in calls.names and "_foreach_div_" in calls.names


def test_bench_noise_counts_fewer_operators_for_the_fused_step(capsys):
    from experiments.research import bench_noise

    bench_noise.main(["--repeats", "1", "--models", "project-cnn", "--batch", "4"])
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()]
    ops = {
        row[3].strip(): int(row[4]) for row in rows if len(row) > 4 and row[1] == " project-cnn "
    }
    assert ops["none"] < ops["fused"] < ops["opacus"]
