"""The vectorized cohort (fedsim.dp.cohort) against the one-client path, client by client."""

import math

import numpy as np
import pytest
import torch
from opacus.layers import DPGRU, DPLSTM, DPRNN
from torch import nn
from torch.func import vmap

from fedsim.clients.training import train_local
from fedsim.data import NEXT_CHAR
from fedsim.dp import (
    DPRandomness,
    dp_randomness,
    replace_attention,
    seeded_root,
    train_cohort,
    vectorizable,
)
from fedsim.dp.cohort_step import _cross_entropy, functional_per_sample, one_pass_clipped_sum
from fedsim.dp.fast_clip import per_sample_cross_entropy
from fedsim.errors import FedsimError
from fedsim.models import build_model

IMAGE_28 = {"input_shape": (1, 28, 28), "num_classes": 10}
CHARS = {"input_shape": (12,), "num_classes": 20, "task": NEXT_CHAR, "vocab_size": 20}


def images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (rng.normal(size=(n, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, n)) for n in sizes
    ]


def windows(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(1, 20, size=(n, 12)), rng.integers(1, 20, n)) for n in sizes]


def randomness(k, seed=7, secure=False):
    """Client k's streams; call again for an identically seeded, independent copy."""
    return dp_randomness(seeded_root(seed), server_round=1, client=k, device="cpu", secure=secure)


def start_of(name, kwargs, seed=0):
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in build_model(name, **kwargs).state_dict().items()}


def sequential(name, kwargs, start, data, *, secure=False, **train):
    """What workers do today: build the model, load the start, train_local, one by one."""
    out = []
    for k, (x, y) in enumerate(data):
        model = build_model(name, **kwargs, dp=True)
        model.load_state_dict(start)
        loss, _ = train_local(model, x, y, randomness=randomness(k, secure=secure), **train)
        out.append((model.state_dict(), loss))
    return out


def cohort(name, kwargs, start, data, *, rand=None, secure=False, **train):
    rand = rand or [randomness(k, secure=secure) for k in range(len(data))]
    tensors = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in data]
    model = build_model(name, **kwargs)
    return train_cohort(model, [start] * len(data), tensors, randomness=rand, **train)


def max_diff(a, b):
    return max((a[key] - b[key]).abs().max().item() for key in a)


DP = {"epochs": 2, "batch_size": 16, "lr": 0.1, "noise_multiplier": 1.0, "max_grad_norm": 0.5}


@pytest.mark.parametrize(
    ("name", "kwargs", "sizes", "options"),
    [
        ("cnn", IMAGE_28, (37, 64, 100), {"grad_sample": "fast", "momentum": 0.9}),
        ("cnn", IMAGE_28, (37, 64, 100), {"grad_sample": "hooks", "secure": True}),
        ("cnn", IMAGE_28, (37, 64, 100), {"grad_sample": "fast", "proximal_mu": 0.5}),
        ("transformer", IMAGE_28, (20, 33), {"grad_sample": "fast", "momentum": 0.9}),
        ("transformer", CHARS, (20, 33), {"grad_sample": "fast", "all_positions": True}),
        ("lstm", IMAGE_28, (20, 33), {"grad_sample": "fast", "momentum": 0.9}),
        ("lstm", CHARS, (20, 33), {"grad_sample": "fast", "all_positions": True}),
        (f"{__name__}:Encoder", CHARS, (20, 33), {"grad_sample": "fast", "momentum": 0.9}),
        (f"{__name__}:Encoder", CHARS, (20, 33), {"grad_sample": "hooks"}),
        (f"{__name__}:TimeFirstEncoder", CHARS, (20, 33), {"grad_sample": "fast"}),
    ],
)
@pytest.mark.parametrize("clipping", ["one-pass", "per-sample"])
def test_dp_sgd_equals_train_local_client_by_client(name, kwargs, sizes, options, clipping):
    data = windows(sizes) if kwargs is CHARS else images(sizes)
    start = start_of(name, kwargs)
    options = dict(options)
    grad_sample = options.pop("grad_sample")
    train = {**DP, "batch_size": 16 if name == "cnn" else 8, **options}
    want = sequential(name, kwargs, start, data, grad_sample=grad_sample, **train)
    got = cohort(name, kwargs, start, data, clipping=clipping, **train)
    for (state, loss), update in zip(want, got, strict=True):
        assert list(update.state) == list(state)
        assert max_diff(update.state, start) > 0.01  # it trained
        assert max_diff(update.state, state) < 1e-5
        assert update.loss == pytest.approx(loss, rel=1e-5)


