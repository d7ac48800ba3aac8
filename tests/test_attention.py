"""fedsim.dp.DPMultiheadAttention: nn.MultiheadAttention's outputs, with per-sample gradients."""

import copy

import pytest
import torch
from torch import nn

from fedsim.dp import (
    DPMultiheadAttention,
    check_clippable,
    check_samples_apart,
    dp_attention,
    replace_attention,
)
from fedsim.errors import FedsimError
from fedsim.models import build_model


def masks(batch_first):
    batch, length = 3, 5
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[0, -2:] = True
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)
    per_head = torch.randn(batch * 2, length, length)  # float, one per (sample, head)
    return [
        {},
        {"key_padding_mask": padding},
        {"attn_mask": causal, "need_weights": False},
        {"attn_mask": per_head, "key_padding_mask": padding, "average_attn_weights": False},
        {"attn_mask": causal, "is_causal": True},
    ]


@pytest.mark.parametrize("batch_first", [True, False])
def test_it_computes_what_nn_multihead_attention_computes(batch_first):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    (mine,) = replace_attention(nn.Sequential(ref)).children()  # weights carried over
    assert isinstance(mine, DPMultiheadAttention)
    x = torch.randn(3, 5, 8) if batch_first else torch.randn(5, 3, 8)
    for kwargs in masks(batch_first):
        want, want_weights = nn.MultiheadAttention.forward(ref, x, x, x, **kwargs)
        got, got_weights = mine(x, x, x, **kwargs)
        assert torch.allclose(got, want, atol=1e-6), kwargs
        if want_weights is None:
            assert got_weights is None
        else:
            assert torch.allclose(got_weights, want_weights, atol=1e-6), kwargs


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("inputs", ["self", "key-is-value", "all-apart"])
@pytest.mark.parametrize("kdim", [None, 5], ids=["packed", "separate"])
def test_cross_attention_computes_what_nn_multihead_attention_computes(batch_first, inputs, kdim):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim)
    (mine,) = replace_attention(nn.Sequential(ref)).children()
    assert mine.packed == (kdim is None)
    source = 4 if batch_first else 3  # (B, S, .) or (S, B, .): another length than T = 5
    shape = (3, source, kdim or 8) if batch_first else (source, 3, kdim or 8)
    query = torch.randn(3, 5, 8) if batch_first else torch.randn(5, 3, 8)
    key = query if inputs == "self" and kdim is None else torch.randn(shape)
    value = key if inputs != "all-apart" else torch.randn(shape)
    want, want_weights = nn.MultiheadAttention.forward(ref, query, key, value)
    got, got_weights = mine(query, key, value)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(got_weights, want_weights, atol=1e-6)


