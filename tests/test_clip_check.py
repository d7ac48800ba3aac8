"""The check before any round that the configured grad-sample mode can train a model, and
``auto``'s choice of mode."""

import pytest
import torch
from opacus.layers import DPGRU, DPLSTM, DPRNN, DPMultiheadAttention
from torch import nn

import fedsim.dp
from fedsim.clients.training import train_local
from fedsim.config import parse_config
from fedsim.dp import (
    FastDPLSTM,
    check_clip_bound,
    check_clippable,
    check_cohort_step,
    choose_grad_sample,
    clip_rules,
    cohort_step,
    fast_clip,
)
from fedsim.errors import FedsimError
from fedsim.experiments.run import preflight
from fedsim.models import build_model
from fedsim.registry import IMAGE, NEXT_CHAR, TEXT_CLASSIFICATION

# its own generator: drawn from the global one, X depended on what ran before the import
X, Y = torch.randn(4, 6, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 1])


class Recurrent(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.rnn, self.head = layer, nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.rnn(x.view(4, 2, 3))[0][:, -1])


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.head = nn.MultiheadAttention(3, 1, batch_first=True), nn.Linear(3, 3)

    def forward(self, x):
        z = x.view(4, 2, 3)
        return self.head(self.attn(z, z, z)[0].mean(1))


class Buffered(nn.Module):
    """No rule, and a buffer: Opacus's functorch refuses it, fast differentiates it."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 3))
        self.register_buffer("offset", torch.ones(3))

    def forward(self, x):
        return x @ self.weight + self.offset


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        (Recurrent(nn.LSTM(3, 8, batch_first=True)), r"'rnn' is an nn.LSTM.*fedsim.dp.FastDPLSTM"),
        (Recurrent(nn.GRU(3, 8, batch_first=True)), r"'rnn' is an nn.GRU.*opacus.layers.DPGRU"),
        (Attention(), r"'attn' is an nn.MultiheadAttention.*DPMultiheadAttention"),
        (nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)), "BatchNorm"),
    ],
)
def test_layers_opacus_cannot_sample_are_refused_with_their_drop_in(model, needle):
    for mode in ("fast", "hooks"):
        with pytest.raises(FedsimError, match=needle):
            check_clippable(model, X, Y, grad_sample=mode)


def tied():
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
    model[2].weight = model[0].weight
    return model


def test_each_mode_is_tried_on_the_model():
    with pytest.raises(FedsimError, match=r"^model Sequential: .*tied weights.*'hooks'$"):
        check_clippable(tied(), X, Y, grad_sample="fast")
    check_clippable(tied(), X, Y, grad_sample="hooks")
    check_clippable(tied(), X, Y, grad_sample="auto")


class Bag(nn.Module):
    """Opacus's EmbeddingBag rule wants 1-D ids with offsets; fast's takes (B, T) ids."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.EmbeddingBag(20, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.emb(x))


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_mode_that_fails_names_only_the_modes_that_run(mode, monkeypatch):
    ids, labels = torch.randint(0, 20, (4, 7)), torch.randint(0, 3, (4,))
    needle = rf"^model Bag cannot be trained with grad-sample '{mode}' .*; grad-sample fast can"
    with pytest.raises(FedsimError, match=needle):
        check_clippable(Bag(), ids, labels, grad_sample=mode)
    check_clippable(Bag(), ids, labels, grad_sample="fast")
    # where no mode runs, none is offered
    monkeypatch.setattr(fedsim.dp.clip_check, "fast_step", _raises)
    with pytest.raises(FedsimError, match="no other grad-sample mode can train it either"):
        check_clippable(Bag(), ids, labels, grad_sample=mode)


def _raises(*args, **kwargs):
    raise RuntimeError("no rule")


def test_auto_is_fast_but_hooks_for_tied_weights():
    assert choose_grad_sample("auto", tied()) == "hooks"
    assert choose_grad_sample("auto", nn.Sequential(nn.Linear(6, 3), nn.PReLU())) == "fast"
    for name in ("cnn", "fedavg-cnn", "lstm", "transformer"):
        model = build_model(name, input_shape=(1, 28, 28), num_classes=3, dp=True)
        assert choose_grad_sample("auto", model) == "fast"
    assert choose_grad_sample("hooks", tied()) == "hooks"  # an exact mode stays as asked
    with pytest.raises(FedsimError, match="grad-sample must be auto or one of fast, hooks"):
        choose_grad_sample("slow", tied())
    # by default a client trains the tied model, with Opacus's hooks: each layer's share
    # of the parameter's per-sample gradient added up before clipping
    x, y = torch.randn(40, 6), torch.randint(0, 6, (40,))
    _, spent = train_local(tied(), x, y, epochs=1, batch_size=8, lr=0.1, noise_multiplier=1.0)
    assert spent.steps == (5,)


