"""fedsim.dp.recurrent: recurrent layers swapped for DP-SGD or a cohort compute the same."""

import copy

import numpy as np
import pytest
import torch
from opacus.layers import DPGRU, DPLSTM, DPRNN
from torch import nn

from fedsim.clients.training import train_local
from fedsim.dp import (
    FastDPLSTM,
    check_cohort_step,
    dp_randomness,
    dp_recurrent,
    seeded_root,
    train_cohort,
    vectorizable,
)
from fedsim.errors import FedsimError

LAYERS = {  # name: (layer, what a cohort runs, what DP-SGD runs)
    "FastDPLSTM": (lambda: FastDPLSTM(5, 7, 2, batch_first=True), DPLSTM, FastDPLSTM),
    "nn.LSTM-bidirectional": (
        lambda: nn.LSTM(5, 7, 2, batch_first=True, bidirectional=True),
        DPLSTM,
        FastDPLSTM,
    ),
    "nn.GRU": (lambda: nn.GRU(5, 7, batch_first=True, bias=False), DPGRU, DPGRU),
    "nn.RNN-relu": (
        lambda: nn.RNN(5, 7, 2, nonlinearity="relu", batch_first=True),
        DPRNN,
        DPRNN,
    ),
    "nn.LSTM-time-first-float64": (lambda: nn.LSTM(5, 7).double(), DPLSTM, FastDPLSTM),
}
SWAPS = {  # a copy for a cohort; in place for DP-SGD
    "cohort": vectorizable,
    "dp": lambda model: dp_recurrent(copy.deepcopy(model)),
}


class _Net(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn, self.head = rnn, nn.LazyLinear(3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out)


@pytest.mark.parametrize("swap", SWAPS)
@pytest.mark.parametrize("name", LAYERS)
def test_a_swapped_layer_computes_the_same_with_the_same_keys(name, swap):
    build, for_cohort, for_dp = LAYERS[name]
    kind = for_cohort if swap == "cohort" else for_dp
    torch.manual_seed(0)
    model = _Net(build())
    model.rnn.get_parameter(next(n for n, _ in model.rnn.named_parameters())).requires_grad_(False)
    dtype = next(model.rnn.parameters()).dtype
    x = torch.randn(3, 4, 5, dtype=dtype)
    model.head = model.head.to(dtype)
    want = model(x)
    swapped = SWAPS[swap](model)
    assert type(swapped.rnn) is kind and swapped.rnn is not model.rnn
    got = swapped(x)
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
    assert set(swapped.state_dict()) == set(model.state_dict())
    assert all(torch.equal(swapped.state_dict()[k], v) for k, v in model.state_dict().items())
    frozen = {k for k, v in model.state_dict(keep_vars=True).items() if not v.requires_grad}
    assert frozen == {
        k for k, v in swapped.state_dict(keep_vars=True).items() if not v.requires_grad
    }
    assert len(frozen) == 1


def test_a_model_without_recurrent_layers_is_itself():
    model = nn.Sequential(nn.Linear(3, 3))
    assert vectorizable(model) is model


def test_a_projected_lstm_is_refused_in_one_line():
    with pytest.raises(FedsimError, match=r"proj_size.*clients-per-worker = 1"):
        vectorizable(_Net(nn.LSTM(5, 7, proj_size=3)))


class _GruNet(nn.Module):
    """A user's own GRU over characters, trained without DP (nn.GRU, cuDNN's kernel)."""

    def __init__(self):
        super().__init__()
        self.emb, self.gru, self.head = (
            nn.Embedding(20, 6),
            nn.GRU(6, 8, batch_first=True),
            nn.Linear(8, 20),
        )

    def forward(self, x):
        return self.head(self.gru(self.emb(x))[0][:, -1])


def test_a_cohort_trains_an_nn_gru_as_train_local_does():
    rng = np.random.default_rng(0)
    data = [(rng.integers(1, 20, size=(n, 12)), rng.integers(1, 20, n)) for n in (20, 33)]
    torch.manual_seed(0)
    start = {k: v.clone() for k, v in _GruNet().state_dict().items()}
    train = {"epochs": 2, "batch_size": 8, "lr": 0.5, "noise_multiplier": None}

    def rand(k):
        return dp_randomness(seeded_root(7), server_round=1, client=k, device="cpu", secure=False)

    want = []
    for k, (x, y) in enumerate(data):
        model = _GruNet()
        model.load_state_dict(start)
        train_local(model, x, y, randomness=rand(k), **train)
        want.append(model.state_dict())
    tensors = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in data]
    got = train_cohort(_GruNet(), [start] * 2, tensors, randomness=[rand(0), rand(1)], **train)
    for state, update in zip(want, got, strict=True):
        assert list(update.state) == list(state)
        assert max((update.state[k] - start[k]).abs().max() for k in start) > 0.01  # it trained
        assert max((update.state[k] - state[k]).abs().max() for k in start) < 1e-5


class _Lengths(nn.Module):
    """FastDPLSTM called with ``lengths``, which Opacus's DPLSTM does not take."""

    def __init__(self):
        super().__init__()
        self.lstm, self.head = FastDPLSTM(6, 8, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        lengths = torch.full((len(x),), x.shape[1])
        return self.head(self.lstm(x, lengths=lengths)[0][:, -1])


def test_a_call_the_swapped_layer_cannot_take_is_refused_before_training():
    x, y = torch.randn(4, 5, 6), torch.zeros(4, dtype=torch.long)
    with pytest.raises(FedsimError, match=r"cannot be trained as a vectorized cohort \(.*lengths"):
        check_cohort_step(_Lengths(), x, y, dp=True)


class _Flattening(nn.Module):
    """A forward that calls nn.LSTM's flatten_parameters, as many scripts do."""

    def __init__(self):
        super().__init__()
        self.lstm, self.head = nn.LSTM(6, 8, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        self.lstm.flatten_parameters()
        return self.head(self.lstm(x)[0][:, -1])


def test_a_forward_may_flatten_the_swapped_layer_s_parameters():
    x, y = torch.randn(4, 5, 6), torch.zeros(4, dtype=torch.long)
    check_cohort_step(_Flattening(), x, y, dp=False)  # was: AttributeError, an internal error
    model = _Flattening()
    assert torch.allclose(vectorizable(model)(x), model(x), atol=1e-6)


class _OwnGru(nn.GRU):
    """A subclass: its forward may not be nn.GRU's."""


def test_layers_no_equivalent_can_replace_stay_for_the_checks_to_refuse():
    projected, own = nn.LSTM(5, 7, proj_size=3), _OwnGru(5, 7)
    model = dp_recurrent(nn.ModuleList([projected, own, nn.GRU(5, 7)]))
    assert model[0] is projected and model[1] is own and type(model[2]) is DPGRU
