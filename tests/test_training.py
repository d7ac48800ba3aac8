import math
import warnings

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator

from fedsim.clients.training import train_local
from fedsim.data import load_digits
from fedsim.models import build_model
from fedsim.registry import MODELS

DIGITS = load_digits()


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_models_valid_for_opacus(name, shape):
    model = build_model(name, input_shape=shape, num_classes=10, dp=True)
    assert ModuleValidator.validate(model, strict=False) == []
    assert model(torch.zeros(2, *shape)).shape == (2, 10)


def test_dp_training_reports_what_opacus_did():
    torch.manual_seed(0)
    model = build_model("cnn", input_shape=(1, 8, 8), num_classes=10)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = DIGITS.x_train[:100], DIGITS.y_train[:100]
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        loss, spent = train_local(
            model, x, y, epochs=2, batch_size=32, lr=0.5, noise_multiplier=1.3, max_grad_norm=1.0
        )
    # the noise came from the OS (secure_dp_randomness): Opacus's "Secure RNG turned
    # off" would tell a reader of the log the opposite
    assert not [w for w in said if "Secure RNG" in str(w.message)]
    batches = math.ceil(100 / 32)
    assert spent.noise_multiplier == (1.3,)
    assert spent.sample_rate == (1 / batches,)
    assert spent.steps == (2 * batches,)
    assert np.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not any(
        hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters()
    )
    # the module is reusable as a plain module after DP training
    build_model("cnn", input_shape=(1, 8, 8), num_classes=10).load_state_dict(model.state_dict())


def test_dp_noise_is_really_added():
    def run(sigma):
        torch.manual_seed(0)
        model = build_model("cnn", input_shape=(1, 8, 8), num_classes=10)
        train_local(
            model,
            DIGITS.x_train[:64],
            DIGITS.y_train[:64],
            epochs=1,
            batch_size=64,
            lr=0.1,
            noise_multiplier=sigma,
            max_grad_norm=1.0,
        )
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    quiet, noisy = run(0.0), run(50.0)
    assert (noisy - quiet).norm() > 1.0


def test_plain_training_spends_nothing():
    model = build_model("cnn", input_shape=(1, 8, 8), num_classes=10)
    _, spent = train_local(
        model, DIGITS.x_train[:64], DIGITS.y_train[:64], epochs=1, batch_size=16, lr=0.1
    )
    assert spent.steps == ()


def test_tiny_client_with_empty_poisson_batches():
    torch.manual_seed(1)
    model = build_model("cnn", input_shape=(1, 8, 8), num_classes=10)
    _, spent = train_local(
        model,
        DIGITS.x_train[:3],
        DIGITS.y_train[:3],
        epochs=5,
        batch_size=1,
        lr=0.1,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    assert spent.steps == (15,)
