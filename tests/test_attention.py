"""fedsim.dp.DPMultiheadAttention: nn.MultiheadAttention's outputs, with per-sample gradients."""

import pytest
import torch
from torch import nn

from fedsim.dp import DPMultiheadAttention, check_clippable, replace_attention
from fedsim.errors import FedsimError


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