class _TiedRnn(nn.Module):
    """Opacus's DPGRU (one weight under two names in its state_dict) and a tied pair."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.gru = DPGRU(6, 8, batch_first=True)
        self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 20)
        self.b.weight = self.a.weight

    def forward(self, x):
        h = self.gru(self.emb(x))[0][:, -1]
        return self.head(torch.tanh(self.b(torch.tanh(self.a(h)))))


def test_tied_weights_train_as_one_weight_as_in_train_local():
    data = windows((20, 33))
    torch.manual_seed(0)
    start = {k: v.clone() for k, v in _TiedRnn().state_dict().items()}
    train = {**DP, "batch_size": 8}
    want = []
    for k, (x, y) in enumerate(data):
        model = _TiedRnn()
        model.load_state_dict(start)
        train_local(model, x, y, randomness=randomness(k), **train)  # auto: hooks (tied)
        want.append(model.state_dict())
    tensors = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in data]
    rand = [randomness(k) for k in range(len(data))]
    got = train_cohort(_TiedRnn(), [start] * 2, tensors, randomness=rand, **train)
    for state, update in zip(want, got, strict=True):
        assert list(update.state) == list(state)
        assert torch.equal(update.state["a.weight"], update.state["b.weight"])
        assert torch.equal(update.state["gru.weight_ih_l0"], update.state["gru.l0.ih.weight"])
        assert max_diff(update.state, start) > 0.01  # it trained
        assert max_diff(update.state, state) < 1e-5


def test_dpgru_trains_in_one_pass_as_in_train_local():
    # its cells' linear layers run at every step: one rule takes their calls together
    data = windows((20, 33))
    torch.manual_seed(0)
    start = {k: v.clone() for k, v in _Gru().state_dict().items()}
    model = _Gru()
    weights = {n: p.detach() for n, p in model.named_parameters()}
    x, y = torch.as_tensor(data[0][0][:1]), torch.as_tensor(data[0][1][:1])
    per_sample = functional_per_sample(model, all_positions=False)
    assert one_pass_clipped_sum(model, per_sample, (weights, {}, x, y), clip=1.0) is not None
    train = {**DP, "batch_size": 8}
    want = []
    for k, (x, y) in enumerate(data):
        model = _Gru()
        model.load_state_dict(start)
        train_local(model, x, y, randomness=randomness(k), grad_sample="fast", **train)
        want.append(model.state_dict())
    tensors = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in data]
    rand = [randomness(k) for k in range(len(data))]
    got = train_cohort(_Gru(), [start] * 2, tensors, randomness=rand, **train)
    for state, update in zip(want, got, strict=True):
        assert torch.equal(update.state["gru.weight_hh_l0"], update.state["gru.l0.hh.weight"])
        assert max_diff(update.state, start) > 0.01  # it trained
        assert max_diff(update.state, state) < 1e-5


def test_plain_sgd_equals_train_local_with_the_same_shuffles():
    # both shuffle with each client's batches generator: the same permutations
    data, start = images((37, 64, 100)), start_of("cnn", IMAGE_28)
    train = {"epochs": 2, "batch_size": 16, "lr": 0.1, "momentum": 0.9}
    want = sequential("cnn", IMAGE_28, start, data, noise_multiplier=None, **train)
    got = cohort("cnn", IMAGE_28, start, data, noise_multiplier=None, **train)
    for (state, loss), update in zip(want, got, strict=True):
        assert max_diff(update.state, state) < 1e-5
        assert update.loss == pytest.approx(loss, rel=1e-5)
    # and the shuffles matter: other seeds, other weights
    rand = [DPRandomness(torch.Generator().manual_seed(9), torch.Generator(), False)] * 3
    other = cohort("cnn", IMAGE_28, start, data, rand=rand, noise_multiplier=None, **train)
    assert max_diff(other[0].state, want[0][0]) > 1e-3


def poisson_sizes(k, n, steps):
    """The batch sizes of client k's Poisson masks, drawn as Opacus's sampler draws them."""
    generator = randomness(k).batches
    return [int((torch.rand(n, generator=generator) < 1 / n).sum()) for _ in range(steps)]


def test_empty_poisson_batches_step_with_noise_only():
    # batch 1 over 3 examples: q = 1/3, 3 steps an epoch, so some batches are empty
    data, start = images((3, 20)), start_of("cnn", IMAGE_28)
    sizes = poisson_sizes(0, 3, steps=9)
    assert 0 in sizes and any(sizes)  # the case is really there
    train = {**DP, "epochs": 3, "batch_size": 1, "noise_multiplier": 2.0}
    want = sequential("cnn", IMAGE_28, start, data, grad_sample="fast", **train)
    got = cohort("cnn", IMAGE_28, start, data, **train)
    for (state, loss), update in zip(want, got, strict=True):
        assert max_diff(update.state, state) < 1e-5
        assert update.loss == pytest.approx(loss, rel=1e-5)


class _OwnLstm(nn.LSTM):
    """A subclass of nn.LSTM: its forward may not be nn.LSTM's, so it is not swapped."""


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Flatten(2), _OwnLstm(28, 8, batch_first=True)),
        nn.Sequential(nn.Flatten(2), nn.LSTM(28, 8, batch_first=True, proj_size=4)),
        nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(10)),
    ],
    ids=["nn.LSTM-subclass", "proj_size", "BatchNorm"],
)
def test_models_it_cannot_vectorize_are_refused_in_one_line(model):
    data = [(torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(FedsimError) as error:
        train_cohort(
            model, [model.state_dict()], data, epochs=1, batch_size=2, lr=0.1,
            noise_multiplier=1.0, randomness=[randomness(0)],
        )  # fmt: skip
    message = str(error.value)
    assert "\n" not in message and type(model[1]).__name__ in message
    assert "clients-per-worker = 1" in message or "GroupNorm" in message


def test_clients_do_not_depend_on_each_other():
    start = start_of("cnn", IMAGE_28)
    base = cohort("cnn", IMAGE_28, start, images((37, 64, 100)), **DP)
    # client 1 gets other data, of another size (another step count and batch widths)
    changed = images((37, 200, 100))
    changed[0], changed[2] = images((37, 64, 100))[0], images((37, 64, 100))[2]
    again = cohort("cnn", IMAGE_28, start, changed, **DP)
    assert max_diff(again[0].state, base[0].state) < 1e-6
    assert max_diff(again[2].state, base[2].state) < 1e-6
    assert max_diff(again[1].state, base[1].state) > 1e-3
    # alone, client 2 trains as in the cohort
    alone = cohort("cnn", IMAGE_28, start, images((37, 64, 100))[2:], rand=[randomness(2)], **DP)
    assert max_diff(alone[0].state, base[2].state) < 1e-6


@pytest.mark.parametrize("secure", [False, True])
def test_noise_is_really_added(secure):
    # n = B: q = 1, one step that takes every example; same masks, different noise
    data, start = images((64,)), start_of("cnn", IMAGE_28)
    train = {
        "epochs": 1,
        "batch_size": 64,
        "lr": 0.5,
        "noise_multiplier": 2.0,
        "max_grad_norm": 1.0,
    }

    def run(noise_seed, sigma=2.0):
        noise = randomness(0, seed=noise_seed, secure=secure)
        rand = [DPRandomness(randomness(0).batches, noise.noise, secure)]
        got = cohort(
            "cnn", IMAGE_28, start, data, rand=rand, **{**train, "noise_multiplier": sigma}
        )
        return torch.cat([p.flatten() for p in got[0].state.values()])

    a, b = run(1), run(2)
    # the clipped gradients are the same and cancel: w_a − w_b = −lr (z_a − z_b) / 64
    expected = 0.5 * 2.0 * 1.0 * math.sqrt(2) / 64
    assert (a - b).std().item() == pytest.approx(expected, rel=0.03)
    assert abs((a - b).mean().item()) < 5 * expected / math.sqrt(len(a))
    assert torch.equal(run(1, sigma=0.0), run(2, sigma=0.0))  # no noise, nothing differs


def test_buffers_and_frozen_weights_are_copied_through():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.frozen = nn.Linear(784, 16).requires_grad_(False)
            self.head = nn.Linear(16, 10)
            self.register_buffer("scale", torch.tensor(0.5))

        def forward(self, x):
            return self.head(torch.tanh(self.frozen(x.flatten(1)) * self.scale))

    model = Scaled()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in images((30, 50))]
    got = train_cohort(model, [start] * 2, tensors, randomness=[randomness(0), randomness(1)], **DP)
    for update in got:
        assert list(update.state) == list(start)
        for key in ("frozen.weight", "frozen.bias", "scale"):
            assert torch.equal(update.state[key], start[key])
        assert max_diff({"w": update.state["head.weight"]}, {"w": start["head.weight"]}) > 1e-3


def test_inputs_are_checked():
    model = build_model("cnn", **IMAGE_28)
    state = model.state_dict()
    data = [(torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long))]
    train = {"epochs": 1, "batch_size": 2, "lr": 0.1, "noise_multiplier": None}
    with pytest.raises(FedsimError, match="one start"):
        train_cohort(model, [state, state], data, **train)
    with pytest.raises(FedsimError, match="need n >= 1"):
        train_cohort(model, [state], [(torch.zeros(0, 1, 28, 28), torch.zeros(0))], **train)
    with pytest.raises(FedsimError, match=r"lacks '0\.bias'"):
        train_cohort(model, [{k: v for k, v in state.items() if k != "0.bias"}], data, **train)


