"""What publishing each round's cohort size would cost a user-level ε.

    python -m experiments.research.cohort_sizes [--rdp-only]

Under ``dp = user`` a round samples each of N clients with probability q, clips their
updates, adds Gaussian noise to the sum and releases it; the accountants compose T such
Poisson-subsampled Gaussian releases. A reader who also learns the round's cohort size K
learns more: the relation zeroes out one client's update, so K has the same law with and
without it, but given K the client was sampled with probability K/N, not q. The release
is then a mixture over K of subsampled Gaussians at rate K/N, with K ~ Binomial(N, q) in
both worlds. Its privacy loss is the K-weighted mixture of the per-K losses, which by
convexity is never below the release at q alone, so fedsim keeps the sizes in
``private/`` (``server/outputs.py``).

Two computations, each against the same release without the sizes:

- ``rdp``: for a mixture whose label K both worlds share, exp((α−1)·D_α) is the
  K-weighted mean of the per-K exp((α−1)·D_α) (Opacus's RDP of the subsampled Gaussian);
  composed over T rounds and turned into ε as fedsim's ``rdp`` accountant does.
- ``pld``: Google's dp-accounting, mixing the per-K privacy loss distributions with the
  Binomial weights and composing T of them (a tighter number; it reads the PLD's
  internal probability arrays, so it follows dp-accounting 0.4's layout).
"""

from __future__ import annotations

import argparse

import numpy as np
from dp_accounting.pld import pld_pmf
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from opacus.accountants.analysis import rdp as rdp_analysis
from scipy.special import logsumexp
from scipy.stats import binom

from fedsim.dp.accounting import RDP_ORDERS

# (clients N, rate q, noise multiplier σ, rounds T): the 1,000-client frontier's ends
# (docs/privacy.md), then smaller federations, where one client moves K/N further
CASES = ((1000, 0.1, 2.7051, 40), (1000, 0.1, 0.7695, 40), (100, 0.1, 1.0, 30),
         (20, 0.25, 1.5, 20), (10, 0.3, 1.0, 30))  # fmt: skip
DELTA = 1e-5
TAIL = 1e-13  # Binomial weights below this are dropped (and the rest renormalised)


def cohort_sizes(n: int, q: float) -> tuple[np.ndarray, np.ndarray]:
    """The cohort sizes K ~ Binomial(n, q) worth counting, and their probabilities."""
    k = np.arange(n + 1)
    w = binom.pmf(k, n, q)
    keep = w > TAIL
    return k[keep], w[keep] / w[keep].sum()


def _rdp(q: float, sigma: float, orders: np.ndarray) -> np.ndarray:
    """Opacus's RDP curve of one Poisson-subsampled Gaussian release."""
    curve = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(orders))
    return np.asarray(curve, dtype=float)


def rdp_epsilons(n: int, q: float, sigma: float, rounds: int, delta: float) -> tuple[float, float]:
    """(ε without the sizes, ε with every round's size published), both by RDP."""
    orders = np.asarray(RDP_ORDERS, dtype=float)
    k, w = cohort_sizes(n, q)
    per_k = np.stack([_rdp(float(kk) / n, sigma, orders) for kk in k])  # (sizes, orders)
    # log E_K exp((α−1)·D_α(K)), divided back by (α−1)
    mixed = logsumexp((orders - 1) * per_k, b=w[:, None], axis=0) / (orders - 1)
    eps = [
        rdp_analysis.get_privacy_spent(orders=list(orders), rdp=list(rounds * r), delta=delta)[0]
        for r in (_rdp(q, sigma, orders), mixed)
    ]
    return float(eps[0]), float(eps[1])


def _dense(pmf: pld_pmf.PLDPmf) -> pld_pmf.DensePLDPmf:
    return pmf.to_dense_pmf() if isinstance(pmf, pld_pmf.SparsePLDPmf) else pmf


def _mix(pmfs: list[pld_pmf.PLDPmf], weights: np.ndarray, step: float) -> pld_pmf.DensePLDPmf:
    dense = [_dense(p) for p in pmfs]
    low = min(p._lower_loss for p in dense)
    probs = np.zeros(max(p._lower_loss + len(p._probs) for p in dense) - low)
    infinity = 0.0
    for p, w in zip(dense, weights, strict=True):
        probs[p._lower_loss - low : p._lower_loss - low + len(p._probs)] += w * p._probs
        infinity += w * p._infinity_mass
    return pld_pmf.DensePLDPmf(step, low, probs, infinity, pessimistic_estimate=True)


def pld_epsilons(
    n: int, q: float, sigma: float, rounds: int, delta: float, step: float = 1e-3
) -> tuple[float, float]:
    """(ε without the sizes, ε with every round's size published), both by PLD."""
    plain = pld_lib.from_gaussian_mechanism(
        sigma, sampling_prob=q, value_discretization_interval=step
    )
    k, w = cohort_sizes(n, q)
    per_k = [
        pld_lib.from_gaussian_mechanism(
            sigma, sampling_prob=max(float(kk) / n, TAIL), value_discretization_interval=step
        )
        for kk in k
    ]
    mixed = pld_lib.PrivacyLossDistribution(
        _mix([p._pmf_remove for p in per_k], w, step), _mix([p._pmf_add for p in per_k], w, step)
    )
    return tuple(  # type: ignore[return-value]
        float(p.self_compose(rounds).get_epsilon_for_delta(delta)) for p in (plain, mixed)
    )


def main() -> None:
    """Print, per case and accountant, ε without and with the cohort sizes published."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rdp-only", action="store_true", help="skip the slower PLD rows")
    args = parser.parse_args()
    print(f"δ = {DELTA:g}")
    print("| N | q | σ | rounds | accountant | ε accounted | ε with sizes published | more |")
    print("|---|---|---|---|---|---|---|---|")
    for n, q, sigma, rounds in CASES:
        for name, fn in (("rdp", rdp_epsilons), ("pld", pld_epsilons)):
            if name == "pld" and args.rdp_only:
                continue
            plain, published = fn(n, q, sigma, rounds, DELTA)
            print(f"| {n} | {q} | {sigma} | {rounds} | {name} | {plain:.3f} | "
                  f"{published:.3f} | {100 * (published / plain - 1):+.1f}% |")  # fmt: skip


if __name__ == "__main__":
    main()
