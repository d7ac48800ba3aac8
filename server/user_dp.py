"""User-level DP: DP-FedAvg (McMahan et al. 2018) as a wrapper around a strategy.

Each sampled client's model update is clipped to L2 norm C, the clipped updates are
*summed* with equal weight, Gaussian noise of std σ·C is added to the sum, and the sum is
divided by the expected cohort size q·N. The fixed denominator and equal weights are what
make one client's influence on the released aggregate at most C/(qN), which the noise
covers; Flower's DP wrappers noise a sample-size-weighted mean instead, whose sensitivity
the noise does not cover.

Adaptive clipping follows Andrew et al. (2021): each client contributes the bit
``‖Δ‖ ≤ C`` centred to ±1/2 (sensitivity 1/2), the sum of these gets its own noise
(std σ_b), and C moves toward the target quantile γ: C ← C·exp(−η (b̄ − γ)), so C
*shrinks* when more than γ of the updates already fit. Noise is split so that the pair
of releases is a Gaussian mechanism with the accounted noise multiplier z:
σ_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2).
"""

from __future__ import annotations

import math
from collections.abc import Container, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from fedsim.dp import Purpose, UserCanaries, numpy_generator, stream_seed
from fedsim.errors import FedsimError
from fedsim.messages import average_content, model_arrays
from fedsim.server.privacy import LedgerEntry
from fedsim.server.strategy import StrategyWrapper

Arrays = dict[str, np.ndarray]


def to_numpy(record: ArrayRecord) -> Arrays:
    """The floating-point arrays of ``record``, as float64 (sums of many updates need it).

    Other arrays (a BatchNorm's step counter) are not part of an update: the server keeps
    its own (:meth:`UserLevelDP.aggregate_train`). Counted in, one counter's change of a
    round's step count would outweigh the clip norm and scale every weight's update to
    almost nothing.
    """
    arrays = {k: v.numpy() for k, v in record.items()}
    return {k: v.astype(np.float64) for k, v in arrays.items() if v.dtype.kind == "f"}


def flatten(arrays: Arrays) -> np.ndarray:
    """The arrays of :func:`to_numpy`, in order, as one vector (what canaries span)."""
    parts = [v.ravel() for v in arrays.values()]
    return np.concatenate(parts) if parts else np.zeros(0)


def unflatten(vector: np.ndarray, template: Arrays) -> Arrays:
    """:func:`flatten`'s inverse on ``template``'s shapes."""
    out, at = {}, 0
    for key, value in template.items():
        out[key] = vector[at : at + value.size].reshape(value.shape)
        at += value.size
    return out


def clip(update: Arrays, bound: float) -> tuple[Arrays, float]:
    """Scale ``update`` to L2 norm at most ``bound``; return it and its original norm."""
    norm = math.sqrt(sum(float(np.sum(u * u)) for u in update.values()))
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return {k: u * scale for k, u in update.items()}, norm


def noisy_mean(
    clipped: list[Arrays],
    template: Arrays,
    *,
    std: float,
    denominator: float,
    rng: np.random.Generator,
) -> Arrays:
    """(Σ clipped + N(0, std²)) / denominator, per parameter."""
    total = {k: np.zeros_like(v) for k, v in template.items()}
    for update in clipped:
        for k in total:
            total[k] += update[k]
    return {k: (t + rng.normal(0.0, std, t.shape)) / denominator for k, t in total.items()}


def update_std(z: float, count_noise: float) -> float:
    """σ_Δ that leaves the (update, bit count) pair at total noise multiplier ``z``."""
    if count_noise == 0:
        return z
    rest = z**-2 - (2 * count_noise) ** -2
    if rest <= 0:
        raise FedsimError(
            f"clip-count-noise {count_noise:g} is too small for noise multiplier {z:.3f}; "
            f"raise clip-count-noise above {z / 2:.3f}"
        )
    return rest**-0.5


def clip_fraction(
    unclipped: int, replies: int, *, std: float, cohort: float, rng: np.random.Generator
) -> float:
    """Noisy fraction of updates that fit the clip norm, from bits centred to ±1/2.

    Centring (Andrew et al. 2021, as in TF Privacy's quantile estimator) makes one
    client move the released sum by at most 1/2, which is what :func:`update_std`'s split
    of the noise assumes; raw 0/1 bits would have sensitivity 1 and leave the pair of
    releases less private than the accounted noise multiplier.
    """
    centred = unclipped - replies / 2 + rng.normal(0.0, std)
    return centred / cohort + 0.5


def running_variances(model: nn.Module) -> frozenset[str]:
    """The state_dict keys of ``model``'s running variances (BatchNorm's, InstanceNorm's)."""
    return frozenset(
        f"{name}.running_var" if name else "running_var"
        for name, layer in model.named_modules()
        if isinstance(layer, _NormBase) and layer.track_running_stats
    )


