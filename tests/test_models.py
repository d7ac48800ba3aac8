"""Every model on every task it supports: Opacus-valid as built, forward, backward, DP step."""

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator

from fedsim.clients.training import train_local
from fedsim.config import parse_config
from fedsim.data import IMAGE, NEXT_CHAR, TEXT_CLASSIFICATION, load_checked
from fedsim.dp import check_samples_apart
from fedsim.errors import FedsimError
from fedsim.experiments.run import preflight
from fedsim.models import build_model, clipping_path, opacus_lstm_layer
from fedsim.registry import DATASETS, MODELS

VOCAB = 40
SPECS = {  # task -> (input_shape, num_classes)
    IMAGE: ((1, 8, 8), 10),
    TEXT_CLASSIFICATION: ((12,), 2),
    NEXT_CHAR: ((20,), VOCAB),
}
CASES = [(m, t) for m in sorted(MODELS) for t in sorted(MODELS[m].tasks)]


def batch(task, n=24, seed=0):
    rng = np.random.default_rng(seed)
    shape, classes = SPECS[task]
    if task == IMAGE:
        x = rng.normal(size=(n, *shape)).astype(np.float32)
    else:
        x = rng.integers(2, VOCAB, (n, *shape)).astype(np.uint8)
        x[: n // 2, shape[0] // 2 :] = 0  # right padding
    return x, rng.integers(0, classes, n)


def build(name, task, *, dp):
    shape, classes = SPECS[task]
    return build_model(
        name, input_shape=shape, num_classes=classes, task=task, vocab_size=VOCAB, dp=dp
    )


@pytest.mark.parametrize(("name", "task"), CASES)
def test_valid_for_opacus_forward_backward(name, task):
    model = build(name, task, dp=True)
    assert ModuleValidator.validate(model, strict=False) == []
    check_samples_apart(model, torch.as_tensor(batch(task)[0]))  # no false alarm
    x, y = batch(task)
    logits = model(torch.from_numpy(x))
    assert logits.shape == (len(x), SPECS[task][1])
    torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(("name", "task"), CASES)
def test_one_dp_step(name, task):
    torch.manual_seed(0)
    model = build(name, task, dp=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = batch(task)
    loss, spent = train_local(
        model, x, y, epochs=1, batch_size=24, lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0
    )
    assert np.isfinite(loss) and spent.steps == (1,) and spent.noise_multiplier == (1.0,)
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # what a DP client sends back loads into the server's plain model, and back again
    plain = build(name, task, dp=False)
    plain.load_state_dict(after)
    build(name, task, dp=True).load_state_dict(plain.state_dict())


def test_padding_does_not_change_predictions():
    torch.manual_seed(0)
    for name in ("lstm", "transformer"):
        model = build(name, TEXT_CLASSIFICATION, dp=False).eval()
        short = torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
        more = torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0], [9] * 12])
        assert torch.allclose(model(short)[0], model(more)[0], atol=1e-5)


def test_lstm_is_leafs():
    model = build("lstm", NEXT_CHAR, dp=False)
    assert model.inputs.encode.embedding_dim == 8
    assert (model.lstm.hidden_size, model.lstm.num_layers) == (256, 2)
    fast = build("lstm", NEXT_CHAR, dp=True).lstm
    assert type(fast).__name__ == "FastDPLSTM"
    # Opacus's DPLSTM, the reference, shares nn.LSTM's state_dict with the fast layer
    reference = opacus_lstm_layer(8, 256, 2)
    assert type(reference).__name__ == "DPLSTM"
    reference.load_state_dict(fast.state_dict())
    assert set(reference.state_dict()) == set(fast.state_dict())


def test_cnn_sized_by_input():
    for shape in [(1, 8, 8), (1, 28, 28), (3, 32, 32)]:
        model = build_model("cnn", input_shape=shape, num_classes=10, dp=True)
        assert ModuleValidator.validate(model, strict=False) == []
        assert model(torch.zeros(2, *shape)).shape == (2, 10)
    # 28×28: the small tanh CNN of Opacus's MNIST example; 8×8 keeps the default run's model
    mnist = build_model("cnn", input_shape=(1, 28, 28), num_classes=10)
    assert sum(p.numel() for p in mnist.parameters()) == 26_010
    assert any(isinstance(m, torch.nn.Tanh) for m in mnist.modules())
    digits = build_model("cnn", input_shape=(1, 8, 8), num_classes=10)
    assert sum(p.numel() for p in digits.parameters()) == 13_802


