"""Training waits for the device once a round, not once a step (issue 14).

On a GPU a host synchronisation (``.item()``, ``float(t)``, ``bool(t)``, an operator whose
output shape depends on the data) makes the host wait until every queued kernel has run:
once a step, it leaves the GPU idle while the next step is prepared. The CPU cannot tell
a wait, but the operators that cause one are the same on both: here they are counted
inside the training loops, over one epoch and over three.
"""

import collections

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fedsim.clients import training
from fedsim.dp import cohort, dp_randomness, seeded_root, train_cohort
from fedsim.models import build_model, evaluate

# operators that read a value back to the host, or size their output by the data
SYNCS = frozenset(
    {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "is_nonzero",
     "equal", "repeat_interleave", "item"}
)  # fmt: skip


class Syncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in SYNCS:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def syncs_by_epochs(monkeypatch, loop, train):
    """The syncs inside ``loop`` ((module, name): a training loop) as ``train(epochs)`` runs,
    for one epoch and for three."""
    module, name = loop
    seen = []
    for epochs in (1, 3):
        counter, original = Syncs(), getattr(module, name)

        def counted(*args, counter=counter, original=original, **kwargs):
            with counter:
                return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
        train(epochs)
        monkeypatch.undo()
        seen.append(dict(counter.calls))
    return seen


def data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, n)


def new_model():
    return build_model("cnn", input_shape=(1, 8, 8), num_classes=10)


@pytest.mark.parametrize("grad_sample", ["fast", "hooks", "ghost", None])
def test_one_client_reads_the_device_once_a_round(monkeypatch, grad_sample):
    x, y = data()
    dp = {"noise_multiplier": 1.0, "grad_sample": grad_sample} if grad_sample else {}

    def train(epochs):
        training.train_local(new_model(), x, y, epochs=epochs, batch_size=8, lr=0.1, **dp)

    seen = syncs_by_epochs(monkeypatch, (training, "_epochs"), train)
    assert seen[0] == seen[1] == {"_local_scalar_dense": 1}  # the mean loss, at the end


@pytest.mark.parametrize("dp", [True, False])
def test_a_cohort_reads_the_device_once_a_round(monkeypatch, dp):
    x, y = torch.from_numpy(data()[0]), torch.from_numpy(data()[1])
    clients = [(x[: 20 + 10 * k], y[: 20 + 10 * k]) for k in range(3)]  # ragged

    def train(epochs):
        model = new_model()
        rand = [
            dp_randomness(seeded_root(0), server_round=1, client=k, device="cpu", secure=False)
            for k in range(3)
        ]
        train_cohort(
            model, [model.state_dict()] * 3, clients, epochs=epochs, batch_size=8, lr=0.1,
            noise_multiplier=1.0 if dp else None, randomness=rand,
        )  # fmt: skip

    seen = syncs_by_epochs(monkeypatch, (cohort, "_train"), train)
    # the losses are read once, by a tolist() after the loop, which no operator dispatches
    assert seen[0] == seen[1] == {}


def test_evaluation_reads_the_device_twice_whatever_its_batches():
    x, y = data(n=64)
    model = new_model()
    seen = []
    for batch_size in (64, 8):
        with Syncs() as counter:
            evaluate(model, x, y, batch_size=batch_size)
        seen.append(dict(counter.calls))
    assert seen[0] == seen[1] == {"_local_scalar_dense": 2}  # the loss and the accuracy
