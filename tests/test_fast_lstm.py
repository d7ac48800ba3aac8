"""FastDPLSTM: the same function as nn.LSTM, and the same per-sample gradients as Opacus."""

import pytest
import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.layers import DPLSTM
from opacus.validators import ModuleValidator
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fedsim.dp.fast_lstm import FastDPLSTM
from fedsim.errors import FedsimError

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")
F64 = torch.float64


def twins(bidirectional, batch_first=True, dtype=F64, input_size=5, hidden=7, layers=2, fused=None):
    """An nn.LSTM and a FastDPLSTM with the same weights."""
    ref = nn.LSTM(input_size, hidden, layers, batch_first=batch_first, bidirectional=bidirectional)
    fast = FastDPLSTM(
        input_size,
        hidden,
        layers,
        batch_first=batch_first,
        bidirectional=bidirectional,
        fused=fused,
    )
    fast.load_state_dict(ref.state_dict())
    return ref.to(dtype), fast.to(dtype)


def grads_by_name(module):
    """Parameter gradients under nn.LSTM's names (FastDPLSTM's state-dict names)."""
    return dict(zip(module.state_dict(), (p.grad for p in module.parameters()), strict=True))


def close(a, b, tol=1e-10):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item() <= tol


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_same_function_and_gradients_as_nn_lstm(bidirectional, batch_first, fused):
    torch.manual_seed(0)
    ref, fast = twins(bidirectional, batch_first, fused=fused)
    assert list(fast.state_dict()) == list(ref.state_dict())
    x = torch.randn(4, 6, 5, dtype=F64)
    x = x if batch_first else x.transpose(0, 1).contiguous()
    states = 2 * (2 if bidirectional else 1)
    hx = (torch.randn(states, 4, 7, dtype=F64), torch.randn(states, 4, 7, dtype=F64))
    results = []
    for module in (ref, fast):
        module.flatten_parameters()  # nn.LSTM's, which forwards call: the drop-in takes it
        xi = x.clone().requires_grad_()
        out, (h, c) = module(xi, hx)
        torch.manual_seed(1)  # randn, not randn_like: that follows the output's strides
        weights = torch.randn(out.shape, dtype=F64), torch.randn(h.shape, dtype=F64)
        loss = (out * weights[0]).sum() + (h * weights[1]).sum() + c.sum()
        loss.backward()
        results.append((out, h, c, xi.grad, grads_by_name(module)))
    (o1, h1, c1, gx1, g1), (o2, h2, c2, gx2, g2) = results
    assert all(close(b, a) for a, b in ((o1, o2), (h1, h2), (c1, c2), (gx1, gx2)))
    assert all(close(g2[name], g1[name]) for name in g1)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_padded_and_packed_sequences_like_nn_lstm_packed(bidirectional, fused):
    torch.manual_seed(0)
    ref, fast = twins(bidirectional, fused=fused)
    lengths = torch.tensor([3, 6, 1, 6, 2])
    x = torch.randn(5, 6, 5, dtype=F64)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out_ref, (h_ref, c_ref) = ref(packed)
    out_fast, (h_fast, c_fast) = fast(packed)
    assert torch.equal(out_fast.sorted_indices, out_ref.sorted_indices)
    assert torch.equal(out_fast.batch_sizes, out_ref.batch_sizes)
    assert close(out_fast.data, out_ref.data) and close(h_fast, h_ref) and close(c_fast, c_ref)
    padded_ref, _ = pad_packed_sequence(out_ref, batch_first=True)
    out_len, (h_len, _) = fast(x, lengths=lengths)
    assert close(out_len, padded_ref) and close(h_len, h_ref)
    assert (out_len[2, 1:] == 0).all()  # padded steps output 0, like unpacking does


def test_passes_opacus_module_validator():
    model = nn.Sequential(FastDPLSTM(3, 4, 2, batch_first=True))
    assert ModuleValidator.validate(model, strict=True) == []


