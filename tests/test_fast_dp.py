"""grad-sample 'fast': the same clipped gradients as Opacus, in one backward pass."""

import numpy as np
import pytest
import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.layers import DPGRU, DPRNN
from torch import nn

from fedsim.clients.training import train_local
from fedsim.dp import DPMultiheadAttention, clip_rules, per_sample
from fedsim.dp.fast_clip import FastClipper
from fedsim.dp.fast_lstm import FastDPLSTM
from fedsim.dp.private import make_private
from fedsim.dp.randomness import dp_randomness, seeded_root
from fedsim.dp.schedule import poisson_schedule
from fedsim.errors import FedsimError
from fedsim.models.image import tanh_cnn_28

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")
BATCH = 6


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, dilation=2, groups=2, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 5, 4, stride=2, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(self.conv(x).mean(2))


class TinyTransformer(nn.Module):
    """Embeddings, attention from nn.Linear, LayerNorm; wide and narrow linear layers so
    both the Gram and the per-sample form of the linear rule run."""

    def __init__(self, vocab=11, d=8, steps=9, wide=40):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d, padding_idx=0), nn.Embedding(steps, d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, wide), nn.Linear(wide, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        z = self.emb(x) + self.pos(torch.arange(x.shape[1]).repeat(x.shape[0], 1))
        q, k, v = self.qkv(z).chunk(3, dim=2)
        z = z + self.out(nn.functional.scaled_dot_product_attention(q, k, v))
        z = z + self.down(torch.tanh(self.up(self.norm(z))))
        return self.head(z.sum(1))


class LstmNet(nn.Module):
    def __init__(self, fused=None):
        super().__init__()
        self.emb = nn.Embedding(11, 5)
        self.lstm = FastDPLSTM(5, 7, 2, batch_first=True, bidirectional=True, fused=fused)
        self.fc = nn.Linear(14, 3)

    def forward(self, x, lengths=None):
        out, _ = self.lstm(self.emb(x), lengths=lengths)
        return self.fc(out.sum(1))


class RawParameter(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x):
        return x * self.scale


class Gated(nn.Module):
    """A user's layer: a parameter of its own and a sublayer, differentiated whole."""

    def __init__(self, width):
        super().__init__()
        self.inner, self.gate = nn.Linear(width, width), nn.Parameter(torch.randn(width))

    def forward(self, x):
        return self.inner(x) * torch.sigmoid(self.gate)


class OpacusRnnNet(nn.Module):
    """Opacus's drop-ins for nn.GRU and nn.RNN: cells of RNNLinear, run once a step."""

    def __init__(self, batch_first=True):
        super().__init__()
        self.emb = nn.Embedding(11, 5)
        self.gru = DPGRU(5, 6, 2, batch_first=batch_first, bidirectional=True)
        self.rnn = DPRNN(12, 4, batch_first=batch_first)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if self.rnn.batch_first:
            out, _ = self.rnn(self.gru(self.emb(x))[0])
            return self.fc(out[:, -1])
        out, _ = self.rnn(self.gru(self.emb(x).transpose(0, 1))[0])  # (T, B, .)
        return self.fc(out[-1])


class AttentionNet(nn.Module):
    """fedsim's drop-in for nn.MultiheadAttention: linear projections, cross-attention.

    ``packed``: key and value as wide as the query, so one input projection takes the
    query and the memory side by side; otherwise three projections.
    """

    def __init__(self, packed=False):
        super().__init__()
        width = 8 if packed else 5
        self.emb = nn.Embedding(11, 8)
        self.attn = DPMultiheadAttention(8, 2, kdim=width, vdim=width, batch_first=True)
        if not packed:
            # a key bias's gradient is zero (softmax ignores it): its rounding has no
            # relative error
            self.attn.k_proj = nn.Linear(5, 8, bias=False)
        self.memory = nn.Linear(8, width)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = self.emb(x)
        m = torch.tanh(self.memory(h))
        out, weights = self.attn(h, m, m, key_padding_mask=x == 0)
        return self.fc(out.mean(1)) + weights.sum((1, 2))[:, None]


def custom_layers():
    """Layers no rule knows: PReLU, a bare parameter, a block with a sublayer."""
    return nn.Sequential(
        nn.Linear(6, 8), nn.PReLU(8), Gated(8), nn.Tanh(), RawParameter(8), nn.Linear(8, 3)
    )


CASES = {
    "cnn": (small_cnn, lambda: torch.randn(BATCH, 2, 8, 8)),
    "tanh-cnn-28": (
        lambda: tanh_cnn_28(channels=1, num_classes=10),
        lambda: torch.randn(BATCH, 1, 28, 28),
    ),
    "conv1d": (Conv1dNet, lambda: torch.randn(BATCH, 3, 10)),
    "transformer": (TinyTransformer, lambda: torch.randint(0, 11, (BATCH, 9))),
    "lstm": (LstmNet, lambda: torch.randint(0, 11, (BATCH, 9))),
    "lstm-fused": (lambda: LstmNet(fused=True), lambda: torch.randint(0, 11, (BATCH, 9))),
    "custom-layers": (custom_layers, lambda: torch.randn(BATCH, 6)),
    "opacus-rnns": (OpacusRnnNet, lambda: torch.randint(0, 11, (BATCH, 5))),
    "opacus-rnns-time-first": (
        lambda: OpacusRnnNet(batch_first=False),
        lambda: torch.randint(0, 11, (BATCH, 5)),
    ),
    "attention": (AttentionNet, lambda: torch.randint(1, 11, (BATCH, 6))),
    "attention-packed": (
        lambda: AttentionNet(packed=True),
        lambda: torch.randint(1, 11, (BATCH, 6)),
    ),
}


def opacus_reference(model, x, y):
    """Per-sample gradients from Opacus hooks mode; for the padding row of an embedding,
    PyTorch's gradient (zero) is the definition, which Opacus 1.6 does not follow."""
    gsm = GradSampleModule(model)
    nn.functional.cross_entropy(gsm(x), y).backward()
    grads = [p.grad_sample.clone() for p in model.parameters()]
    gsm._close()
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            index = [p is module.weight for p in model.parameters()].index(True)
            grads[index][:, module.padding_idx] = 0
    return grads


def clipped(grads, max_norm):
    norms = torch.stack([g.reshape(BATCH, -1).norm(dim=1) for g in grads], 1).norm(dim=1)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return norms, [torch.einsum("b,b...->...", coef, g) for g in grads]


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-5), (torch.float32, 1e-4)])
@pytest.mark.parametrize("budget", ["default", 0])  # 0: Gram norms and one GEMM everywhere
def test_norms_and_clipped_sums_equal_opacus(case, dtype, tol, budget, monkeypatch):
    if budget == 0:
        monkeypatch.setattr(per_sample, "PER_SAMPLE_BUDGET", 0)
    make_model, make_x = CASES[case]
    torch.manual_seed(0)
    reference, model = make_model().to(dtype), make_model().to(dtype)
    model.load_state_dict(reference.state_dict())
    x = make_x()
    x = x.to(dtype) if x.is_floating_point() else x
    y = torch.randint(0, 3, (BATCH,))
    grads = opacus_reference(reference, x, y)
    max_norm = float(clipped(grads, 1.0)[0].median())  # some samples clipped, some not
    norms, expected = clipped(grads, max_norm)
    clipper = FastClipper(model, max_grad_norm=max_norm)
    clipper.backward(nn.functional.cross_entropy(model(x), y, reduction="none"))
    assert rel(clipper.per_sample_norms, norms) <= tol
    for param, want in zip(model.parameters(), expected, strict=True):
        assert rel(param.grad, want) <= tol


