"""Models that mix a batch's samples, or are not batch-first, are refused before training."""

import pytest
import torch
from opacus.layers import DPGRU
from torch import nn

from fedsim.config import parse_config
from fedsim.dp import check_samples_apart
from fedsim.errors import FedsimError
from fedsim.experiments.run import preflight


class Centred(nn.Module):
    """Subtracts the batch mean: no parameters, yet one sample moves all the others."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True)


class TimeMajor(nn.Module):
    """A linear layer run on (T, B, .): its dim 0 is time, which the clipping rules misread."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):  # x: (B, T, 4)
        return self.fc(x.transpose(0, 1)).mean(0)


class Flattened(nn.Module):
    """A linear layer on (B·T, .): each position would be clipped as if it were a sample."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x.reshape(-1, 4)).reshape(len(x), -1, 3).mean(1)


def image_net(middle):
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), middle, nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize(
    ("model", "shape", "needle"),
    [
        (image_net(nn.BatchNorm1d(8, affine=False, track_running_stats=False)), (1, 4, 4), "mixes"),
        (image_net(Centred()), (1, 4, 4), "mixes the samples of a batch"),
        (TimeMajor(), (4, 4), "layer 'fc' (Linear) returned shape (4, 3, 3) for a batch of 3"),
        (TimeMajor(), (3, 4), "returned shape (3, 2, 3) for a batch of 2"),  # T = B at first
        (Flattened(), (5, 4), "returned shape (15, 3) for a batch of 3"),
    ],
)
def test_mixing_and_not_batch_first_models_are_refused(model, shape, needle):
    with pytest.raises(FedsimError, match="per-sample clipping") as info:
        check_samples_apart(model, torch.randn(6, *shape))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_models_that_keep_samples_apart_pass_and_are_left_as_they_were():
    model = image_net(nn.Dropout(0.5))  # random, but the same masks in every probe
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_samples_apart(model, torch.randn(6, 1, 4, 4))
    assert not model.training and all(
        torch.equal(before[k], v) for k, v in model.state_dict().items()
    )
    check_samples_apart(image_net(Centred()), torch.randn(3, 1, 4, 4))  # too few to compare


NETS = """
from torch import nn

class Mixing(nn.Module):
    tasks = ("image",)

    def __init__(self, *, input_shape, num_classes, **_):
        super().__init__()
        self.fc = nn.Linear(64, num_classes)
        self.norm = nn.BatchNorm1d(num_classes, affine=False, track_running_stats=False)

    def forward(self, x):
        return self.norm(self.fc(x.flatten(1)))
"""


def test_a_run_with_such_a_model_stops_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "mixnets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = parse_config({"model": "mixnets:Mixing"})
    with pytest.raises(FedsimError, match="model Mixing mixes the samples"):
        preflight(config)
    preflight(config.model_copy(update={"dp": "user"}))  # clipped per client: samples may mix


def test_an_opacus_rnn_running_time_first_passes_its_cells_see_one_step():
    class TimeFirstGru(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru, self.fc = DPGRU(4, 5), nn.Linear(5, 3)

        def forward(self, x):  # x: (B, T, 4)
            return self.fc(self.gru(x.transpose(0, 1))[0][-1])

    check_samples_apart(TimeFirstGru(), torch.randn(6, 7, 4))
