"""Random sources for noise sampling: seeded (reproducible) or cryptographically secure.

``make_rng(seed)`` returns a numpy ``Generator`` (PCG64) for experiments.  ``make_rng(secure=True)``
returns :class:`SecureRandom`, a ChaCha20 keystream (package ``cryptography``) keyed with 256 bits from
the OS CSPRNG (``os.urandom``); docs/soundness.md rule 8.  Its cost: about 2x a PCG64 draw for table sampling
(benchmarks/finetune_bench.py), 1.4x for the Gaussian (benchmarks/secure_normal_bench.py).

Both sources provide raw 64-bit words; noise samplers turn them into exact draws:
``tabulated_draw`` (a compiled inverse-CDF lookup on the 2^-53 lattice), ``uniform_open`` (uniforms
with 106 random bits, so inverse-CDF tails reach probabilities far below 2^-53) and
``standard_normal`` (the ziggurat, about one word a Gaussian draw; docs/privacy.md, "The secure
Gaussian draw").
"""
from __future__ import annotations

import math
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


# --- Gaussian draws from raw words: the ziggurat -------------------------------------------------
#
# Marsaglia & Tsang, "The Ziggurat Method for Generating Random Variables", J. Stat. Softw. 5(8),
# 2000: 256 layers of equal area under f(x) = exp(-x^2/2), the base layer carrying the tail beyond
# r, which is drawn by Marsaglia's exact tail method (Marsaglia, "Generating a variable from the
# tail of the normal distribution", Technometrics 6, 1964).  Given exact uniforms the output is
# exactly N(0, 1); the layer index, the sign and the position come from disjoint bits of one word
# (Doornik, "An Improved Ziggurat Method to Generate Normal Random Samples", 2005, on why they must
# not share bits).  docs/privacy.md, "Randomness", says why this float64 realisation is certified as
# the Gaussian it samples.

ZIGGURAT_LAYERS = 256


def _ziggurat_edges(r: float):
    """Layer edges x[0..256] for base-layer edge ``r`` and the common area v; also how far the top
    layer misses closing at f = 1 (> 0: overshoots, r too small)."""
    f = lambda t: math.exp(-0.5 * t * t)
    v = r * f(r) + math.sqrt(math.pi / 2) * math.erfc(r / math.sqrt(2))
    x = np.zeros(ZIGGURAT_LAYERS + 1)
    x[0], x[1] = v / f(r), r
    for i in range(1, ZIGGURAT_LAYERS - 1):
        y = v / x[i] + f(x[i])
        if y >= 1:
            return x, v, 1.0
        x[i + 1] = math.sqrt(-2 * math.log(y))
    return x, v, v / x[ZIGGURAT_LAYERS - 1] + f(x[ZIGGURAT_LAYERS - 1]) - 1


def ziggurat_tables():
    """``(x, f, r)``: edges x[0..256] (x[0] = v / f(r) the base layer's width, x[256] = 0), f(x)
    at them (f[256] = 1) and r, with r solved by bisection so that the 256 layers of area v close
    the curve at its top (Marsaglia & Tsang 2000, Section 2): every layer then has area v."""
    lo, hi = 3.5, 3.8
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _ziggurat_edges(mid)[2] > 0:
            lo = mid
        else:
            hi = mid
    x, _, _ = _ziggurat_edges(hi)
    x[ZIGGURAT_LAYERS] = 0.0
    return x, np.exp(-0.5 * x * x), float(x[1])


_ZX, _ZF, _ZR = ziggurat_tables()
_START, _WEDGE, _TAIL, _DONE = 0, 1, 2, 3


@numba.njit(cache=True, inline="always")
def _position(word):  # pragma: no cover - compiled
    """The word's top 53 bits as a uniform in (0, 1) (bits 0-7: layer, bit 8: sign)."""
    return (np.float64(word >> np.uint64(11)) + 0.5) * 2.0 ** -53


@numba.njit(cache=True, inline="always")
def _signed(word, x):  # pragma: no cover - compiled
    return -x if (word >> np.uint64(8)) & np.uint64(1) else x