def cancelling(batch, steps, width, scale, eps):
    """Rows in pairs ``(v, -v + eps w)``: large terms whose sum is small, for sample 0."""
    torch.manual_seed(0)
    x = torch.randn(batch, steps, width)
    base = torch.randn(steps // 2, width) * scale
    x[0, 0::2], x[0, 1::2] = base, -base + eps * torch.randn(steps // 2, width)
    return x


@pytest.mark.parametrize("eps", [1e-3, 1e-4, 1e-5])
def test_cancelling_terms_never_lower_the_norm_used_for_clipping(eps, monkeypatch):
    # float32 Gram sums came out far below the true norm here (16 against 3.2, 0 against 4):
    # such a sample went into the sum unclipped
    monkeypatch.setattr(per_sample, "PER_SAMPLE_BUDGET", 0)  # the Gram form, as at batch 64
    g = cancelling(8, 80, 1024, 100.0, eps)
    a = torch.randn(8, 80, 256)
    a[0, 1::2] = a[0, 0::2] + 1e-3 * torch.randn(40, 256)  # nearly equal inputs, pairwise
    exact = (g[0].double().T @ a[0].double()).norm()
    norms, clip = per_sample.outer_weight(a, g)
    bound = 1e-5 * (g[0].norm(dim=1) * a[0].norm(dim=1)).sum()
    assert exact * (1 - 1e-6) <= norms[0] <= exact + bound
    coef = torch.zeros(8)
    coef[0] = 1 / norms[0].clamp(min=1)
    assert clip(coef).norm() <= 1 + 1e-5
    # the embedding rule: the same token at every position
    emb = nn.Embedding(5, 64)
    g = cancelling(8, 80, 64, 100.0, eps)
    ids = torch.randint(0, 5, (8, 80))
    ids[0] = 3
    exact = g[0].double().sum(0).norm()
    (norms,), _ = clip_rules.embedding_rule(emb, (ids,), g)
    bound = 1e-5 * g[0].norm(dim=1).sum()  # over-clipping only by the rounding bound
    assert exact * (1 - 1e-6) <= norms[0] <= exact + bound


def brute_force_clipped(model, x, y, lengths, max_norm):
    """Clipped sum by definition: one backward pass per sample."""
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        n = int(lengths[i])
        loss = nn.functional.cross_entropy(model(x[i : i + 1, :n]), y[i : i + 1])
        loss.backward()
        rows.append([p.grad.clone() for p in model.parameters()])
    return clipped([torch.stack(c) for c in zip(*rows, strict=True)], max_norm)


def test_variable_length_sequences_match_the_definition():
    torch.manual_seed(0)
    model = LstmNet().double()
    x, y = torch.randint(0, 11, (BATCH, 9)), torch.randint(0, 3, (BATCH,))
    lengths = torch.tensor([9, 3, 5, 9, 1, 7])
    norms, expected = brute_force_clipped(model, x, y, lengths, 0.5)
    model.zero_grad(set_to_none=True)
    clipper = FastClipper(model, max_grad_norm=0.5)
    clipper.backward(nn.functional.cross_entropy(model(x, lengths), y, reduction="none"))
    assert rel(clipper.per_sample_norms, norms) <= 1e-10
    for param, want in zip(model.parameters(), expected, strict=True):
        assert rel(param.grad, want) <= 1e-10


def digits_like(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 2, 8, 8)).astype(np.float32), rng.integers(0, 3, n)


@pytest.mark.parametrize("grad_sample", ["fast", "ghost"])
def test_training_without_noise_equals_opacus_hooks(grad_sample):
    # same Poisson batches (same seed), σ = 0: every mode must take the same steps
    x, y = digits_like()
    results = {}
    for mode in ("hooks", grad_sample):
        torch.manual_seed(0)
        model = small_cnn()
        _, spent = train_local(
            model,
            x,
            y,
            epochs=2,
            batch_size=16,
            lr=0.5,
            noise_multiplier=0.0,
            max_grad_norm=0.1,
            grad_sample=mode,
            randomness=seeded_randomness(),
        )
        results[mode] = (torch.cat([p.detach().flatten() for p in model.parameters()]), spent)
    (a, spent_a), (b, spent_b) = results["hooks"], results[grad_sample]
    assert spent_a == spent_b and spent_a.steps == (8,)
    assert rel(b, a) <= 1e-5


def seeded_randomness(seed=1):
    return dp_randomness(seeded_root(seed), server_round=1, client=0, device="cpu", secure=False)


def test_fast_dp_step_adds_noise_and_counts_steps():
    x, y = digits_like()
    engine = PrivacyEngine(accountant="rdp")
    data = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    model = small_cnn()
    before = [p.detach().clone() for p in model.parameters()]
    private = make_private(
        engine,
        grad_sample="fast",
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        dataset=data,
        schedule=poisson_schedule(len(y), batch_size=20, epochs=1),
        noise_multiplier=50.0,
        max_grad_norm=1.0,
        randomness=seeded_randomness(),
    )
    for xb, yb in private.data_loader:
        private.optimizer.zero_grad()
        private.criterion(model(xb), yb).backward()
        private.optimizer.step()
    private.close()
    assert engine.accountant.history == [(50.0, 1 / 3, 3)]
    moved = torch.cat(
        [(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)]
    )
    assert moved.norm() > 1.0  # σ C / B = 2.5 per coordinate: noise, not the gradient
    assert not model._forward_hooks and not model[0]._forward_hooks


class SharedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.fc(x))


