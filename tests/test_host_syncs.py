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


def counted(monkeypatch, module, name):
    """Count the syncs inside ``module.name`` (the training loop), over all its calls."""
    counter, loop = Syncs(), getattr(module, name)

    def wrapped(*args, **kwargs):
        with counter:
            return loop(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return counter.calls


def data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, n)


@pytest.mark.parametrize("grad_sample", ["fast", "hooks", "ghost", None])
def test_one_client_reads_the_device_once_a_round(monkeypatch, grad_sample):
    x, y = data()
    seen = []
    for epochs in (1, 3):
        calls = counted(monkeypatch, training, "_epochs")
        model = build_model("cnn", input_shape=(1, 8, 8), num_classes=10)
        dp = {"noise_multiplier": 1.0, "grad_sample": grad_sample} if grad_sample else {}
        training.train_local(model, x, y, epochs=epochs, batch_size=8, lr=0.1, **dp)
        seen.append(dict(calls))
        monkeypatch.undo()
    assert seen[0] == seen[1] == {"_local_scalar_dense": 1}  # the mean loss, at the end


@pytest.mark.parametrize("dp", [True, False])
def test_a_cohort_reads_the_device_once_a_round(monkeypatch, dp):
    x, y = data()
    seen = []
    for epochs in (1, 3):
        calls = counted(monkeypatch, cohort, "_train")
        model = build_model("cnn", input_shape=(1, 8, 8), num_classes=10)
        rand = [
            dp_randomness(seeded_root(0), server_round=1, client=k, device="cpu", secure=False)
            for k in range(3)
        ]
        clients = [(torch.from_numpy(x[: 20 + 10 * k]), torch.from_numpy(y[: 20 + 10 * k]))
                   for k in range(3)]  # fmt: skip
        train_cohort(
            model, [model.state_dict()] * 3, clients, epochs=epochs, batch_size=8, lr=0.1,
            noise_multiplier=1.0 if dp else None, randomness=rand,
        )  # fmt: skip
        seen.append(dict(calls))
        monkeypatch.undo()
    # the losses are read once, by a tolist() after the loop, which no operator dispatches
    assert seen[0] == seen[1] == {}


def test_evaluation_reads_the_device_twice_whatever_its_batches():
    x, y = data(n=64)
    model = build_model("cnn", input_shape=(1, 8, 8), num_classes=10)
    seen = []
    for batch_size in (64, 8):
        with Syncs() as counter:
            evaluate(model, x, y, batch_size=batch_size)
        seen.append(dict(counter.calls))
    assert seen[0] == seen[1] == {"_local_scalar_dense": 2}  # the loss and the accuracy
