"""fedsim.dp.time_first: torch's time-first transformer layers, run batch-first inside."""

import copy

import pytest
import torch
from torch import nn

from fedsim.dp import (
    check_clippable,
    check_samples_apart,
    dp_attention,
    replace_attention,
    vectorizable,
)
from fedsim.dp.time_first import BatchFirstDecoderLayer, BatchFirstEncoderLayer
from fedsim.errors import FedsimError


class Seq2Seq(nn.Module):
    """torch's defaults: a time-first encoder stack and decoder layer."""

    def __init__(self, dropout=0.1):
        super().__init__()
        self.emb = nn.Embedding(9, 8)
        self.enc = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(8, 2, 16, dropout), 2, enable_nested_tensor=False
        )
        self.dec = nn.TransformerDecoderLayer(8, 2, 16, dropout, norm_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.emb(x).transpose(0, 1)  # (T, B, 8)
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        memory = self.enc(h, mask=causal, src_key_padding_mask=x == 0)
        out = self.dec(h, memory, tgt_mask=causal, memory_key_padding_mask=x == 0)
        return self.head(out.mean(0))


def tokens():
    x = torch.randint(1, 9, (4, 6))
    x[0, -2:] = 0  # padding
    return x


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_it_computes_what_the_time_first_layers_compute(mode):
    torch.manual_seed(0)
    plain = getattr(Seq2Seq(dropout=0.0), mode)()  # masks on (T, B) and (B, T) differ
    inside = dp_attention(copy.deepcopy(plain))
    assert type(inside.enc.layers[0]) is BatchFirstEncoderLayer
    assert type(inside.dec) is BatchFirstDecoderLayer
    assert list(inside.state_dict()) == list(plain.state_dict())
    x = tokens()
    with torch.no_grad():  # in eval, the plain layers may take torch's fused path
        assert torch.allclose(inside(x), plain(x), atol=1e-5)


def test_a_cohort_runs_them_batch_first_inside_the_attention_swapped_by_hand_too():
    model = replace_attention(Seq2Seq())
    assert type(vectorizable(model).dec) is BatchFirstDecoderLayer
    assert type(model.dec) is nn.TransformerDecoderLayer  # vectorizable swaps in a copy


def test_batch_first_layers_and_subclasses_are_left_alone():
    class Own(nn.TransformerEncoderLayer):
        pass

    model = nn.ModuleList([nn.TransformerEncoderLayer(8, 2, batch_first=True), Own(8, 2)])
    dp_attention(model)
    assert [type(m) for m in model] == [nn.TransformerEncoderLayer, Own]
    assert not model[1].self_attn.batch_first


@pytest.mark.parametrize("mode", ["fast", "hooks", "ghost"])
def test_a_time_first_model_trains_under_dp_sgd(mode):
    torch.manual_seed(0)
    x, y = tokens(), torch.tensor([0, 1, 2, 1])
    with pytest.raises(FedsimError, match=r"'enc\.layers\.0\.\w+' .* make every layer's output"):
        check_samples_apart(Seq2Seq(), x)  # as written, time-first: refused
    model = dp_attention(Seq2Seq())
    check_samples_apart(model, x)
    check_clippable(model, x, y, grad_sample=mode)