@numba.njit(cache=True, nogil=True)
def _ziggurat_fast(words, zx):  # pragma: no cover - compiled
    """One word per draw; the ~1% of words whose point falls outside the layer's inner rectangle
    are NaN, to be finished by :func:`_ziggurat_finish`; returns the draws and how many are NaN.
    Sequential: the loop is bound by memory, and a parallel kernel measured no faster on 2 cores
    (0.20 s vs 0.22 s for 1e7 words), while it would tie the noise thread to numba's threading layer."""
    n = words.shape[0]
    out = np.empty(n, dtype=np.float64)
    pending = 0
    for i in range(n):
        layer = np.int64(words[i] & np.uint64(255))
        x = _position(words[i]) * zx[layer]
        if x < zx[layer + 1]:
            out[i] = _signed(words[i], x)
        else:
            out[i] = np.nan
            pending += 1
    return out, pending


@numba.njit(cache=True, nogil=True)
def _ziggurat_finish(kinds, words, out, j, fresh, zx, zf, r):  # pragma: no cover - compiled
    """Finish draws j, j+1, ... from their state (wedge test pending, or in the tail) with fresh
    words; when the words run out the state is saved and the index to resume at is returned."""
    m, p, nf = kinds.shape[0], 0, fresh.shape[0]
    while j < m:
        kind, word = kinds[j], words[j]
        while kind != _DONE:
            if kind == _START:                 # a whole new attempt (after a wedge rejection)
                if p >= nf:
                    break
                word = fresh[p]
                p += 1
                layer = np.int64(word & np.uint64(255))
                x = _position(word) * zx[layer]
                if x < zx[layer + 1]:
                    out[j] = _signed(word, x)
                    kind = _DONE
                else:
                    kind = _TAIL if layer == 0 else _WEDGE
            elif kind == _WEDGE:               # y uniform in the layer's height: under the curve?
                if p >= nf:
                    break
                layer = np.int64(word & np.uint64(255))
                x = _position(word) * zx[layer]
                y = zf[layer] + _position(fresh[p]) * (zf[layer + 1] - zf[layer])
                p += 1
                if y < math.exp(-0.5 * x * x):
                    out[j] = _signed(word, x)
                    kind = _DONE
                else:
                    kind = _START
            else:                              # tail beyond r: two 106-bit uniforms per trial
                if p + 4 > nf:
                    break
                u1 = (np.float64(fresh[p] >> np.uint64(11))
                      + (np.float64(fresh[p + 1] >> np.uint64(11)) + 0.5) * 2.0 ** -53) * 2.0 ** -53
                u2 = (np.float64(fresh[p + 2] >> np.uint64(11))
                      + (np.float64(fresh[p + 3] >> np.uint64(11)) + 0.5) * 2.0 ** -53) * 2.0 ** -53
                p += 4
                t = -math.log(u1) / r
                if -2.0 * math.log(u2) > t * t:
                    out[j] = _signed(word, r + t)
                    kind = _DONE
        if kind != _DONE:
            kinds[j], words[j] = kind, word
            return j, p
        j += 1
    return j, p


def standard_normal(rng, n: int) -> np.ndarray:
    """``n`` float64 draws of N(0, 1) by the ziggurat (see above) from ``rng``'s raw words: about
    1.01 words a draw, with either kind of source; the tail reaches beyond 23 (a 106-bit uniform)."""
    n = int(n)
    words = raw_words(rng, n)
    out, pending = _ziggurat_fast(words, _ZX)
    if pending:
        need = np.flatnonzero(np.isnan(out))
        kinds = np.where((words[need] & np.uint64(255)) == 0, _TAIL, _WEDGE).astype(np.int64)
        left, vals, j = words[need].copy(), np.empty(need.size), 0
        while j < need.size:
            fresh = raw_words(rng, 4 * (need.size - j) + 64)
            j, _ = _ziggurat_finish(kinds, left, vals, j, fresh, _ZX, _ZF, _ZR)
        out[need] = vals
    return out
