"""DP-SGD's parts: per-sample clipping, the sampling schedule, randomness and accounting.

The public face of the package. ``fast_clip`` clips per-sample gradients in one backward
pass (``clip_rules`` and ``per_sample`` hold its per-layer math, ``fast_lstm`` and
``lstm_recurrence`` an LSTM with exact per-sample gradients, ``attention`` a drop-in for
``nn.MultiheadAttention``, ``time_first`` torch's time-first transformer layers run
batch-first inside; ``loss`` the per-sample loss the clients train; ``clip_check`` tries
a model in a mode before any round, and ``bound_check`` that it keeps each sample's
clipped gradient within the bound); ``schedule`` is the one place that fixes a client's
(q, steps); ``randomness`` gives every (round, client, purpose) its own stream, and
``noise`` draws a step's Gaussian noise from it in one call and adds it in fused
operations; ``accounting`` turns histories into ε and ``solve`` targets into σ; ``cohort`` trains
K clients' DP-SGD at once, vectorized with torch.func (``cohort_step``: one client's
step inside vmap, clipping in one backward pass; ``cohort_update``: each client's noise
and SGD update); ``recurrent`` swaps torch's recurrent layers for ones that compute the
same and that DP-SGD or vmap can run; ``canaries`` builds a one-run audit's canaries and
``audit`` turns its guesses into an ε lower bound; ``user_canaries`` makes the canary
clients of a user-level audit.

The accountants load on first use (PEP 562): they import Google's dp-accounting, about
0.5 s of a process's start-up on top of what Opacus imports anyway (the client app's
import: 5.5 s -> 5.1 s on 2 cores), and a client worker never accounts (the server does).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from fedsim.dp.attention import DPMultiheadAttention, dp_attention, replace_attention
from fedsim.dp.audit import OneRunAudit, best_guesses, epsilon_ceiling, one_run_epsilon
from fedsim.dp.bound_check import check_clip_bound
from fedsim.dp.canaries import Canaries, audit_record, canary_seed, canary_set, make_canaries
from fedsim.dp.clip_check import check_clippable, check_cohort_step
from fedsim.dp.cohort import CohortUpdate, train_cohort
from fedsim.dp.cohort_step import cohort_clipping
from fedsim.dp.fast_clip import (
    FastClipper,
    make_private_fast,
    per_sample_cross_entropy,
    poisson_loader,
)
from fedsim.dp.fast_lstm import FastDPLSTM
from fedsim.dp.loss import next_char_targets
from fedsim.dp.private import (
    GRAD_SAMPLE_MODES,
    PrivateTraining,
    choose_grad_sample,
    make_private,
    new_engine,
)
from fedsim.dp.randomness import (
    DPRandomness,
    Purpose,
    dp_randomness,
    numpy_generator,
    secure_dp_randomness,
    secure_root,
    seeded_root,
    stream_seed,
    torch_generator,
)
from fedsim.dp.recurrent import check_cohort_model, dp_recurrent, vectorizable, with_rnn_names
from fedsim.dp.sample_check import PROBE_SAMPLES, check_samples_apart
from fedsim.dp.schedule import Schedule, poisson_schedule, run_schedules
from fedsim.dp.user_canaries import UserCanaries, gaussian_estimate, gdp_epsilon

if TYPE_CHECKING:
    from fedsim.dp import accounting, solve
    from fedsim.dp.accounting import (
        ACCOUNTANTS,
        RDP_ORDERS,
        REPLACE_ONE,
        History,
        group_accountant,
        history_epsilon,
        merged_history,
        pooled_epsilon,
    )
    from fedsim.dp.solve import check_reachable, solve_noise_multiplier

# name -> the module that defines it: the accountants' names, and the two modules
_LAZY = {
    **dict.fromkeys(
        ("ACCOUNTANTS", "RDP_ORDERS", "REPLACE_ONE", "History", "group_accountant",
         "history_epsilon", "merged_history", "pooled_epsilon"),
        "fedsim.dp.accounting",
    ),
    **dict.fromkeys(("check_reachable", "solve_noise_multiplier"), "fedsim.dp.solve"),
    "accounting": "fedsim.dp.accounting",
    "solve": "fedsim.dp.solve",
}  # fmt: skip


def __getattr__(name: str) -> object:
    """The accounting and solving names, and their modules, imported when first asked for."""
    if name not in _LAZY:
        raise AttributeError(f"module 'fedsim.dp' has no attribute '{name}'")
    module = importlib.import_module(_LAZY[name])
    return module if name in ("accounting", "solve") else getattr(module, name)


__all__ = [
    "ACCOUNTANTS",
    "GRAD_SAMPLE_MODES",
    "PROBE_SAMPLES",
    "RDP_ORDERS",
    "REPLACE_ONE",
    "Canaries",
    "CohortUpdate",
    "DPMultiheadAttention",
    "DPRandomness",
    "FastClipper",
    "FastDPLSTM",
    "History",
    "OneRunAudit",
    "PrivateTraining",
    "Purpose",
    "Schedule",
    "UserCanaries",
    "accounting",
    "audit_record",
    "best_guesses",
    "canary_seed",
    "canary_set",
    "check_clip_bound",
    "check_clippable",
    "check_cohort_model",
    "check_cohort_step",
    "check_reachable",
    "check_samples_apart",
    "choose_grad_sample",
    "cohort_clipping",
    "dp_attention",
    "dp_randomness",
    "dp_recurrent",
    "epsilon_ceiling",
    "gaussian_estimate",
    "gdp_epsilon",
    "group_accountant",
    "history_epsilon",
    "make_canaries",
    "make_private",
    "make_private_fast",
    "merged_history",
    "new_engine",
    "next_char_targets",
    "numpy_generator",
    "one_run_epsilon",
    "per_sample_cross_entropy",
    "poisson_loader",
    "poisson_schedule",
    "pooled_epsilon",
    "replace_attention",
    "run_schedules",
    "secure_dp_randomness",
    "secure_root",
    "seeded_root",
    "solve",
    "solve_noise_multiplier",
    "stream_seed",
    "torch_generator",
    "train_cohort",
    "vectorizable",
    "with_rnn_names",
]
