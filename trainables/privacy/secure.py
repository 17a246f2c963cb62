"""Cryptographically secure randomness for DP-SGD's secret draws: Gaussian noise and Poisson sampling.

DP-SGD's guarantee assumes the noise and the batch membership are unpredictable to the adversary. A seeded
``torch.Generator`` (Mersenne Twister / Philox) is not: its state can be recovered from outputs, and a seed is a
secret that ends up in configs and logs. Opacus' ``secure_mode`` fixes that with torchcsprng, which cannot be
installed with current torch; `SecureRandom` is our replacement:

- **Source.** The ChaCha20 keystream (RFC 8439 block function, OpenSSL through the ``cryptography`` package)
  under a 256-bit key from ``os.urandom``, fresh for every `SecureRandom`. It is never derived from a torch
  or numpy seed, has no state to save and cannot be pickled, so it cannot be reproduced, restored or leaked
  through a checkpoint. Every request uses a new 96-bit nonce (a request counter) under the same key, so no
  keystream block is ever used twice.
- **Uniforms.** ``u = (x >> 11) * 2**-53`` from 64 keystream bits ``x``: 53 random bits, every multiple of
  2**-53 in (0, 1) equally likely; a zero (probability 2**-53) is drawn again, so ``log(u)`` is finite.
- **Gaussians.** Box-Muller in float64: ``sqrt(-2 ln u1) * (cos, sin)(2 pi u2)``, both outputs used.
- **Noise.** Opacus 1.6's ``secure_mode`` recipe (``opacus.optimizers.optimizer._generate_noise``): one
  Gaussian is drawn and thrown away, then the noise is the sum of 4 independent ``N(0, std^2)`` draws divided
  by 2, which is ``N(0, std^2)`` again. Summing 2n = 4 floating-point Gaussians defeats Mironov's (2012)
  attack on the low-order bits of floating-point noise: the attack must then search about 2^(53 (2n-1)) =
  2^159 candidates instead of 2^53 (Holohan & Braghin 2021, section 5.1). Computed in float64, cast to the
  gradient's dtype at the end.
- **Poisson inclusion.** Record i is in the batch iff ``u_i < q``, independently: P = q up to 2**-53.

Everything is generated in bounded chunks on the reference tensor's device (the keystream is made on the CPU
and copied there), so memory stays flat for ConvNeXt-Small's 50M parameters.
"""

from __future__ import annotations

import math
import os
from typing import NoReturn

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms

KEY_BYTES = 32
"""ChaCha20 key length: 256 bits from ``os.urandom``."""

CHUNK_VALUES = 1 << 18
"""Uniforms drawn per keystream request (2 MiB of keystream, reused buffer). Bounds the float64 temporaries of
a noise draw (a few times 2 MiB) whatever the parameter's size. Chunks of 2^16 to 2^20 took the same time on
a 2-core CPU; fewer, larger chunks mean fewer thread-pool wake-ups when the CPU is oversubscribed."""

_MANTISSA_MASK = (1 << 53) - 1
_TWO_POW_MINUS_53 = 2.0**-53