class TextModel(nn.Module):
    """Embedding -> LSTM -> sum over time and final state -> classes."""

    def __init__(self, lstm, vocab=11, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, lstm.input_size)
        self.lstm = lstm
        width = lstm.hidden_size * (2 if lstm.bidirectional else 1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x, lengths=None):
        e = self.emb(x)
        if lengths is None:
            out, (h, _) = self.lstm(e)
        else:
            packed = pack_padded_sequence(e, lengths, batch_first=True, enforce_sorted=False)
            out, (h, _) = self.lstm(packed)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return self.fc(out.sum(1)) + h.sum(0)[:, :3]


def text_twins(bidirectional, dtype, fused=None):
    torch.manual_seed(0)
    ref = TextModel(DPLSTM(5, 7, 2, batch_first=True, bidirectional=bidirectional))
    lstm = FastDPLSTM(5, 7, 2, batch_first=True, bidirectional=bidirectional, fused=fused)
    fast = TextModel(lstm)
    # DPLSTM's nested state dict also lists its old names; take the nn.LSTM ones
    fast.load_state_dict({k: v for k, v in ref.state_dict().items() if k in fast.state_dict()})
    return ref.to(dtype), fast.to(dtype)


def named(model):
    """Parameters under nn.LSTM's names (DPLSTM renames its own, FastDPLSTM its state dict)."""
    if isinstance(model.lstm, FastDPLSTM):
        return dict(zip(model.state_dict(), model.parameters(), strict=True))
    return dict(model.named_parameters())


def per_sample(model, x, y, lengths=None):
    """Opacus hooks-mode per-sample gradients, by name."""
    gsm = GradSampleModule(model)
    nn.functional.cross_entropy(gsm(x, lengths), y).backward()
    result = {name: p.grad_sample for name, p in named(model).items()}
    gsm._close()
    return result


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_per_sample_gradients_equal_opacus_dplstm(bidirectional, dtype, tol, fused):
    ref, fast = text_twins(bidirectional, dtype, fused)
    x, y = torch.randint(0, 11, (6, 9)), torch.randint(0, 3, (6,))
    expected, got = per_sample(ref, x, y), per_sample(fast, x, y)
    assert set(got) == set(expected)
    for name in expected:
        assert close(got[name], expected[name], tol), name


def brute_force(model, x, y, lengths):
    """Per-sample gradients by definition: one backward pass per sample."""
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        n = int(lengths[i])
        nn.functional.cross_entropy(
            model(x[i : i + 1, :n], lengths[i : i + 1]), y[i : i + 1]
        ).backward()
        rows.append([p.grad.clone() for p in model.parameters()])
    return [torch.stack(column) for column in zip(*rows, strict=True)]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_variable_length_per_sample_gradients_are_exact(bidirectional, fused):
    # Opacus 1.6's DPLSTM puts unsorted packed sequences' per-sample gradients on the
    # wrong rows, so the reference here is the definition itself
    _, fast = text_twins(bidirectional, F64, fused)
    x, y = torch.randint(0, 11, (6, 9)), torch.randint(0, 3, (6,))
    lengths = torch.tensor([9, 3, 5, 9, 1, 7])
    expected = brute_force(fast, x, y, lengths)
    gsm = GradSampleModule(fast)
    nn.functional.cross_entropy(gsm(x, lengths), y).backward()
    for param, want in zip(fast.parameters(), expected, strict=True):
        assert close(param.grad_sample, want, 1e-10)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("lengths", [None, torch.tensor([9, 3, 5, 9, 1, 7])])
def test_ghost_norms_equal_per_sample_gradient_norms(lengths, fused):
    _, fast = text_twins(True, F64, fused)
    x, y = torch.randint(0, 11, (6, 9)), torch.randint(0, 3, (6,))
    reference = torch.cat([g.reshape(6, -1) for g in per_sample(fast, x, y, lengths).values()], 1)
    ghost = GradSampleModuleFastGradientClipping(fast, max_grad_norm=1.0)
    nn.functional.cross_entropy(ghost(x, lengths), y).backward()
    assert close(ghost.get_norm_sample(), reference.norm(dim=1), 1e-10)