@pytest.mark.parametrize("mode", ["fast", "hooks", "ghost"])
def test_layers_with_parameters_and_buffers_are_refused(mode):
    needle = r"layer '' \(Buffered\) has trainable parameters and buffers"
    with pytest.raises(FedsimError, match=needle):
        check_clippable(Buffered(), X, Y, grad_sample=mode)


def test_fast_sums_that_are_not_the_gradient_are_refused(monkeypatch):
    def off(layer, inputs, grad):
        norms, clip = clip_rules.linear_rule(layer, inputs, grad)
        return norms, lambda coef: {p: 1.01 * g for p, g in clip(coef).items()}

    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    check_clippable(model, X, Y, grad_sample="fast")
    monkeypatch.setitem(clip_rules.RULES, nn.Linear, off)
    with pytest.raises(FedsimError, match=r"per-sample gradients of '0\.weight' do not add up"):
        check_clippable(model, X, Y, grad_sample="fast")


@pytest.mark.parametrize("mode", ["fast", "hooks", "ghost"])
@pytest.mark.parametrize(
    ("name", "task"),
    [
        ("cnn", IMAGE),
        ("fedavg-cnn", IMAGE),
        ("lstm", IMAGE),
        ("transformer", IMAGE),
        ("lstm", NEXT_CHAR),
        ("transformer", NEXT_CHAR),
        ("transformer", TEXT_CLASSIFICATION),
    ],
)
def test_every_built_in_model_takes_a_step_in_every_mode(name, task, mode):
    """Opacus's ghost clipping once failed on the Transformer's position ids (a view)."""
    torch.manual_seed(0)
    image = task == IMAGE
    x = torch.randn(4, 1, 28, 28) if image else torch.randint(1, 9, (4, 12))
    model = build_model(
        name, input_shape=tuple(x.shape[1:]), num_classes=3, task=task, vocab_size=9, dp=True
    )
    check_clippable(model, x, Y, grad_sample=mode)


class DropIn(nn.Module):
    """A text model around one of the drop-ins that the refusals of nn.GRU etc. name."""

    def __init__(self, kind):
        super().__init__()
        self.kind, self.emb = kind, nn.Embedding(9, 8)
        if kind == "attention":  # fedsim's: Opacus's permutes its output when batch-first
            self.layer = fedsim.dp.DPMultiheadAttention(8, 2, dropout=0.1, batch_first=True)
        else:
            rnn = {"gru": DPGRU, "rnn": DPRNN, "opacus-lstm": DPLSTM, "lstm": FastDPLSTM}[kind]
            self.layer = rnn(8, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.emb(x)
        if self.kind == "attention":  # its key bias has a zero gradient: softmax ignores it
            return self.head(self.layer(h, h, h, need_weights=False)[0].mean(1))
        return self.head(self.layer(h)[0][:, -1])


@pytest.mark.parametrize("mode", ["fast", "hooks", "ghost"])
@pytest.mark.parametrize("kind", ["gru", "rnn", "opacus-lstm", "lstm", "attention"])
def test_the_drop_ins_that_refusals_name_take_a_step_in_every_mode(kind, mode):
    # fast once took DPGRU for a layer of its own (it holds its cells' weights) and refused
    # it, and once refused attention, whose key bias holds only rounding error
    torch.manual_seed(0)
    check_clippable(DropIn(kind), torch.randint(1, 9, (4, 12)), Y, grad_sample=mode)


def test_opacus_attention_batch_first_is_refused():
    model = DropIn("attention")
    model.layer = DPMultiheadAttention(8, 2, batch_first=True)
    needle = r"Opacus's DPMultiheadAttention with batch_first=True, .* permutes positions"
    with pytest.raises(FedsimError, match=needle):
        check_clippable(model, torch.randint(1, 9, (4, 12)), Y, grad_sample="hooks")


class Tracker(nn.Module):
    """No parameters, but a running mean of its inputs: data the noise never covers."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(6))

    def forward(self, x):
        if self.training:
            self.mean.mul_(0.9).add_(0.1 * x.detach().mean(0))
        return x


@pytest.mark.parametrize("mode", ["fast", "hooks", "ghost"])
def test_a_buffer_that_learns_from_the_data_is_refused(mode):
    model = nn.Sequential(Tracker(), nn.Linear(6, 3))
    with pytest.raises(FedsimError, match=r"buffer '0\.mean' changed in a training step"):
        check_clippable(model, X, Y, grad_sample=mode)


@pytest.mark.parametrize("dp", [True, False])
def test_a_cohort_refuses_what_vmap_cannot_run_before_any_round(dp):
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    check_cohort_step(model, X, Y, dp=dp)
    with pytest.raises(
        FedsimError,
        match=r"^model Sequential cannot be trained as a vectorized "
        r"cohort \(.*in-place.*\); set clients-per-worker = 1$",
    ):
        check_cohort_step(nn.Sequential(Tracker(), nn.Linear(6, 3)), X, Y, dp=dp)


USER_NETS = """
import torch
from torch import nn


class Recurrent(nn.Module):
    tasks = ("image",)

    def __init__(self, *, input_shape, num_classes, proj_size=0, **_):
        super().__init__()
        self.rnn = nn.LSTM(input_shape[-1], 8, batch_first=True, proj_size=proj_size)
        self.head = nn.Linear(proj_size or 8, num_classes)

    def forward(self, x):
        return self.head(self.rnn(x.flatten(1, 2))[0][:, -1])


def projected(**kwargs):
    return Recurrent(**kwargs, proj_size=4)


class Tied(nn.Module):
    tasks = ("image",)

    def __init__(self, *, input_shape, num_classes, **_):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, num_classes)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x.flatten(1))))))