class _Gru(nn.Module):
    """Opacus's DPGRU: its cells' linear layers run at every step (more positions)."""

    def __init__(self, layers=1, rnn=DPGRU, bidirectional=False):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.gru = rnn(6, 8, num_layers=layers, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(16 if bidirectional else 8, 20)

    def forward(self, x, all_positions=False):
        out = self.gru(self.emb(x))[0]  # (B, T, 8)
        return self.head(out).transpose(1, 2) if all_positions else self.head(out[:, -1])


class _SharedLayer(nn.Module):
    """One linear layer applied twice: its two calls' gradients add up before the norm."""

    def __init__(self):
        super().__init__()
        self.flat, self.square = nn.Flatten(), nn.Linear(784, 16)
        self.mid, self.head = nn.Linear(16, 784), nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.square(torch.tanh(self.mid(self.square(self.flat(x))))))


class Encoder(nn.Module):
    """A user's model: torch's TransformerEncoderLayer, with nn.MultiheadAttention inside.

    A cohort runs its attention as fedsim's drop-in (the same keys; one pass clips it),
    whether it is given the plain model or the one built for DP.
    """

    time_first = False

    def __init__(self, *, num_classes=20, dropout=0.0, **_):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout, batch_first=not self.time_first)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x, all_positions=False):
        h = self.emb(x).transpose(0, 1) if self.time_first else self.emb(x)
        out = self.enc(h, src_key_padding_mask=x == 0)
        out = out.transpose(0, 1) if self.time_first else out  # (B, T, 8)
        return self.head(out).transpose(1, 2) if all_positions else self.head(out.mean(1))


