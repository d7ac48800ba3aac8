"""Canaries of a one-run privacy audit (sample unit), and the audit's summary record.

``audit-canaries = m`` adds m canaries to the clients' training data, after Steinke, Nasr
& Jagielski 2023: each is a random-noise image of the dataset's input shape with a random
label (out of distribution, so learning them costs the real task little), assigned to a
random client and included with probability 1/2, independently. After the run the auditor
(the server) scores each canary by the final global model's loss on it, guesses "in" for
the lowest losses and turns the guesses into an ε lower bound
(:func:`fedsim.dp.audit.best_guesses`).

Canaries and their in/out bits are a pure function of the config's ``seed``, drawn from the
``CANARIES`` stream of ``seeded_root(seed)`` even when ``secure-noise`` is on, so the server
and every client agree on them without sending them. That does not weaken the DP noise,
which stays secret under ``secure-noise``: the guesser sees only the final model, and the
bits are used only to count which guesses were right. An audit measures a mechanism; its
canaries are part of the experiment's design, like simulated faults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedsim.config import FedsimConfig
from fedsim.dp.audit import best_guesses
from fedsim.dp.randomness import Purpose, numpy_generator, seeded_root, stream_seed
from fedsim.errors import FedsimError

METHOD = "one-run (Steinke, Nasr & Jagielski 2023), loss of the final model, black-box"
CANARY_KIND = "uniform-noise images with uniform random labels"


@dataclass(frozen=True)
class Canaries:
    """m canaries: inputs ``x`` (m, *shape), labels ``y``, their ``client`` and ``included``."""

    x: np.ndarray
    y: np.ndarray
    client: np.ndarray
    included: np.ndarray

    def for_client(self, client: int) -> tuple[np.ndarray, np.ndarray]:
        """The included canaries of ``client``: what it appends to its training data."""
        mine = self.included & (self.client == client)
        return self.x[mine], self.y[mine]

    def added(self, num_clients: int) -> npt.NDArray[np.int64]:
        """How many canaries each client of ``num_clients`` trains on."""
        return np.bincount(self.client[self.included], minlength=num_clients)


def make_canaries(
    seed: bytes,
    count: int,
    *,
    num_clients: int,
    public_images: np.ndarray,
    num_classes: int,
) -> Canaries:
    """``count`` canaries shaped as ``public_images``, drawn from stream seed ``seed``.

    Pixels are uniform over ``public_images``' value range, so a canary is as bright as
    real data but looks like none of it. Pass the test split, never the training split:
    one training example could set that range, and through it every canary that trains.
    """
    images = public_images
    if images.ndim < 2 or not np.issubdtype(images.dtype, np.floating) or len(images) == 0:
        raise FedsimError(
            f"audit-canaries needs image data (floating-point inputs), got {images.dtype} "
            f"inputs of shape {images.shape[1:]}; set audit-canaries = 0"
        )
    rng = numpy_generator(seed)
    # drawn in a fixed order: bits, clients, labels, then pixels
    included = rng.random(count) < 0.5
    client = rng.integers(num_clients, size=count)
    y = rng.integers(num_classes, size=count).astype(np.int64)
    low, high = float(images.min()), float(images.max())
    x = rng.uniform(low, high, size=(count, *images.shape[1:])).astype(images.dtype)
    return Canaries(x, y, client.astype(np.int64), included)


def canary_seed(seed: int) -> bytes:
    """The canaries' stream under the config's ``seed``: public, as the module says why."""
    return stream_seed(seeded_root(seed), purpose=Purpose.CANARIES, server_round=0)


def canary_set(config: FedsimConfig, public_images: np.ndarray, num_classes: int) -> Canaries:
    """The run's canaries (``audit-canaries`` of them), the same for server and clients.

    ``public_images``: the test split (see :func:`make_canaries`).
    """
    return make_canaries(
        canary_seed(config.seed),
        config.audit_canaries,
        num_clients=config.num_clients,
        public_images=public_images,
        num_classes=num_classes,
    )


def audit_record(
    scores: npt.ArrayLike,
    included: npt.ArrayLike,
    config: FedsimConfig,
    *,
    unit: str,
    method: str,
    kind: str,
) -> dict[str, Any]:
    """One unit's entry in summary.json's ``audit``: the ε lower bound from canary scores.

    ``scores``: higher means more likely included. The bound refutes (ε, δ) claims at the
    run's δ and holds at ``audit-confidence`` over all the guess counts tried.
    """
    score = np.asarray(scores, dtype=float)
    member = np.asarray(included, dtype=bool)
    beta = 1.0 - config.audit_confidence
    found = best_guesses(score, member, delta=config.delta, beta=beta)
    order = np.argsort(-score, kind="stable")  # best_guesses's order
    correct = int(member[order[: found.guessed_in]].sum())
    if found.guessed_out:
        correct += int((~member[order[len(order) - found.guessed_out :]]).sum())
    m = len(member)
    # the most this run's audit could show: every included canary scored above the rest
    ceiling = best_guesses(member.astype(float), member, delta=config.delta, beta=beta).epsilon
    return {
        "unit": unit,
        "epsilon": math.floor(found.epsilon * 1e4) / 1e4,  # rounded down: a lower bound
        "method": method,
        "confidence": config.audit_confidence,
        "delta": config.delta,
        "canaries": m,
        "canaries_in": int(member.sum()),
        "canary_kind": kind,
        "guesses": found.guessed_in + found.guessed_out,
        "correct": correct,
        "ceiling": round(ceiling, 4),
    }