"""


def test_a_run_stops_before_any_work_where_its_mode_cannot_train_the_model(tmp_path, monkeypatch):
    (tmp_path / "usernets.py").write_text(USER_NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    preflight(parse_config({"model": "usernets:Recurrent"}))  # trains as FastDPLSTM
    config = parse_config({"model": "usernets:projected"})
    with pytest.raises(FedsimError, match=r"'rnn' is an nn\.LSTM with proj_size, .*nn\.Linear"):
        preflight(config)
    preflight(config.model_copy(update={"dp": "none"}))  # nothing to clip
    tied = parse_config({"model": "usernets:Tied"})
    preflight(tied)  # auto: hooks
    with pytest.raises(FedsimError, match=r"^model Tied: grad-sample 'fast' .*\(tied weights\)"):
        preflight(tied.model_copy(update={"grad_sample": "fast"}))


class Reuse(nn.Module):
    """A weight used by its own layer and, by plain code, outside it."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.a(x * 1e-3) + 10 * torch.tanh(x @ self.a.weight.t()))


@pytest.mark.parametrize(
    ("mode", "needle"),
    [
        ("fast", r"per-sample gradients of 'a\.weight' do not add up"),
        # 1.5-1.95 × for most inputs, 2 × where ghost's norm of the sample falls within C
        ("ghost", r"'ghost' clipped one sample's gradient to (1\.\d+|2) × the norm bound, more"),
    ],
)
def test_a_weight_used_outside_its_layer_is_refused_where_it_would_escape_the_bound(mode, needle):
    """Ghost's per-layer norm misses the outside part of the gradient (1.5 × C here).
    Opacus's hooks and the cohort's rules drop that part instead: within the bound."""
    torch.manual_seed(0)
    with pytest.raises(FedsimError, match=r"^model Reuse: .*" + needle):
        check_clippable(Reuse(), X, Y, grad_sample=mode)
    check_clippable(Reuse(), X, Y, grad_sample="hooks")
    check_cohort_step(Reuse(), X, Y, dp=True)


def test_ghost_is_refused_for_tied_weights_which_it_would_under_clip():
    with pytest.raises(FedsimError, match=r"'ghost' cannot clip .*tied weights.*use 'hooks'"):
        choose_grad_sample("ghost", tied())
    with pytest.raises(FedsimError, match=r"^model Sequential: grad-sample 'ghost' cannot clip"):
        check_clippable(tied(), X, Y, grad_sample="ghost")