class SecureRandom:
    """A cryptographically secure random source: ChaCha20 keystream under a fresh ``os.urandom`` key.

    Not seedable and not reproducible, by design: two instances (or two processes seeded alike) never give
    the same draws, and an instance cannot be pickled or deep-copied (that would copy its secret key).
    """

    def __init__(self) -> None:
        self._key = os.urandom(KEY_BYTES)
        self._requests = 0
        self._zeros = bytes(8 * CHUNK_VALUES)  # plaintext: ChaCha20 of zeros is the keystream itself
        self._buffer = bytearray(8 * CHUNK_VALUES)  # reused for every chunk (see CHUNK_VALUES)

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            "a SecureRandom cannot be pickled or copied: its key must stay secret and never be reused; "
            "after a restart create a new one (secure-mode runs are not reproducible)"
        )

    def __repr__(self) -> str:
        return f"SecureRandom(ChaCha20, {self._requests} requests)"

    def random_bytes(self, n: int) -> bytearray:
        """``n`` keystream bytes, from a nonce never used before under this key."""
        if not 0 <= n <= 64 << 32:  # one nonce covers 2^32 ChaCha20 blocks of 64 bytes
            raise ValueError(f"random_bytes: n must be in [0, 2**38], got {n}")
        out = bytearray(n)
        self._encryptor().update_into(out, out)  # zeros XOR keystream
        return out

    def _encryptor(self) -> CipherContext:
        """A ChaCha20 stream under this source's key and a nonce never used before with it."""
        nonce = (0).to_bytes(4, "little") + self._requests.to_bytes(12, "little")  # block counter || nonce
        self._requests += 1
        return Cipher(algorithms.ChaCha20(self._key, nonce), mode=None).encryptor()

    def uniform(self, n: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``n`` uniforms in (0, 1), float64: 53 random bits each (``(x >> 11) / 2**53``, zeros drawn again)."""
        device = torch.device("cpu" if device is None else device)
        if n <= CHUNK_VALUES:
            return self._uniform_chunk(n, device)
        out = torch.empty(n, dtype=torch.float64, device=device)
        for start in range(0, n, CHUNK_VALUES):
            stop = min(start + CHUNK_VALUES, n)
            out[start:stop] = self._uniform_chunk(stop - start, out.device)
        return out

    def _uniform_chunk(self, n: int, device: torch.device) -> torch.Tensor:
        mantissa = self._bits53(n, device)
        while n and int(mantissa.min()) == 0:  # probability 2^-53 per value: u = 0 would make log(u) infinite
            zero = mantissa == 0
            mantissa[zero] = self._bits53(int(zero.sum()), device)
        return mantissa.to(torch.float64).mul_(_TWO_POW_MINUS_53)  # exact: 53-bit integers fit a float64

    def _bits53(self, n: int, device: torch.device) -> torch.Tensor:
        """The top 53 bits of ``n <= CHUNK_VALUES`` fresh 64-bit keystream words, as int64 on ``device``."""
        self._encryptor().update_into(memoryview(self._zeros)[: 8 * n], self._buffer)
        words = torch.frombuffer(self._buffer, dtype=torch.int64, count=n)
        # int64 has an arithmetic shift; the mask drops the copies of the sign bit (a logical x >> 11). The
        # shift is not in place: ``words`` is the shared buffer, overwritten by the next request.
        return (
            (words.to(device) if device.type != "cpu" else words).bitwise_right_shift(11).bitwise_and_(_MANTISSA_MASK)
        )

    def standard_normal(self, n: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``n`` independent N(0, 1) draws, float64, by Box-Muller (both outputs of each pair used)."""
        pairs = (n + 1) // 2
        u = self.uniform(2 * pairs, device)
        radius = u[:pairs].log_().mul_(-2.0).sqrt_()
        angle = u[pairs:].mul_(2 * math.pi)
        out = torch.empty(2 * pairs, dtype=torch.float64, device=u.device)
        torch.cos(angle, out=out[:pairs]).mul_(radius)
        torch.sin(angle, out=out[pairs:]).mul_(radius)
        return out[:n]

    def gaussian_noise(self, std: float, reference: torch.Tensor) -> torch.Tensor:
        """N(0, std^2) noise shaped like ``reference``, in its dtype and on its device (Opacus' secure recipe).

        As ``opacus.optimizers.optimizer._generate_noise(std, reference, secure_mode=True)`` without its
        torch generator: zeros when ``std == 0``; otherwise one draw thrown away, then the sum of 4
        ``N(0, std^2)`` draws divided by 2 (see the module docstring), in float64, cast at the end.
        """
        out = torch.zeros(reference.shape, dtype=reference.dtype, device=reference.device)
        if std == 0:
            return out
        self.standard_normal(1, reference.device)  # Opacus throws its first Gaussian away
        flat = out.view(-1)
        chunk = CHUNK_VALUES // 4
        for start in range(0, flat.numel(), chunk):
            stop = min(start + chunk, flat.numel())
            draws = self.standard_normal(4 * (stop - start), reference.device).view(4, -1)
            flat[start:stop] = draws.sum(dim=0).mul_(std / 2)  # = sum of 4 N(0, std^2) draws, / 2 (exact halving)
        return out

    def inclusion_mask(self, n: int, sample_rate: float) -> torch.Tensor:
        """Poisson sampling on the CPU: bool [n], each entry True independently with probability ``sample_rate``.

        ``u < q`` with u uniform on the multiples of 2**-53 in (0, 1): the inclusion probability is
        ``(ceil(q 2^53) - 1) / (2^53 - 1)``, q within 2**-53.
        """
        return self.uniform(n) < sample_rate
