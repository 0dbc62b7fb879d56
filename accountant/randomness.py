"""Random sources for noise sampling: seeded (reproducible) or cryptographically secure.

``make_rng(seed)`` returns a numpy ``Generator`` (PCG64) for experiments.  ``make_rng(secure=True)``
returns :class:`SecureRandom`, a ChaCha20 keystream (package ``cryptography``) keyed with 256 bits from
the OS CSPRNG (``os.urandom``); docs/soundness.md rule 8.  Its cost: about 2x a PCG64 draw for table sampling
(benchmarks/finetune_bench.py measures it).

Both sources provide raw 64-bit words; noise samplers turn them into exact draws:
``tabulated_draw`` (a compiled inverse-CDF lookup on the 2^-53 lattice) and ``uniform_open`` (uniforms
with 106 random bits, so inverse-CDF tails reach probabilities far below 2^-53).
"""
from __future__ import annotations

import os
import warnings

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


class KnownSeedWarning(UserWarning):
    """A fixed seed was given for noise or sampling: the run is reproducible by anyone who knows it."""


def known_seed_message(seed) -> str:
    """Why a known seed voids the guarantee (docs/privacy.md, "Randomness")."""
    return (f"seed {seed} makes the sampling and the noise reproducible: anyone who knows it can replay the "
            "run with and without a record and decide membership with certainty, so the printed epsilon "
            "holds only against an adversary who does not know the seed; use a seed for experiments, "
            "never for a model you release")


def warn_known_seed(seed, stacklevel: int = 2) -> None:
    """Warn (:class:`KnownSeedWarning`) that ``seed`` makes noise and sampling public."""
    warnings.warn(known_seed_message(seed), KnownSeedWarning, stacklevel=stacklevel + 1)


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


#: a cell holding at least 2^33 lattice points places its point with the selecting word itself
#: (offset inside the cell and the word's 11 unused low bits: at least 2^44 positions per cell)
REUSE_POINTS = 2 ** 33


@numba.njit(cache=True, inline="always")
def _select(key, cum, guide, shift):  # pragma: no cover - compiled
    """Exact table inversion: the first index with cum[idx] > key (guide table, Chen & Asau 1974)."""
    idx = guide[key >> shift]
    while cum[idx] <= key:
        idx += 1
    return idx


@numba.njit(cache=True, inline="always")
def _place(idx, v, edges, rate):  # pragma: no cover - compiled
    """The point at relative position v in (0, 1) of cell idx (0 and nbins+1 are the tails)."""
    nbins = edges.shape[0] - 1
    if idx == 0:
        return -(edges[nbins] - np.log(v) / rate)
    if idx == nbins + 1:
        return edges[nbins] - np.log(v) / rate
    return edges[idx - 1] + v * (edges[idx] - edges[idx - 1])


@numba.njit(cache=True, inline="always")
def _reused_position(word, idx, cum):  # pragma: no cover - compiled
    """Given the word's top 53 bits (key) fell in cell idx, key - (cell start) is uniform on the
    cell's m lattice points and independent of the selection; with the word's 11 low bits it is
    uniform on m 2^11 points.  Returns the relative position in (0, 1), or -1 when m < 2^33 and a
    fresh word is needed."""
    key = np.int64(word >> np.uint64(11))
    low = cum[idx - 1] if idx > 0 else 0
    m = cum[idx] - low
    if m >= REUSE_POINTS:
        fine = np.float64(key - low) * 2048.0 + np.float64(word & np.uint64(2047)) + 0.5
        return fine / (np.float64(m) * 2048.0)
    return -1.0


@numba.njit(cache=True, nogil=True, parallel=True)
def _draw_reusing(words, cum, guide, shift, edges, rate):  # pragma: no cover - compiled
    """One word per draw; NaN marks the rare draws from tiny cells (mass < 2^-20) that need a fresh
    word; returns the draws and how many need one."""
    n = words.shape[0]
    out = np.empty(n, dtype=np.float64)
    missing = 0
    for i in numba.prange(n):
        idx = _select(np.int64(words[i] >> np.uint64(11)), cum, guide, shift)
        v = _reused_position(words[i], idx, cum)
        if v >= 0:
            out[i] = _place(idx, v, edges, rate)
        else:
            out[i] = np.nan
            missing += 1
    return out, missing


@numba.njit(cache=True, nogil=True)
def _draw_fresh(keys, fresh, cum, guide, shift, edges, rate):  # pragma: no cover - compiled
    n = keys.shape[0]
    out = np.empty(n, dtype=np.float64)
    for i in range(n):
        idx = _select(np.int64(keys[i] >> np.uint64(11)), cum, guide, shift)
        v = (np.float64(fresh[i] >> np.uint64(11)) + 0.5) * 2.0 ** -53
        out[i] = _place(idx, v, edges, rate)
    return out


GUIDE_BITS_EXTRA = 2


def tabulated_draw(cum: np.ndarray, edges: np.ndarray, rate: float, n: int, rng) -> np.ndarray:
    """Exact draws from a lattice table.

    ``cum`` holds cumulative integer counts (total 2^53) over [left tail, core bins..., right tail]:
    a uniform 53-bit integer selects each cell with exactly its stored probability, and the same
    word (its offset inside the cell and 11 spare low bits) places the point uniformly in a cell of
    at least 2^33 lattice points, on a grid of at least 2^44 positions; a tiny cell (mass < 2^-20:
    far bins and tails) takes a fresh 53-bit word.  The words come in bulk from the
    Generator's own bit generator (reproducible: the result depends only on the seed, not on the
    thread count) or from :class:`SecureRandom` (ChaCha20).
    """
    bits = min(int(np.ceil(np.log2(len(cum)))) + GUIDE_BITS_EXTRA, 24)
    shift = 53 - bits
    guide = np.searchsorted(cum, np.arange(2 ** bits, dtype=np.int64) << shift, side="right")
    rate = float(rate) if rate > 0 else 1.0
    guide = guide.astype(np.int64)
    keys = raw_words(rng, int(n))
    out, missing = _draw_reusing(keys, cum, guide, shift, edges, rate)
    if missing:
        need = np.flatnonzero(np.isnan(out))
        out[need] = _draw_fresh(keys[need], raw_words(rng, need.size), cum, guide, shift, edges, rate)
    return out