class LstmTwice(nn.Module):
    """FastDPLSTM's gates see a whole sequence in one call: a second call is refused."""

    def __init__(self):
        super().__init__()
        self.lstm = FastDPLSTM(4, 4, batch_first=True)

    def forward(self, x):
        once, _ = self.lstm(x.unsqueeze(1))
        return self.lstm(once)[0]


class Recurrent(nn.Module):
    """Layers run again and again: a cell over time steps, a block applied twice."""

    def __init__(self):
        super().__init__()
        self.cell, self.norm = nn.Linear(6, 3), nn.LayerNorm(3)
        self.conv, self.head = nn.Conv1d(1, 1, 3, padding=1), nn.Linear(3, 3)

    def forward(self, x):  # (B, 4, 3): 4 steps of 3 features
        h = torch.zeros(len(x), 3, dtype=x.dtype)
        for t in range(x.shape[1]):
            h = torch.tanh(self.norm(self.cell(torch.cat([x[:, t], h], 1))))
        h = self.conv(self.conv(h.unsqueeze(1))).squeeze(1)
        return self.head(h)


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x).relu_()


class InPlaceInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = self.first(x) * 1.0  # only the second layer's input: autograd saves nothing of it
        out = self.second(h)
        h.mul_(2)  # what the second layer's rule would read is no longer its input
        return out


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(5, 4), nn.Linear(4, 5, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(self.emb(x))


@pytest.mark.parametrize(
    ("module", "needle"),
    [(LstmTwice(), "LSTMGates ran twice"), (InPlace(), "in place"), (InPlaceInput(), "in place")],
)
def test_unsupported_forward_passes_fail_clearly(module, needle):
    clipper = FastClipper(module, max_grad_norm=1.0)
    with pytest.raises(FedsimError, match=needle):
        clipper.backward(module(torch.randn(3, 4)).flatten(1).sum(1))


def test_tied_weights_and_unknown_modes_fail_before_training():
    with pytest.raises(FedsimError, match="tied weights"):
        FastClipper(Tied(), max_grad_norm=1.0)
    with pytest.raises(FedsimError, match="grad-sample must be auto or one of"):
        make_private(
            PrivacyEngine(),
            grad_sample="slow",
            module=nn.Linear(2, 2),
            optimizer=None,
            dataset=None,
            schedule=None,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            randomness=None,
        )


def test_bench_prints_a_table(capsys):
    from experiments.research import bench

    bench.main(["--repeats", "1", "--models", "project-cnn"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split("|") for line in lines if line.startswith("| project-cnn")]
    assert [row[3].strip() for row in rows] == ["none", "hooks", "ghost", "fast"]
    ops = {row[3].strip(): int(row[8]) for row in rows}  # operator calls that compute
    assert ops["none"] < ops["fast"] < ops["hooks"]


def test_bench_graphs_times_the_eager_step_on_a_cpu(capsys):
    from experiments.research import bench_graphs

    bench_graphs.main(
        ["--device", "cpu", "--repeats", "1", "--batch", "4", "--models", "project-cnn"]
    )
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()]
    rows = [row for row in rows if len(row) > 4 and row[1] == " project-cnn "]
    assert [row[3].strip() for row in rows] == ["no", "yes"]
    assert all(float(row[4]) > 0 and row[5].strip() == "" for row in rows)  # no graphs on a CPU


class Mixer(nn.Module):
    """No rule: a buffer, and a second positional input that every sample shares."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4) / 2)
        self.register_buffer("offset", torch.linspace(-1, 1, 4))

    def forward(self, x, scale):
        return torch.tanh(x @ self.weight + self.offset) * scale


class KeywordOnly(Mixer):
    def forward(self, x, *, scale):
        return super().forward(x, scale)


class MixerNet(nn.Module):
    def __init__(self, scale="shared"):
        super().__init__()
        self.mix = KeywordOnly() if scale == "keyword-only" else Mixer()
        self.head, self.scale = nn.Linear(4, 3), scale

    def forward(self, x):
        if self.scale == "per-sample":  # (B, 1): per sample, though not the first input
            return self.head(self.mix(x, x[:, :1].exp()))
        scale = torch.linspace(0.5, 2.0, 4)
        keyword = self.scale in ("keyword", "keyword-only")
        mixed = self.mix(x, scale=scale) if keyword else self.mix(x, scale)
        return self.head(mixed)


class ThreeOut(nn.Module):
    """No rule, three outputs: the model uses two (one through a tuple), not the third."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4) / 2)

    def forward(self, x):
        h = x @ self.weight
        return torch.tanh(h), [h.square().mean(1, keepdim=True), h.exp()]


class ThreeOutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = ThreeOut(), nn.Linear(5, 3)

    def forward(self, x):
        out, (energy, _) = self.body(x)
        return self.head(torch.cat([out, energy], 1))


def definition(model, x, y):
    """Per-sample norms and the clipped sum at their median, one backward pass a sample."""
    params = list(model.parameters())
    per_sample = []
    for b in range(len(x)):
        loss = nn.functional.cross_entropy(model(x[b : b + 1]), y[b : b + 1])
        per_sample.append(torch.autograd.grad(loss, params))
    norms = torch.stack([torch.sqrt(sum(g.square().sum() for g in gs)) for gs in per_sample])
    clip = float(norms.median())
    coefs = (clip / (norms + 1e-6)).clamp(max=1.0)
    want = [
        sum(c * gs[i] for c, gs in zip(coefs, per_sample, strict=True)) for i in range(len(params))
    ]
    return norms, clip, want


def clips_as_the_definition(model, x, y):
    """fast's norms and clipped sum equal :func:`definition`'s, to rtol 1e-10 (float64)."""
    norms, clip, want = definition(model, x, y)
    clipper = FastClipper(model, max_grad_norm=clip)
    clipper.backward(nn.functional.cross_entropy(model(x), y, reduction="none"))
    assert torch.allclose(clipper.per_sample_norms, norms, rtol=1e-10)
    for param, expected in zip(model.parameters(), want, strict=True):
        assert torch.allclose(param.grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (MixerNet, (BATCH, 4)),
        (lambda: MixerNet("keyword"), (BATCH, 4)),  # called as the rule calls it: positionally
        (ThreeOutNet, (BATCH, 4)),
        (Recurrent, (BATCH, 4, 3)),
        (SharedLayer, (BATCH, 4)),
    ],
    ids=["mixer", "mixer-keyword", "three-outputs", "recurrent", "shared-layer"],
)
def test_layers_without_a_rule_or_run_repeatedly_clip_as_the_definition(make, shape):
    """A layer without a rule (a buffer, a shared second input), and layers that run
    several times in one forward pass, against one backward pass per sample."""
    torch.manual_seed(0)
    model, x = make().double(), torch.randn(*shape).double()
    y = torch.randint(0, min(3, model(x).shape[1]), (BATCH,))
    clips_as_the_definition(model, x, y)