def test_dp_step_through_privacy_engine_counts_steps():
    torch.manual_seed(0)
    model = TextModel(FastDPLSTM(5, 7, 2, batch_first=True))
    data = torch.utils.data.TensorDataset(torch.randint(0, 11, (40, 9)), torch.randint(0, 3, (40,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    engine = PrivacyEngine(accountant="rdp")
    before = [p.detach().clone() for p in model.parameters()]
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    for xb, yb in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    assert engine.accountant.history == [(1.0, 8 / 40, len(loader))]
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_functorch_mode_and_time_first_wrapping_fail_clearly():
    x = torch.randn(4, 9, 5)
    with pytest.raises(FedsimError, match="functorch"):
        GradSampleModule(FastDPLSTM(5, 7, batch_first=True), force_functorch=True)(x)
    gsm = GradSampleModule(FastDPLSTM(5, 7, batch_first=True), batch_first=False)
    with pytest.raises(FedsimError, match="batch_first=True"):
        gsm(x)[0].sum().backward()


def test_bad_lengths_are_rejected():
    lstm = FastDPLSTM(3, 4, batch_first=True)
    with pytest.raises(FedsimError, match="lengths"):
        lstm(torch.randn(2, 5, 3), lengths=torch.tensor([5, 0]))
    with pytest.raises(FedsimError, match="input of shape"):
        lstm(torch.randn(2, 5, 4))


@pytest.mark.parametrize("lengths", [None, torch.tensor([4, 9, 1, 9, 6])])
def test_the_fused_recurrence_runs_the_loops_function(lengths):
    # both ways side by side, on one set of weights: the loop is the reference
    torch.manual_seed(0)
    loop = FastDPLSTM(5, 7, 2, batch_first=True, bidirectional=True, fused=False).to(F64)
    fused = FastDPLSTM(5, 7, 2, batch_first=True, bidirectional=True, fused=True).to(F64)
    fused.load_state_dict(loop.state_dict())
    x = torch.randn(5, 9, 5, dtype=F64)
    hx = (torch.randn(4, 5, 7, dtype=F64), torch.randn(4, 5, 7, dtype=F64))
    results = []
    for module in (loop, fused):
        xi = x.clone().requires_grad_()
        out, (h, c) = module(xi, hx, lengths=lengths)
        torch.manual_seed(1)
        loss = (out * torch.randn(out.shape, dtype=F64)).sum() + (h * c).sum()
        loss.backward()
        results.append([out, h, c, xi.grad, *(p.grad for p in module.parameters())])
    for want, got in zip(*results, strict=True):
        assert close(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (cuDNN's LSTM)")
@pytest.mark.parametrize(("dtype", "tol"), [(F64, 1e-10), (torch.float32, 1e-3)])
def test_on_cuda_the_default_is_cudnn_and_it_runs_the_loops_function(dtype, tol):
    torch.manual_seed(0)
    loop = FastDPLSTM(5, 7, 2, batch_first=True, bidirectional=True, fused=False)
    default = FastDPLSTM(5, 7, 2, batch_first=True, bidirectional=True)
    default.load_state_dict(loop.state_dict())
    x = torch.randn(5, 9, 5, dtype=dtype, device="cuda")
    results = []
    for module in (loop.to("cuda", dtype), default.to("cuda", dtype)):
        out, (h, c) = module(x, lengths=torch.tensor([4, 9, 1, 9, 6]))
        (out.sum() + (h * c).sum()).backward()
        results.append([out, h, *(p.grad for p in module.parameters())])
    for want, got in zip(*results, strict=True):
        assert close(got, want, tol)
