"""pfl-research's side of the federation benchmark: the same workload in Apple's pfl.

    python -m experiments.research.bench_pfl FOLDER   (FOLDER holds config.json; writes result.json)

``experiments.research.bench_federation`` runs this as its own process, in an environment where
``pfl[pytorch]`` is installed (``--pfl-python``): pfl pins dependencies of its own, so it
usually lives in a separate virtual environment. Same data, partitions, model, local
steps (1 epoch, same batch size and lr, plain SGD) and central evaluations as the other
sides; pfl samples its own cohorts and does not shuffle within a client, so the
accuracy is comparable, not identical. pfl has no per-sample DP-SGD (its mechanisms
act on whole client updates), so it runs only the ``dp = "none"`` workload.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from pfl.aggregate.simulate import SimulatedBackend
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
from pfl.callback.base import TrainingProcessCallback
from pfl.data.dataset import Dataset as PflDataset
from pfl.data.federated_dataset import FederatedDataset
from pfl.data.sampling import get_user_sampler
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
from pfl.metrics import Metrics, Weighted
from pfl.model.pytorch import PyTorchModel
from torch import nn

from fedsim.config import FedsimConfig, parse_config
from fedsim.data import load_dataset, partition_dataset
from fedsim.models import build_model, model_kwargs

EVAL_BATCH = 1000


class PflNet(nn.Module):
    """A fedsim model with the ``loss`` and ``metrics`` methods pfl calls."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped model's logits."""
        return self.net(x)

    def loss(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> torch.Tensor:
        """Mean cross-entropy of a batch: what local SGD minimizes."""
        self.train(not eval)
        return nn.functional.cross_entropy(self(x), y)

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, y: torch.Tensor, eval: bool = True) -> dict:
        """Summed loss and correct count of a batch, weighted by its size."""
        self.train(not eval)
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y, reduction="sum")
        correct = (logits.argmax(1) == y).sum()
        return {"loss": Weighted(loss.item(), len(y)), "accuracy": Weighted(correct.item(), len(y))}


class FedAvgTrainOnly(FederatedAveraging):
    """pfl's FedAvg without its per-client evaluations before and after local training.

    pfl runs them in round 1 even when asked for no evaluation; the other sides evaluate
    only centrally, so this keeps the work the same.
    """

    def get_next_central_contexts(self, *args, **kwargs):
        """The next round's contexts, with client-side evaluation off."""
        contexts, model, metrics = super().get_next_central_contexts(*args, **kwargs)
        if contexts is not None:
            contexts = tuple(dataclasses.replace(c, do_evaluation=False) for c in contexts)
        return contexts, model, metrics


class RoundClock(TrainingProcessCallback):
    """Evaluates on the test split before training and after every round; times each."""

    def __init__(self, test: PflDataset, started: float) -> None:
        self.test, self.last, self.seconds, self.accuracy = test, started, [], 0.0

    def _tick(self, model: PyTorchModel) -> None:
        metrics = model.evaluate(self.test, eval_params=NNEvalHyperParams(EVAL_BATCH))
        self.accuracy = next(v for k, v in metrics if "accuracy" in str(k)).overall_value
        now = time.perf_counter()
        self.seconds.append(now - self.last)
        self.last = now

    def on_train_begin(self, *, model: PyTorchModel) -> Metrics:
        """Round 0: the untrained model."""
        self._tick(model)
        return Metrics()

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
        """Every round: the new central model."""
        self._tick(model)
        return False, Metrics()


def pfl_run(config: FedsimConfig) -> tuple[list[float], float]:
    """Seconds of rounds 0..N (0: data, model, first evaluation) and the final accuracy."""
    started = time.perf_counter()
    dataset = load_dataset(config.dataset, config.data_dir)
    parts = partition_dataset(dataset, config)
    x, y = torch.from_numpy(dataset.x_train), torch.from_numpy(dataset.y_train)
    users = {str(c): (x[idx], y[idx]) for c, idx in enumerate(parts)}
    np.random.seed(config.seed)  # pfl's "random" user sampler draws from numpy's global state
    torch.manual_seed(config.seed)
    train = FederatedDataset(
        make_dataset_fn=lambda uid: PflDataset(raw_data=list(users[uid]), user_id=uid),
        user_sampler=get_user_sampler("random", list(users)),
    )
    test = PflDataset(raw_data=[torch.from_numpy(dataset.x_test), torch.from_numpy(dataset.y_test)])
    net = PflNet(build_model(config.model, **model_kwargs(dataset)))
    model = PyTorchModel(
        net,
        local_optimizer_create=torch.optim.SGD,
        central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0),  # FedAvg: take the mean
    )
    clock = RoundClock(test, started)
    FedAvgTrainOnly().run(
        algorithm_params=NNAlgorithmParams(
            central_num_iterations=config.num_rounds,
            evaluation_frequency=1,
            train_cohort_size=config.clients_per_round,
            val_cohort_size=0,
        ),
        backend=SimulatedBackend(training_data=train, val_data=train),
        model=model,
        model_train_params=NNTrainHyperParams(
            local_num_epochs=config.local_epochs,
            local_learning_rate=config.lr,
            local_batch_size=config.batch_size,
        ),
        model_eval_params=NNEvalHyperParams(EVAL_BATCH),
        callbacks=[clock],
    )
    return clock.seconds, clock.accuracy


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    result = pfl_run(parse_config(json.loads((folder / "config.json").read_text())))
    (folder / "result.json").write_text(json.dumps(result))
