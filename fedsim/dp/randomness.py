"""Random streams: one independent generator per (run, round, client, purpose).

Randomness is part of a DP mechanism: the Gaussian noise and who is sampled must be
unknown to whoever the ε protects against. A run has one 256-bit *root*:

- ``secure_root()``: from the operating system's CSPRNG, never written anywhere. The
  noise cannot be rebuilt by the server (for clients' roots), by readers of the results,
  or by anyone holding the config. Runs cannot be repeated exactly.
- ``seeded_root(seed)``: a hash of the config's ``seed``. The run can be repeated, and
  anyone who knows the seed can recompute every noise value and sample.

Every stream's seed is a keyed BLAKE2b hash (a PRF) of (purpose, round, client) under the
root: 256 bits, so distinct keys never share a stream in practice. torch's CPU generator
(MT19937) keeps only the low 32 bits of ``manual_seed``, so :func:`torch_generator` fills
its whole 19,937-bit state from the stream seed instead.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch

from fedsim.errors import FedsimError

ROOT_BYTES = 32
_MT_WORDS = 624
# torch's CPUGeneratorImplState: the legacy THGeneratorState, then the float normal cache
_MT_STATE = np.dtype(
    [
        ("seed", "<u8"),
        ("left", "<i4"),
        ("seeded", "<i4"),
        ("next", "<u8"),
        ("state", "<u8", (_MT_WORDS,)),
        ("normal_x", "<f8"),
        ("normal_y", "<f8"),
        ("normal_rho", "<f8"),
        ("normal_is_valid", "<i4"),
        ("pad", "<i4"),
        ("next_float_normal", "<f4"),
        ("float_normal_valid", "u1"),
        ("pad2", "u1", (3,)),
    ]
)


class Purpose(IntEnum):
    """What a stream is used for; each purpose has streams of its own."""

    COHORT = 1  # server: which clients train in a round
    USER_NOISE = 2  # server: user-level noise on the sum of updates and on the clip count
    BATCHES = 3  # client: DP-SGD's Poisson masks
    SGD_NOISE = 4  # client: DP-SGD's Gaussian noise
    LOCAL = 5  # client: other randomness of local training (not part of a DP mechanism)
    FAULTS = 6  # client: simulated dropouts and stragglers (an experiment's design)
    CANARIES = 7  # everyone: a privacy audit's canaries and which are in (always seeded)
    USER_CANARIES = 8  # server: a user-level audit's canary directions and membership (seeded)
    CANARY_SAMPLING = 9  # server: in which rounds a user-level canary takes part


def secure_root() -> bytes:
    """A root from the operating system's CSPRNG; callers never store it."""
    return secrets.token_bytes(ROOT_BYTES)


def seeded_root(seed: int) -> bytes:
    """The root of a reproducible run: anyone who knows ``seed`` can recompute it."""
    return hashlib.blake2b(b"fedsim-seed:%d" % seed, digest_size=ROOT_BYTES).digest()


def stream_seed(root: bytes, *, purpose: Purpose, server_round: int, client: int = 0) -> bytes:
    """The 256-bit seed of the stream for (purpose, round, client) under ``root``."""
    if server_round < 0 or client < 0:
        raise FedsimError(f"stream keys must be >= 0, got round {server_round}, client {client}")
    message = b"%d/%d/%d" % (int(purpose), server_round, client)
    return hashlib.blake2b(message, key=root, digest_size=ROOT_BYTES).digest()


def numpy_generator(seed: bytes) -> np.random.Generator:
    """A numpy generator (PCG64, 128-bit state) on one stream."""
    return np.random.Generator(np.random.PCG64(int.from_bytes(seed, "little")))


def torch_generator(seed: bytes, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator on one stream, for ``device``.

    CUDA's generator (Philox) takes a 64-bit key: the seed's first 8 bytes, so a GPU
    stream has 64 secret bits, not 256 (README, "Who the privacy protects against"). The
    CPU generator gets the full MT19937 state: 624 words expanded from the 256-bit seed by
    SHAKE-256.
    """
    device = torch.device(device)
    generator = torch.Generator(device=device)
    if device.type != "cpu":
        generator.manual_seed(int.from_bytes(seed[:8], "little"))
        return generator
    state = np.zeros((), _MT_STATE)
    words = np.frombuffer(hashlib.shake_256(seed).digest(4 * _MT_WORDS), "<u4")
    state["seed"] = int.from_bytes(seed[:8], "little")
    state["state"] = words
    state["seeded"], state["left"], state["next"] = 1, 1, 0  # left 1: twist on first draw
    raw = torch.from_numpy(np.frombuffer(state.tobytes(), np.uint8).copy())
    if raw.numel() != generator.get_state().numel():
        raise FedsimError(
            "this torch's CPU generator state has an unknown layout; "
            "fedsim supports the torch versions its pyproject.toml allows"
        )
    generator.set_state(raw)
    return generator


@dataclass(frozen=True)
class DPRandomness:
    """Where one client's DP-SGD draws its randomness in one round.

    ``secure`` also turns on Opacus's floating-point-safe noise (the sum of four
    Gaussians, against attacks on the low bits of a single sample).
    """

    batches: torch.Generator  # CPU: Opacus's Poisson sampler draws its masks there
    noise: torch.Generator  # on the training device
    secure: bool


def dp_randomness(
    root: bytes, *, server_round: int, client: int, device: str | torch.device, secure: bool
) -> DPRandomness:
    """The Poisson-mask and noise streams of ``client`` in ``server_round`` under ``root``."""
    key = {"server_round": server_round, "client": client}
    return DPRandomness(
        batches=torch_generator(stream_seed(root, purpose=Purpose.BATCHES, **key)),
        noise=torch_generator(stream_seed(root, purpose=Purpose.SGD_NOISE, **key), device),
        secure=secure,
    )


def secure_dp_randomness(device: str | torch.device = "cpu") -> DPRandomness:
    """DP-SGD randomness from the operating system's CSPRNG (the safe default)."""
    return dp_randomness(secure_root(), server_round=0, client=0, device=device, secure=True)