def release(current: ArrayRecord, base: Arrays, mean: Arrays) -> ArrayRecord:
    """The new global model: ``base`` + ``mean``, each array in ``current``'s dtype.

    An array outside the update (not floating point, so not in ``base``) stays the
    server's own.
    """
    old = {k: v.numpy() for k, v in current.items()}
    # asarray: numpy arithmetic makes a 0-d array a scalar, which Array refuses
    new = {k: np.asarray(base[k] + mean[k]).astype(v.dtype) if k in base else v
           for k, v in old.items()}  # fmt: skip
    return ArrayRecord({k: Array(v) for k, v in new.items()})


def clipped_at_zero(arrays: ArrayRecord, keys: Container[str]) -> ArrayRecord:
    """``arrays`` with those named in ``keys`` clipped at 0.

    Running variances, which noise (or a server optimizer's momentum on a noised release)
    can push below 0, and evaluation divides by their square root. A function of the
    release alone: post-processing, which DP allows.
    """
    if not any(key in keys for key in arrays):  # most models: nothing to convert
        return arrays
    out = {}
    for key, array in arrays.items():
        if key in keys:
            value = array.numpy()
            array = Array(np.maximum(value, 0).astype(value.dtype))
        out[key] = array
    return ArrayRecord(out)


class UserLevelDP(StrategyWrapper):
    """Wrap a strategy: aggregate by clipped, noised, fixed-denominator sums.

    The wrapped strategy still samples the cohort and configures clients; it must sample
    each client independently with rate ``sample_rate`` (Poisson), which is what the
    accountant assumes, and the cohort must stay secret. The noise of each round comes
    from its own stream under ``root`` (``fedsim.dp.randomness``). Each round appends one
    entry to ``ledger``: a Poisson-subsampled Gaussian mechanism with noise multiplier z
    and rate ``sample_rate``. The wrapped strategy then aggregates the released average
    alone, as one reply: its server optimizer, if any, is post-processing.
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        ledger: list[LedgerEntry],
        sample_rate: float,
        noise_multiplier: float,
        clip_norm: float,
        expected_cohort: float,
        root: bytes,
        clip_quantile: float = 0.0,
        clip_lr: float = 0.2,
        count_noise: float = 0.0,
        canaries: UserCanaries | None = None,
        nonnegative: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(inner)
        self.ledger = ledger
        self.sample_rate = sample_rate
        self.z = noise_multiplier
        self.clip_norm = clip_norm
        self.expected_cohort = expected_cohort
        self.root = root
        self.quantile = clip_quantile
        self.clip_lr = clip_lr
        self.count_noise = count_noise if clip_quantile > 0 else 0.0
        self.sigma_update = update_std(noise_multiplier, self.count_noise)
        self.canaries = canaries  # an audit's canary clients (fedsim.dp.user_canaries)
        self.nonnegative = nonnegative  # arrays clipped at 0 in the new global model
        self.current: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate, keeping the global model that updates are measured from."""
        self.current = arrays
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip each update, sum, add noise, divide by the expected cohort size."""
        if self.current is None:  # Flower always configures a round before aggregating it
            raise RuntimeError("aggregate_train before configure_train")
        base = to_numpy(self.current)
        clipped, unclipped = [], 0
        for msg in replies:
            local = to_numpy(model_arrays(msg.content))
            update, norm = clip({k: local[k] - base[k] for k in base}, self.clip_norm)
            clipped.append(update)
            unclipped += norm <= self.clip_norm
        cohort = len(clipped)
        for canary in self._canaries(server_round):  # each at the clip norm: the worst case
            clipped.append(unflatten(canary * self.clip_norm, base))
            unclipped += 1
        rng = numpy_generator(
            stream_seed(self.root, purpose=Purpose.USER_NOISE, server_round=server_round)
        )
        mean = noisy_mean(
            clipped,
            base,
            std=self.sigma_update * self.clip_norm,
            denominator=self.expected_cohort,
            rng=rng,
        )
        used_clip = self.clip_norm
        if self.quantile > 0:
            fraction = clip_fraction(
                unclipped, len(clipped), std=self.count_noise, cohort=self.expected_cohort, rng=rng
            )
            self.clip_norm *= math.exp(-self.clip_lr * (fraction - self.quantile))
        # one Poisson-subsampled Gaussian release per round, whoever replied
        self.ledger.append(LedgerEntry(server_round, self.z, self.sample_rate, 1))
        released = release(self.current, base, mean)
        # the wrapped strategy sees only the release: its server optimizer is post-processing
        average = Message(average_content(released), 0, MessageType.TRAIN)
        arrays, _ = self.inner.aggregate_train(server_round, [average])
        if arrays is not None:  # after the server optimizer, whose momentum may overshoot
            arrays = clipped_at_zero(arrays, self.nonnegative)
        return arrays, MetricRecord({"clip-norm": used_clip, "cohort": cohort})

    def _canaries(self, server_round: int) -> list[np.ndarray]:
        """The directions of the audit's in-canaries that take part in this round."""
        if self.canaries is None:
            return []
        chosen = self.canaries.sampled(self.sample_rate, root=self.root, server_round=server_round)
        return [self.canaries.direction(i) for i in chosen]
