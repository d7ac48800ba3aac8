"""A sample whose gradient is not finite counts as 0 in DP-SGD, not as a NaN update.

Clipping scales each per-sample gradient by C / ‖g‖, which is NaN where ‖g‖ is not
finite (an input of 1e30 is finite in float32 and passes the data checks): the clipped sum,
the client's update and the round were then NaN, and the server dropped the client,
naming it, whenever that one sample was drawn. Now such a sample is left out of its step.
"""

import dataclasses

import numpy as np
import pytest
import torch

from fedsim.clients import local
from fedsim.clients.training import train_local
from fedsim.config import parse_config
from fedsim.data import load_dataset
from fedsim.dp import dp_randomness, seeded_root
from fedsim.models import build_model, check_client_model, model_kwargs
from tests.test_grouping import SMALL, SMOOTH, start_state

DIGITS = load_dataset("digits", "")
N = 24


def update(x, y, grad_sample, seed=0):
    """The weights' change after one full-batch DP-SGD step (q = 1) without noise."""
    torch.manual_seed(0)
    model = build_model("cnn", **model_kwargs(DIGITS), dp=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    randomness = dp_randomness(seeded_root(seed), server_round=1, client=0, device="cpu",
                               secure=False)  # fmt: skip
    train_local(model, x, y, epochs=1, batch_size=64, lr=1.0, noise_multiplier=0.0,
                max_grad_norm=0.5, grad_sample=grad_sample, randomness=randomness)  # fmt: skip
    return {k: v - before[k] for k, v in model.state_dict().items()}


@pytest.mark.parametrize("grad_sample", ["fast", "hooks", "ghost"])
def test_a_sample_with_a_non_finite_gradient_counts_as_zero(grad_sample):
    x, y = np.array(DIGITS.x_train[:N]), np.array(DIGITS.y_train[:N])
    x[3] = 1e30  # finite, but its gradient's norm is not
    with_it = update(x, y, grad_sample)
    without = update(np.delete(x, 3, axis=0), np.delete(y, 3), grad_sample)
    for name, delta in with_it.items():
        assert torch.isfinite(delta).all(), name
        # the same clipped sum of the other samples, over n = N rather than N - 1 expected
        torch.testing.assert_close(N * delta, (N - 1) * without[name], rtol=1e-3, atol=1e-5)
    assert any(bool(d.abs().sum() > 0) for d in with_it.values())


def test_a_grouped_client_with_such_a_sample_gets_its_one_by_one_update(monkeypatch):
    config = parse_config({**SMALL, "batch-size": 16, "model": SMOOTH, "dp": "sample",
                           "noise-multiplier": 1.1, "clients-per-worker": 3})  # fmt: skip
    original = local.client_tensors

    def with_extreme_input(config, pid, **kwargs):
        x, y = original(config, pid, **kwargs)
        if pid == 0:  # every sample is drawn (q = 1): the extreme one too
            x = np.array(x)
            x[1] = 1e30
        return x, y

    monkeypatch.setattr(local, "client_tensors", with_extreme_input)
    state, clients = start_state(model=SMOOTH), [4, 0, 2]
    group = local.train_group(config, clients, 3, state)
    for pid in clients:
        alone, report = local.train_round(config, pid, 3, state)
        grouped, grouped_report = group[pid]
        assert grouped_report == report
        for key, value in alone.items():
            assert torch.isfinite(grouped[key]).all(), (pid, key)
            torch.testing.assert_close(grouped[key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("grad_sample", ["fast", "hooks", "ghost"])
def test_whether_a_run_starts_does_not_depend_on_one_training_example(grad_sample):
    """The checks before round 1 probe the public test split: an extreme first training
    example (it used to fail every mode's check) changes nothing there."""
    x_train = np.array(DIGITS.x_train)
    x_train[0] = 1e30
    extreme = dataclasses.replace(DIGITS, x_train=x_train)
    config = parse_config({"grad-sample": grad_sample, "noise-multiplier": 1.0})
    check_client_model(config, extreme)