class TimeFirstEncoder(Encoder):
    """torch's default layout: the layer takes (T, B, E)."""

    time_first = True


ONE_PASS_MODELS = {  # name: (model, text input?, a loss at every position?)
    "cnn": (lambda: build_model("cnn", **IMAGE_28), False, False),
    "fedavg-cnn": (lambda: build_model("fedavg-cnn", **IMAGE_28), False, False),
    "transformer": (lambda: build_model("transformer", **IMAGE_28), False, False),
    "transformer-chars": (lambda: build_model("transformer", **CHARS), True, True),
    "dpgru-2-layers": (lambda: _Gru(layers=2), True, False),
    "dpgru-chars": (_Gru, True, True),
    "dplstm-bidirectional": (lambda: _Gru(rnn=DPLSTM, bidirectional=True), True, False),
    "dprnn-chars": (lambda: _Gru(rnn=DPRNN), True, True),
    "shared-linear": (_SharedLayer, False, False),
    "encoder-layer": (lambda: vectorizable(Encoder()), True, True),
    "encoder-layer-time-first": (lambda: vectorizable(TimeFirstEncoder()), True, False),
    # the attention swapped by hand: no nn.MultiheadAttention left to show the layer
    "encoder-layer-time-first-drop-in": (
        lambda: vectorizable(replace_attention(TimeFirstEncoder())),
        True,
        False,
    ),
}