def test_fedavg_cnn_is_the_papers():
    # McMahan et al. (2017): 1,663,370 parameters for MNIST
    model = build_model("fedavg-cnn", input_shape=(1, 28, 28), num_classes=10, dp=True)
    assert sum(p.numel() for p in model.parameters()) == 1_663_370
    assert ModuleValidator.validate(model, strict=False) == []
    cifar = build_model("fedavg-cnn", input_shape=(3, 32, 32), num_classes=10)
    assert cifar(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_wrong_pairing_is_one_config_line():
    with pytest.raises(FedsimError, match="model cnn does not support task") as info:
        build("cnn", TEXT_CLASSIFICATION, dp=False)
    assert "\n" not in str(info.value)
    for dataset, data in DATASETS.items():
        for model, part in MODELS.items():
            values = {"model": model, "dataset": dataset}
            if data.tasks[0] in part.tasks:
                parse_config(values)
            else:
                with pytest.raises(FedsimError, match=f"model {model} cannot learn") as info:
                    parse_config(values)
                assert "\n" not in str(info.value)


BROKEN_NETS = """
import torch
from torch import nn


class NoKeywords(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)


class Shapes(nn.Module):
    def __init__(self, *, num_classes, out=None, **_):
        super().__init__()
        self.fc = nn.Linear(64, out or num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


class Raises(Shapes):
    def forward(self, x):
        raise ValueError("a bug of its own")


def wider(**kw):
    return Shapes(**kw, out=7)


def wrong_input(**kw):
    return nn.Sequential(nn.Flatten(), nn.Linear(100, 10))


def pair(**kw):
    return nn.ModuleDict({"fc": nn.Linear(64, 10)})


def frozen(**kw):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).requires_grad_(False)
"""


@pytest.mark.parametrize(
    ("attr", "needle"),
    [
        ("NoKeywords", r"could not be built \(TypeError: .*'input_shape'\); fedsim builds it "
         "with the keywords input_shape, num_classes, task, vocab_size, dp"),
        ("wider", r"returned \(4, 7\) for 4 inputs; .* \(batch, num_classes\) = \(4, 10\)"),
        ("wrong_input", r"failed on 4 of the dataset's inputs, shape \(4, 1, 8, 8\) "
         r"torch.float32 \(RuntimeError: mat1 and mat2"),
        ("Raises", r"\(ValueError: a bug of its own\)"),
        ("pair", r"failed on .*\(NotImplementedError: "),
        ("frozen", "has no trainable parameters"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("dp", ["none", "user", "sample"])
def test_a_model_of_ones_own_that_cannot_train_stops_the_run_in_one_line(
    attr, needle, dp, tmp_path, monkeypatch
):
    (tmp_path / "broken_nets.py").write_text(BROKEN_NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = parse_config({"model": f"broken_nets:{attr}", "dp": dp})
    with pytest.raises(FedsimError, match=needle) as info:
        preflight(config)
    assert "\n" not in str(info.value) and "broken_nets" in str(info.value)
    preflight(config.model_copy(update={"model": "broken_nets:Shapes"}))


@pytest.mark.parametrize("name", ["lstm", "transformer"])
def test_next_char_positions_are_causal(name):
    torch.manual_seed(0)
    model = build(name, NEXT_CHAR, dp=False).eval()
    x, _ = batch(NEXT_CHAR, n=2)
    x = torch.from_numpy(x).clone()
    x[:, 10:] = 3  # no padding in next-char windows
    every = model(x, all_positions=True)
    assert every.shape == (2, VOCAB, 20)
    assert torch.allclose(every[:, :, -1], model(x), atol=1e-5)  # the last is the prediction
    changed = x.clone()
    changed[:, 15] = 7
    # position t only sees positions <= t: what comes later changes nothing before it
    assert torch.allclose(
        model(changed, all_positions=True)[:, :, :15], every[:, :, :15], atol=1e-5
    )


@pytest.mark.parametrize("name", ["lstm", "transformer"])
def test_dp_step_on_every_position(name):
    torch.manual_seed(0)
    model = build(name, NEXT_CHAR, dp=True)
    x, y = batch(NEXT_CHAR)
    x[:] = np.maximum(x, 2)
    loss, spent = train_local(
        model, x, y, epochs=1, batch_size=24, lr=0.1, noise_multiplier=1.0, all_positions=True
    )
    assert np.isfinite(loss) and spent.steps == (1,)


class TiedNet(torch.nn.Module):
    """Two layers share a weight: ``auto`` trains it with ``hooks``."""

    def __init__(self, *, input_shape, num_classes, **_):
        super().__init__()
        width = int(np.prod(input_shape))
        self.flat, self.a = torch.nn.Flatten(), torch.nn.Linear(width, width)
        self.b = torch.nn.Linear(width, width)
        self.b.weight = self.a.weight
        self.head = torch.nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(self.flat(x))))))


class ScaledNet(torch.nn.Module):
    """A parameter of the model's own, which no one-pass rule covers."""

    def __init__(self, *, input_shape, num_classes, **_):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(int(np.prod(input_shape)), num_classes)
        )
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.body(x) * self.scale


@pytest.mark.parametrize(
    ("values", "want"),
    [
        ({}, "fast"),
        ({"grad-sample": "ghost"}, "ghost"),
        ({"model": "tests.test_models:TiedNet"}, "hooks"),
        ({"clients-per-worker": 2}, "cohort, one-pass"),
        ({"clients-per-worker": 2, "model": "lstm"}, "cohort, one-pass"),
        ({"clients-per-worker": 2, "model": "tests.test_models:ScaledNet"}, "cohort, per-sample"),
        ({"dp": "user"}, None),
    ],
)
def test_the_summary_names_how_clients_clip(values, want):
    config = parse_config(values)
    dataset = load_checked(config)
    rng = torch.get_rng_state()
    assert clipping_path(config, dataset) == want
    assert torch.equal(torch.get_rng_state(), rng)  # the run's generator is left alone
