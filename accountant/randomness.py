"""Random sources for noise sampling: seeded (reproducible) or cryptographically secure.

``make_rng(seed)`` returns a numpy ``Generator`` (PCG64) for experiments.  ``make_rng(secure=True)``
returns :class:`SecureRandom`, a ChaCha20 keystream (package ``cryptography``) keyed with 256 bits from
the OS CSPRNG (``os.urandom``); DESIGN.md rule 8.  Its cost: about 2x a PCG64 draw for table sampling
(benchmarks/finetune_bench.py measures it).

Both sources provide raw 64-bit words; noise samplers turn them into exact draws:
``tabulated_draw`` (a compiled inverse-CDF lookup on the 2^-53 lattice) and ``uniform_open`` (uniforms
with 106 random bits, so inverse-CDF tails reach probabilities far below 2^-53).
"""
from __future__ import annotations

import os

import numba
import numpy as np


class SecureRandom:
    """ChaCha20 keystream keyed from ``os.urandom``: a CSPRNG producing raw uint64 words."""

    def __init__(self):
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        key, nonce = os.urandom(32), os.urandom(16)
        self._encryptor = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()

    def random_raw(self, n: int) -> np.ndarray:
        stream = self._encryptor.update(bytes(8 * int(n)))
        return np.frombuffer(stream, dtype="<u8").astype(np.uint64, copy=False)


def make_rng(seed: int | None = None, secure: bool = False):
    """A numpy Generator seeded with ``seed`` or, with ``secure=True``, a :class:`SecureRandom`."""
    if secure:
        if seed is not None:
            raise ValueError("a secure generator cannot be seeded; drop the seed or secure=True")
        return SecureRandom()
    return np.random.Generator(np.random.PCG64(seed))


def raw_words(rng, n: int) -> np.ndarray:
    """``n`` uniformly random uint64 words from either kind of source."""
    if isinstance(rng, np.random.Generator):
        return rng.bit_generator.random_raw(int(n)).astype(np.uint64, copy=False)
    return rng.random_raw(int(n))


def uniform_open(rng, n: int) -> np.ndarray:
    """Uniforms in (0, 1) built from 106 random bits: u = (a + (b + 1/2) 2^-53) 2^-53."""
    words = raw_words(rng, 2 * int(n)) >> np.uint64(11)
    a = words[0::2].astype(np.float64)
    b = words[1::2].astype(np.float64)
    return (a + (b + 0.5) * 2.0 ** -53) * 2.0 ** -53


def sign_bits(rng, n: int) -> np.ndarray:
    return (raw_words(rng, n) >> np.uint64(63)).astype(bool)


@numba.njit(cache=True, inline="always")
def _place(key, v, cum, guide, shift, edges, rate):  # pragma: no cover - compiled
    """Exact table inversion: bin = first index with cum[idx] > key (guide table, Chen & Asau 1974)."""
    idx = guide[key >> shift]
    while cum[idx] <= key:
        idx += 1
    nbins = edges.shape[0] - 1
    if idx == 0:
        return -(edges[nbins] - np.log(v) / rate)
    if idx == nbins + 1:
        return edges[nbins] - np.log(v) / rate
    return edges[idx - 1] + v * (edges[idx] - edges[idx - 1])


_KERNELS: dict = {}


def _generator_kernel(bit_generator):
    """A compiled sampler reading 64-bit words straight from a numpy bit generator through its
    documented ctypes interface (numpy "Extending via Numba"); one kernel per bit-generator type."""
    kind = type(bit_generator)
    if kind not in _KERNELS:
        next_u64 = bit_generator.ctypes.next_uint64

        @numba.njit(nogil=True)
        def kernel(n, state, cum, guide, shift, edges, rate):  # pragma: no cover - compiled
            out = np.empty(n, dtype=np.float64)
            for i in range(n):
                key = np.int64(next_u64(state) >> np.uint64(11))
                v = (np.float64(next_u64(state) >> np.uint64(11)) + 0.5) * 2.0 ** -53
                out[i] = _place(key, v, cum, guide, shift, edges, rate)
            return out

        _KERNELS[kind] = kernel
    return _KERNELS[kind]


@numba.njit(cache=True, nogil=True)
def _draw_words(words, cum, guide, shift, edges, rate):  # pragma: no cover - compiled
    n = words.shape[0] // 2
    out = np.empty(n, dtype=np.float64)
    for i in range(n):
        key = np.int64(words[2 * i] >> np.uint64(11))
        v = (np.float64(words[2 * i + 1] >> np.uint64(11)) + 0.5) * 2.0 ** -53
        out[i] = _place(key, v, cum, guide, shift, edges, rate)
    return out


GUIDE_BITS_EXTRA = 2


def tabulated_draw(cum: np.ndarray, edges: np.ndarray, rate: float, n: int, rng) -> np.ndarray:
    """Exact draws from a lattice table.

    ``cum`` holds cumulative integer counts (total 2^53) over [left tail, core bins..., right tail]:
    a uniform 53-bit integer selects each cell with exactly its stored probability.  With a numpy
    Generator the words come from its own bit generator (reproducible, advances its state); with
    :class:`SecureRandom` they are ChaCha20 words.
    """
    bits = min(int(np.ceil(np.log2(len(cum)))) + GUIDE_BITS_EXTRA, 24)
    shift = 53 - bits
    guide = np.searchsorted(cum, np.arange(2 ** bits, dtype=np.int64) << shift, side="right")
    rate = float(rate) if rate > 0 else 1.0
    if isinstance(rng, np.random.Generator):
        bitgen = rng.bit_generator
        kernel = _generator_kernel(bitgen)
        with bitgen.lock:
            return kernel(int(n), bitgen.ctypes.state_address, cum, guide.astype(np.int64), shift,
                          edges, rate)
    return _draw_words(raw_words(rng, 2 * int(n)), cum, guide.astype(np.int64), shift, edges, rate)