@pytest.mark.parametrize("name", ONE_PASS_MODELS)
def test_one_pass_clipping_equals_the_definition(name):
    """vmap over 3 clients of the one-pass clipped sum, against one backward pass per sample."""
    k_clients, batch, clip = 3, 5, 0.5
    torch.manual_seed(0)
    build, text, all_positions = ONE_PASS_MODELS[name]
    model = build().double()
    data = windows([batch] * k_clients) if text else images([batch] * k_clients)
    x = torch.stack([torch.as_tensor(a) for a, _ in data])
    x = x if text else x.double()
    y = torch.stack([torch.as_tensor(b) for _, b in data])
    weights = {
        n: torch.stack([p.detach() + 0.05 * torch.randn_like(p) for _ in range(k_clients)])
        for n, p in model.named_parameters()
    }
    consts = {n: torch.stack([b] * k_clients) for n, b in model.named_buffers()}
    rows = torch.ones(k_clients, batch, dtype=torch.float64)
    rows[0, -2:] = 0  # padding rows count for nothing
    per_sample = functional_per_sample(model, all_positions=all_positions)
    example = ({n: w[0] for n, w in weights.items()}, {n: c[0] for n, c in consts.items()})
    one_pass = one_pass_clipped_sum(model, per_sample, (*example, x[0, :1], y[0, :1]), clip=clip)
    assert one_pass is not None
    with torch.no_grad():
        got, losses = vmap(one_pass)(weights, consts, x, y, rows)
    clipped = 0
    for k in range(k_clients):
        want = {n: torch.zeros_like(w[k]) for n, w in weights.items()}
        for b in range(batch):
            w = {n: t[k].clone().requires_grad_() for n, t in weights.items()}
            c = {n: t[k] for n, t in consts.items()}
            loss = per_sample(w, c, x[k, b : b + 1], y[k, b : b + 1]).sum()
            assert losses[k, b].item() == pytest.approx(loss.item(), rel=1e-12)
            grads = dict(zip(w, torch.autograd.grad(loss, list(w.values())), strict=True))
            norm = torch.sqrt(sum(g.square().sum() for g in grads.values()))
            coef = min(1.0, clip / (norm.item() + 1e-6)) * rows[k, b].item()
            clipped += norm.item() > clip
            for n, g in grads.items():
                want[n] += coef * g
        for n in want:
            assert torch.allclose(got[n][k], want[n], rtol=1e-9, atol=1e-12), (name, n, k)
    assert clipped > 0  # some samples were really clipped