class Bags(nn.Module):
    """nn.EmbeddingBag on (B, L) ids, whose Opacus grad sampler wants offsets."""

    def __init__(self, mode):
        super().__init__()
        self.bag = nn.EmbeddingBag(7, 4, mode=mode, padding_idx=0 if mode == "mean" else None)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.bag(x))


@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_embedding_bags_clip_as_the_definition(mode):
    torch.manual_seed(0)
    model = Bags(mode).double()
    x = torch.randint(0, 7, (BATCH, 5))
    x[0] = torch.tensor([3, 3, 0, 0, 5])  # a repeated id, and padding (left out of the mean)
    y = torch.randint(0, 3, (BATCH,))
    clips_as_the_definition(model, x, y)


@pytest.mark.parametrize(
    ("scale", "needle"),
    [
        ("per-sample", r"returned shapes \[\(6, 4\)\], not \[\(1, 4\)\]"),
        ("keyword-only", r"takes keyword-only arguments \(scale\)"),
    ],
)
def test_a_layer_without_a_rule_gets_one_tensor_per_sample(scale, needle):
    model = MixerNet(scale)
    clipper = FastClipper(model, max_grad_norm=1.0)
    with pytest.raises(FedsimError, match=needle):
        clipper.backward(model(torch.randn(BATCH, 4)).sum(1))


def test_time_first_opacus_rnns_clip_as_the_definition():
    """Their containers run (T, B, .), their cells (B, .): every sample's norm is its own."""
    torch.manual_seed(0)
    model, x = OpacusRnnNet(batch_first=False).double(), torch.randint(0, 11, (BATCH, 5))
    clips_as_the_definition(model, x, torch.randint(0, 3, (BATCH,)))
