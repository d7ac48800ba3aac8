"""User-level canaries: clients whose every update is one fixed random direction.

After Andrew, Kairouz, Oh, Oprea, McMahan and Suriyakumar, "One-shot Empirical Privacy
Estimation for Federated Learning" (ICLR 2024, arXiv:2302.03098). Canary i has a unit
direction u_i in the model's parameter space (d numbers, Gaussian then normalised, so
directions are nearly orthogonal to each other and to real updates). A canary that is
*in* joins the population: each round it is sampled at the clients' rate q, and when
sampled its clipped update is ``clip_norm · u_i``, the largest any client can send. A
canary that is *out* never joins; its direction is a draw from the null distribution.
After training, each canary is scored by the cosine between the final model's change and
u_i; in-canaries score higher as less noise hides them.

Two numbers come out. (1) The one-run bound (``fedsim.dp.audit.best_guesses``): every
canary is in with probability 1/2, independently, so guesses from the cosines give an ε
lower bound at a stated confidence, valid for the user unit. (2) Andrew et al.'s
estimate: the in-canaries' mean cosine in standard deviations of the out-canaries'
cosines is taken as μ of a μ-GDP Gaussian mechanism, and its ε at δ is reported; an
estimate, with no confidence attached.

Which canaries are in, and their directions, come from the run's *seed*
(``Purpose.USER_CANARIES``), even with ``secure-noise``: the guesses use only the final
model, and membership is used only to count right guesses. When an in-canary is sampled
is part of the mechanism and comes from the run's root, like the cohort.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

from fedsim.dp.randomness import Purpose, numpy_generator, seeded_root, stream_seed
from fedsim.errors import FedsimError

_DIRECTIONS = 1  # stream keys (server_round) under Purpose.USER_CANARIES
_MEMBERSHIP = 0


@dataclass(frozen=True)
class UserCanaries:
    """``count`` canary clients of a run with ``seed``, for a model of ``dim`` numbers."""

    count: int
    seed: int
    dim: int

    def included(self) -> npt.NDArray[np.bool_]:
        """Which canaries are in: each with probability 1/2, independently."""
        rng = self._rng(_MEMBERSHIP, 0)
        return rng.random(self.count) < 0.5

    def direction(self, index: int) -> npt.NDArray[np.float64]:
        """Canary ``index``'s unit direction, shape (dim,)."""
        u = self._rng(_DIRECTIONS, index).standard_normal(self.dim)
        return u / np.linalg.norm(u)

    def sampled(self, rate: float, *, root: bytes, server_round: int) -> list[int]:
        """The in-canaries that take part in ``server_round``: each at ``rate``."""
        seed = stream_seed(root, purpose=Purpose.CANARY_SAMPLING, server_round=server_round)
        chosen = numpy_generator(seed).random(self.count) < rate
        return np.flatnonzero(chosen & self.included()).tolist()

    def scores(self, change: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """The cosine between the model's ``change`` (dim,) and each canary's direction."""
        norm = float(np.linalg.norm(change))
        if change.shape != (self.dim,) or norm == 0 or not math.isfinite(norm):
            raise FedsimError(f"need a finite, non-zero change of {self.dim} numbers to score")
        return np.array([float(self.direction(i) @ change) / norm for i in range(self.count)])

    def _rng(self, key: int, index: int) -> np.random.Generator:
        root = seeded_root(self.seed)
        return numpy_generator(
            stream_seed(root, purpose=Purpose.USER_CANARIES, server_round=key, client=index)
        )


def gdp_epsilon(mu: float, delta: float) -> float:
    """ε of a μ-GDP mechanism at δ (Dong, Roth & Su 2019, Corollary 2.13); 0 for μ <= 0.

    δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2) falls as ε grows: bisection for δ(ε) = δ.
    """
    if not 0 < delta < 1:
        raise FedsimError(f"delta must be in (0, 1), got {delta}")
    if mu <= 0:
        return 0.0
    phi = NormalDist().cdf

    def delta_at(eps: float) -> float:
        return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)

    if delta_at(0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while delta_at(hi) > delta:
        lo, hi = hi, 2 * hi
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_at(mid) > delta else (lo, mid)
    return hi


def gaussian_estimate(
    scores: npt.ArrayLike, included: npt.ArrayLike, *, delta: float
) -> float | None:
    """Andrew et al.'s ε estimate: in-canaries' mean cosine as μ of a Gaussian mechanism.

    μ = (mean of in-scores − mean of out-scores) / std of out-scores; None with fewer than
    two canaries on either side.
    """
    score = np.asarray(scores, dtype=float)
    member = np.asarray(included, dtype=bool)
    inside, outside = score[member], score[~member]
    if len(inside) < 2 or len(outside) < 2:
        return None
    mu = (inside.mean() - outside.mean()) / outside.std(ddof=1)
    return gdp_epsilon(float(mu), delta)