@pytest.mark.parametrize(
    "train",
    [{**DP, "noise_multiplier": 0.0}, {**DP, "noise_multiplier": 0.0, "clipping": "per-sample"},
     {**DP, "noise_multiplier": None}],
    ids=["one-pass", "per-sample", "no-dp"],
)  # fmt: skip
def test_dropout_draws_its_own_masks_per_client(train):
    def model(p):
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.Dropout(p), nn.Linear(32, 10))

    # two clients alike in every way (data, start, streams): only dropout can tell them apart
    data = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in images((40,))] * 2
    start = {k: v.clone() for k, v in model(0.5).state_dict().items()}
    got = train_cohort(
        model(0.5), [start] * 2, data, randomness=[randomness(0), randomness(0)], **train
    )
    assert max_diff(got[0].state, got[1].state) > 1e-4
    without = train_cohort(
        model(0.0), [start] * 2, data, randomness=[randomness(0), randomness(0)], **train
    )
    assert max_diff(without[0].state, without[1].state) == 0
    assert max_diff(got[0].state, without[0].state) > 1e-4
    assert all(torch.isfinite(v).all() for update in got for v in update.state.values())


class _ScaledHead(nn.Module):
    """A trainable layer with no clipping rule of its own (its own ``scale`` parameter)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.body(x) * self.scale


class _ConvTwice(nn.Module):
    """A layer with a rule for one call, not for its calls together, applied twice."""

    def __init__(self):
        super().__init__()
        self.conv, self.flat, self.head = (
            nn.Conv2d(1, 1, 3, padding=1),
            nn.Flatten(),
            nn.Linear(784, 10),
        )

    def forward(self, x):
        return self.head(self.flat(self.conv(torch.tanh(self.conv(x)))))


@pytest.mark.parametrize("model", [_ScaledHead(), _ConvTwice()], ids=["no-rule", "conv-twice"])
def test_layers_without_a_one_pass_rule_fall_back_to_per_sample_gradients(model):
    per_sample = functional_per_sample(model, all_positions=False)
    weights = {n: p.detach() for n, p in model.named_parameters()}
    x, y = torch.randn(1, 1, 28, 28), torch.tensor([3])
    assert one_pass_clipped_sum(model, per_sample, (weights, {}, x, y), clip=1.0) is None
    start = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in images((20, 30))]
    got = train_cohort(model, [start] * 2, tensors, randomness=[randomness(0), randomness(1)], **DP)
    for update in got:
        assert 0 < max_diff(update.state, start) < math.inf


class _InPlaceResidual(nn.Module):
    """``h += block(h)`` changes block's input after block ran."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Sequential(nn.Flatten(), nn.Linear(784, 8))
        self.block, self.head = nn.Linear(8, 8), nn.Linear(8, 10)

    def forward(self, x):
        h = self.inp(x)
        h += self.block(h)
        return self.head(h)


def test_a_layer_input_changed_in_place_is_refused_before_training():
    # its rule would read the changed input: a wrong gradient, silently
    model = _InPlaceResidual()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in images((20,))]
    with pytest.raises(FedsimError, match="modified in place after it ran"):
        train_cohort(model, [start], tensors, randomness=[randomness(0)], **DP)


@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 4)], ids=["one-label", "all-positions"])
def test_the_cohort_s_cross_entropy_is_the_one_client_s_bit_for_bit(shape):
    # the cohort step picks log-softmax at the target (fewer operators under vmap)
    torch.manual_seed(0)
    logits = torch.randn(3, *shape)  # (clients, B, C[, T])
    target = torch.randint(0, shape[1], (3, shape[0], *shape[2:]))
    for loss in (_cross_entropy, per_sample_cross_entropy):
        assert loss(logits[0], target[0]).shape == (shape[0],)
    values = [vmap(f)(logits, target) for f in (_cross_entropy, per_sample_cross_entropy)]
    assert torch.equal(*values)
    grads = [
        vmap(torch.func.grad(lambda z, t, f=f: f(z, t).sum()))(logits, target)
        for f in (_cross_entropy, per_sample_cross_entropy)
    ]
    assert torch.equal(*grads)
