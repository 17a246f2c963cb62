"""Where DP-SGD's secret randomness comes from: the Poisson sampler's and the Gaussian noise's sources.

DP-SGD's guarantee assumes the adversary cannot predict which records a batch holds or which noise was
added. A seed that is published (``cfg.seed`` is an MLflow param and a trials.parquet column) voids that:
replaying a trial from its logged config reproduces its noise, and a membership attacker who knows the
other records can compare both worlds. So a private trial draws its streams from one of:

- ``default``: two ``torch.Generator`` streams seeded from ``os.urandom`` (`secret_seed`, 128 bits each),
  never from ``cfg.seed``. The seeds and the generators' states are kept only in the trial's epoch checkpoints,
  so resume stays bit-exact; checkpoints are therefore private material. They stay there only while the trial
  can be resumed: when it ends (TERMINATED, STOPPED by ASHA, ERROR after its retries) the sweep's driver removes
  them from every checkpoint of the trial (`trainables.train.scrub_secrets`, `sweeps.scrub`), and again at the end
  of every sweep; a trial of an interrupted sweep (INCOMPLETE) keeps them until the sweep is resumed and completes,
  and ``dpsweep sweep --fresh`` deletes the sweep's checkpoints. The generators are not
  cryptographically secure (Mersenne Twister on the CPU, Philox on CUDA) and the noise is plain
  floating-point Gaussian noise: the guarantee assumes both are ideal (``secure_mode`` removes that).
- ``secure``: ``privacy.secure_mode``, a `SecureRandom` (ChaCha20 under a fresh ``os.urandom`` key, the
  4-Gaussian floating-point defence); nothing to checkpoint, a resumed trial draws from a new key.
- ``reproducible``: ``privacy.reproducible_noise``, for debugging: the seeded streams of ``cfg.seed``
  (``seed * 1000 + 1`` sampler, ``seed * 1000 + 2`` noise). The seed is published, so the trial has no DP
  guarantee (`trainables.privacy.guarantee`).

A non-private trial has no mechanism: its shuffling stays seeded by ``cfg.seed`` (reproducible), and it has
no noise source.

Why a CPU generator is not just ``manual_seed(secret)``: torch's CPU generator (mt19937) keeps only the low
32 bits of an integer seed, so a 128-bit secret would be a 32-bit one. `generator_from_seed` fills all 624
words of the Mersenne Twister state instead (numpy's ``SeedSequence`` expands the seed); a CUDA generator
(Philox) takes a 64-bit seed derived the same way.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from trainables.config import PrivacyConfig
from trainables.privacy.secure import SecureRandom

SEED_BYTES = 16
"""Secret seeds are 128 bits from ``os.urandom``."""

Source = torch.Generator | SecureRandom
RandomnessMode = Literal["default", "secure", "reproducible", "non_private"]

_MT_WORDS = 624
_MT_HEADER = struct.Struct("<QiiQ")  # torch's CPU generator state: initial seed, left, seeded, next; then 624 uint64
_MT_STATE_BYTES = _MT_HEADER.size + 8 * _MT_WORDS


def randomness_mode(privacy: PrivacyConfig) -> RandomnessMode:
    """Which source a trial's mechanism uses (see the module docstring).

    Raises:
        ValueError: ``secure_mode`` and ``reproducible_noise`` together (secure draws cannot be replayed).
    """
    if not privacy.is_private:
        return "non_private"
    if privacy.secure_mode and privacy.reproducible_noise:
        raise ValueError(
            "privacy.secure_mode and privacy.reproducible_noise exclude each other: secure draws "
            "cannot be reproduced; set one of them to false"
        )
    if privacy.secure_mode:
        return "secure"
    return "reproducible" if privacy.reproducible_noise else "default"


def secret_seed() -> int:
    """A fresh 128-bit seed from the operating system's CSPRNG (``os.urandom``)."""
    return int.from_bytes(os.urandom(SEED_BYTES), "little")


def generator_from_seed(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` whose whole state is derived from ``seed`` (any non-negative int).

    CPU (mt19937): the 624 state words are ``SeedSequence(seed).generate_state(624)``, so every bit of the seed
    matters (``manual_seed`` would keep 32). CUDA (Philox): ``manual_seed`` of a 64-bit word derived the same way.
    Deterministic: equal seeds give equal streams.
    """
    generator = torch.Generator(device=device)
    if generator.device.type != "cpu":
        return generator.manual_seed(int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0]))
    state = generator.get_state()
    head = bytes(state[: _MT_HEADER.size].tolist())
    _, left, seeded, _ = _MT_HEADER.unpack(head)
    if len(state) < _MT_STATE_BYTES or (left, seeded) != (1, 1):
        raise RuntimeError(
            f"torch {torch.__version__}'s CPU generator state has an unknown layout; "
            "trainables.privacy.randomness must be updated"
        )
    words = np.random.SeedSequence(seed).generate_state(_MT_WORDS, np.uint32).astype("<u8")
    # left = 1: the first draw twists the whole new state first, as after manual_seed.
    state[_MT_HEADER.size : _MT_STATE_BYTES] = torch.from_numpy(words.view(np.uint8).copy())
    generator.set_state(state)
    return generator


@dataclass(frozen=True)
class MechanismRandomness:
    """A trial's random sources for Poisson sampling (or shuffling) and noise.

    Attributes:
        mode: which of the module docstring's sources.
        sampler: batch membership (Poisson sampling; the non-private trial's shuffling), on the CPU.
        noise: the Gaussian noise, on the gradients' device; None for a non-private trial.
        secret_seeds: ``{"sampler": int, "noise": int}`` from ``os.urandom`` in the default mode, else None.
            Private material: only the checkpoints of a trial that has not ended may hold it.
    """

    mode: RandomnessMode
    sampler: Source
    noise: Source | None
    secret_seeds: dict[str, int] | None

    def __repr__(self) -> str:  # never print the secret seeds
        return f"MechanismRandomness(mode={self.mode!r})"


def mechanism_randomness(privacy: PrivacyConfig, seed: int, device: torch.device) -> MechanismRandomness:
    """The random sources of a trial with public seed ``seed`` (``cfg.seed``), noise on ``device``; the default
    mode draws fresh secret seeds (a resumed trial then restores the checkpoint's generator states)."""
    mode = randomness_mode(privacy)
    if mode == "secure":
        source = SecureRandom()  # fresh OS key: nothing to seed or restore
        return MechanismRandomness(mode, source, source, None)
    if mode == "default":
        seeds = {"sampler": secret_seed(), "noise": secret_seed()}
        return MechanismRandomness(
            mode, generator_from_seed(seeds["sampler"]), generator_from_seed(seeds["noise"], device), seeds
        )
    sampler = torch.Generator().manual_seed(seed * 1000 + 1)  # published seed: shuffling, or reproducible noise
    noise = torch.Generator(device=device).manual_seed(seed * 1000 + 2) if mode == "reproducible" else None
    return MechanismRandomness(mode, sampler, noise, None)