class Translator(nn.Module):
    """torch's encoder and decoder layers: self-attention and cross-attention inside."""

    def __init__(self, *, num_classes=3, **_):
        super().__init__()
        self.emb = nn.Embedding(9, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
        self.dec = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
        self.apart = nn.MultiheadAttention(8, 2, kdim=5, vdim=5, batch_first=True)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        h = self.emb(x)
        memory = self.enc(h, src_key_padding_mask=x == 0)
        return self.head(self.dec(h, memory, memory_key_padding_mask=x == 0).mean(1))


def test_a_dp_model_keeps_nn_multihead_attention_s_keys_and_outputs():
    torch.manual_seed(0)
    plain = Translator().eval()
    dp = dp_attention(copy.deepcopy(plain))
    swapped = [path for path, m in dp.named_modules() if isinstance(m, DPMultiheadAttention)]
    assert swapped == ["enc.self_attn", "dec.self_attn", "dec.multihead_attn"]
    assert type(dp.apart) is nn.MultiheadAttention  # kdim: no same keys; the checks refuse it
    assert list(dp.state_dict()) == list(plain.state_dict())
    for key, value in dp.state_dict().items():
        assert torch.equal(value, plain.state_dict()[key]), key
    x = torch.randint(0, 9, (3, 6))
    with torch.no_grad():
        assert torch.allclose(dp(x), plain(x), atol=1e-5)
    trained = {k: v + 0.1 * torch.randn_like(v) for k, v in dp.state_dict().items()}
    plain.load_state_dict(trained)  # the server's plain model takes what a client sends
    dp.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert torch.allclose(dp(x), plain(x), atol=1e-5)


def test_the_swap_keeps_frozen_flags_dtype_and_mode():
    ref = nn.MultiheadAttention(8, 2, batch_first=True).double().eval()
    ref.in_proj_weight.requires_grad_(False)
    ref.out_proj.bias.requires_grad_(False)
    (mine,) = replace_attention(nn.Sequential(ref)).children()
    flags = {k: v.requires_grad for k, v in mine.state_dict(keep_vars=True).items()}
    assert flags == {
        "in_proj_weight": False, "in_proj_bias": True,
        "out_proj.weight": True, "out_proj.bias": False,
    }  # fmt: skip
    assert mine.in_proj.weight.dtype == torch.float64 and not mine.training
    apart = nn.MultiheadAttention(8, 2, kdim=5, vdim=5)
    apart.in_proj_bias.requires_grad_(False)
    (mine,) = replace_attention(nn.Sequential(apart)).children()
    assert [n for n, p in mine.named_parameters() if not p.requires_grad] == [
        "q_proj.bias", "k_proj.bias", "v_proj.bias",
    ]  # fmt: skip


def test_a_checkpoint_of_the_three_projection_layout_still_loads():
    torch.manual_seed(0)
    ref = DPMultiheadAttention(8, 2, batch_first=True)
    old = {  # what DPMultiheadAttention saved before it packed its input projection
        f"{n}_proj.{kind}": part
        for kind in ("weight", "bias")
        for n, part in zip("qkv", ref.state_dict()[f"in_proj_{kind}"].chunk(3), strict=True)
    }
    old |= {k: v for k, v in ref.state_dict().items() if k.startswith("out_proj")}
    mine = DPMultiheadAttention(8, 2, batch_first=True)
    mine.load_state_dict(old)
    x = torch.randn(2, 4, 8)
    assert torch.equal(mine(x, x, x)[0], ref(x, x, x)[0])


def test_build_model_swaps_attention_for_dp_only():
    options = {"input_shape": (6,), "num_classes": 3, "task": "text-classification"}
    plain = build_model(f"{__name__}:Translator", **options)
    dp = build_model(f"{__name__}:Translator", **options, dp=True)
    assert isinstance(plain.enc.self_attn, nn.MultiheadAttention)
    assert isinstance(dp.enc.self_attn, DPMultiheadAttention)
    assert list(dp.state_dict()) == list(plain.state_dict())


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_inside_a_transformer_encoder_layer(mode):
    torch.manual_seed(0)
    plain = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    swapped = replace_attention(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True))
    swapped.load_state_dict(plain.state_dict())  # an nn.MultiheadAttention checkpoint loads
    getattr(plain, mode)(), getattr(swapped, mode)()
    x = torch.randn(3, 5, 8)
    with torch.no_grad():  # in eval, the plain layer takes its fused path
        assert torch.allclose(swapped(x), plain(x), atol=1e-5)


class Encoder(nn.Module):
    """torch's own encoder layer, attention dropout and all, with the drop-in swapped in."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
        self.enc, self.head = replace_attention(layer), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.enc(self.emb(x), src_key_padding_mask=x == 0).mean(1))


@pytest.mark.parametrize("mode", ["fast", "hooks", "ghost"])
def test_a_transformer_encoder_layer_takes_a_dp_step_in_every_mode(mode):
    torch.manual_seed(0)
    x = torch.randint(1, 9, (4, 6))
    x[0, -2:] = 0  # padding
    check_clippable(Encoder(), x, torch.tensor([0, 1, 2, 1]), grad_sample=mode)
    translator = Translator()
    del translator.apart  # unused in forward; the checks refuse any nn.MultiheadAttention
    check_samples_apart(dp_attention(translator), x)  # cross-attention's side-by-side call
    check_clippable(translator, x, torch.tensor([0, 1, 2, 1]), grad_sample=mode)
    with pytest.raises(
        FedsimError, match=r"nn\.MultiheadAttention, .*fedsim\.dp\.replace_attention"
    ):
        model = Encoder()
        model.enc.self_attn = nn.MultiheadAttention(8, 2, batch_first=True)
        check_clippable(model, x, torch.tensor([0, 1, 2, 1]), grad_sample=mode)


def test_what_it_cannot_do_is_refused_in_one_line():
    with pytest.raises(FedsimError, match="add_bias_kv or add_zero_attn"):
        replace_attention(nn.Sequential(nn.MultiheadAttention(8, 2, add_bias_kv=True)))
    with pytest.raises(FedsimError, match="not divisible by num_heads"):
        DPMultiheadAttention(8, 3)