def test_one_sample_s_clipped_gradient_is_checked_against_its_definition(monkeypatch):
    """A mode whose clipping lets one sample past the bound is refused before any round."""
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    check_clip_bound(model, X, Y, grad_sample="fast")
    real = fast_clip.FastClipper.backward

    def lenient(self, losses):  # clips to 1.01 × the bound
        self.max_grad_norm *= 1.01
        return real(self, losses)

    monkeypatch.setattr(fast_clip.FastClipper, "backward", lenient)
    with pytest.raises(FedsimError, match=r"'fast' clipped one sample's gradient to 1\.01 ×"):
        check_clip_bound(model, X, Y, grad_sample="fast")


class Embedded(nn.Module):
    def __init__(self, **embedding):
        super().__init__()
        self.emb, self.head = nn.Embedding(50, 8, **embedding), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.emb(x).mean(1))


class Rescaled(nn.Module):
    """Rescales its weight in the forward pass, by an amount that depends on the data."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x):
        with torch.no_grad():
            self.lin.weight.mul_(1 + x.abs().mean())
        return self.lin(x)


@pytest.mark.parametrize("mode", ["fast", "hooks", "ghost"])
def test_weights_changed_outside_dp_sgd_are_refused(mode):
    """An embedding's max_norm rescales the rows a batch looks up: the rows a client's
    tokens touched would show in the weights it sends, whatever the noise."""
    tokens = torch.randint(0, 10, (4, 5))
    check_clippable(Embedded(), tokens, Y, grad_sample=mode)
    with pytest.raises(FedsimError, match=r"^model Embedded: layer 'emb' .* max_norm"):
        check_clippable(Embedded(max_norm=1.0), tokens, Y, grad_sample=mode)
    needle = "do not add up" if mode == "fast" else r"weight 'lin\.weight' changed .* rate 0"
    with pytest.raises(FedsimError, match=r"^model Rescaled: .*" + needle):
        check_clippable(Rescaled(), X, Y, grad_sample=mode)


def test_a_cohort_that_clips_too_little_is_refused(monkeypatch):
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    check_cohort_step(model, X, Y, dp=True)
    real = cohort_step.total_norm
    monkeypatch.setattr(cohort_step, "total_norm", lambda norms: 0.9 * real(norms))
    check_cohort_step(model, X, Y, dp=False)  # without DP nothing is clipped
    with pytest.raises(FedsimError, match=r"^model Sequential: a vectorized cohort clipped one "):
        check_cohort_step(model, X, Y, dp=True)


class NextChar(nn.Module):
    """Reads a weight outside its layer only where it predicts every position."""

    def __init__(self):
        super().__init__()
        self.emb, self.mid, self.head = nn.Embedding(10, 6), nn.Linear(6, 6), nn.Linear(6, 10)

    def forward(self, x, all_positions=False):
        e = self.emb(x)  # (B, T, 6)
        if not all_positions:
            return self.head(self.mid(e * 1e-3)[:, -1])
        h = 10 * torch.tanh(e @ self.mid.weight.t()) + self.mid(e * 1e-3)
        return self.head(h).transpose(1, 2)  # (B, C, T)


def test_the_checks_train_the_loss_the_clients_train():
    """With next-char-loss = all the clients differentiate every position's prediction."""
    torch.manual_seed(0)
    tokens, labels = torch.randint(0, 10, (4, 5)), torch.tensor([1, 2, 3, 4])
    check_clippable(NextChar(), tokens, labels, grad_sample="ghost")
    with pytest.raises(FedsimError, match=r"'ghost' clipped one sample's gradient to"):
        check_clippable(NextChar(), tokens, labels, grad_sample="ghost", all_positions=True)
    with pytest.raises(FedsimError, match=r"'fast': the per-sample gradients of 'mid\.weight'"):
        check_clippable(NextChar(), tokens, labels, grad_sample="fast", all_positions=True)
    check_cohort_step(NextChar(), tokens, labels, dp=True, all_positions=True)


class Versioned(nn.Module):
    """Keeps extra state in its state_dict, as some layers of one's own do."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x):
        return self.lin(x)

    def get_extra_state(self):
        return {"version": 2}

    def set_extra_state(self, state):
        self.version = state["version"]


@pytest.mark.parametrize("mode", ["fast", "hooks", "ghost"])
def test_padding_rows_and_extra_state_pass_the_checks(mode):
    """Opacus's embedding sampler gives padding rows a gradient: more clipping, not less."""
    tokens = torch.randint(1, 10, (4, 5))
    tokens[:, 3:] = 0
    check_clippable(Embedded(padding_idx=0), tokens, Y, grad_sample=mode)
    check_clippable(Versioned(), X, Y, grad_sample=mode)
