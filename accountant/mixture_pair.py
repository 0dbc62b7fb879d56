"""Dominating pair of one step when one person's records are sampled independently: a mixture of shifts.

A person named in ``k`` records of a record-level Poisson run changes one step by ``V = sum_i B_i g_i``
with ``B_i ~ Bernoulli(q)`` i.i.d. and ``||g_i|| <= C``.  For noise law ``P`` (density ``p``) the
pair of one step is the *Binomial mixture of shifts* (docs/privacy.md, "Person-level DP")

    remove:  (A, P)      add:  (P, A),      A = sum_j w_j P_{j s},   w_j = C(k, j) q^j (1 - q)^(k - j)

with likelihood ratio ``LR(x) = sum_j w_j p(x - j s) / p(x)``; remove loss ``log LR(x)``, ``x ~ A``;
add loss ``-log LR(x)``, ``x ~ P``.  With ``k = 1`` this is :class:`accountant.privacy_loss.ShiftPair`.
For log-concave ``p`` every ratio ``p(x - j s) / p(x)`` is non-decreasing in ``x``, so ``LR`` is too
and every level set of the loss is one half-line; its end is found on ``log LR`` by a vectorised
bracketing search refined to float64 precision, and its masses come
from survival functions on the accurate side, as for ShiftPair.  The pair exposes the interface
both routes use (``tails``, ``infinite_mass``, ``loss_range``, ``mean_loss``).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import special

from accountant.noise import Gaussian, Noise, Tabulated
from accountant.privacy_loss import _GL_NODES, _GL_WEIGHTS, _edge, computational_reach

#: points of the cached table of log LR that brackets every level
TABLE_POINTS = 2 ** 14 + 1
#: Newton steps for Gaussian noise (quadratic convergence from a table cell: 3-4 suffice)
NEWTON_STEPS = 16
#: regula-falsi steps inside a table cell (superlinear: a smooth log LR is then resolved)
ILLINOIS_STEPS = 8
#: at most this many halvings for brackets regula falsi leaves wider than 4 float64 spacings
#: (64 halvings take any cell below float64 spacing), so the masses are exact up to the rounding
#: of sf/cdf
BISECTION_STEPS = 64


def binomial_log_weights(k: int, q: float) -> tuple:
    """``log w_j = log C(k, j) + j log q + (k - j) log(1 - q)``, j = 0..k (log1p: exact for tiny q)."""
    j = np.arange(k + 1)
    log_w = (special.gammaln(k + 1) - special.gammaln(j + 1) - special.gammaln(k - j + 1)
             + j * math.log(q) + (k - j) * math.log1p(-q))
    return tuple(float(v) for v in log_w)


def binomial_weights(k: int, q: float) -> tuple:
    """``w_j = C(k, j) q^j (1 - q)^(k - j)``, j = 0..k (a weight below the float range is 0)."""
    return tuple(math.exp(v) for v in binomial_log_weights(k, q))


def binomial_pair(noise: Noise, shift: float, k: int, q: float) -> "MixtureShiftPair":
    """The pair of one step for a person in ``k`` records sampled with rate ``q`` each, with the
    log-weights computed directly (the loss floor ``k log(1 - q)`` exact even for tiny q)."""
    return MixtureShiftPair(noise, shift, binomial_weights(k, q), binomial_log_weights(k, q))


@dataclass(frozen=True)
class MixtureShiftPair:
    """One step in which ``j`` shifts of size ``shift`` are added with probability ``weights[j]``."""

    noise: Noise
    shift: float
    weights: tuple
    #: log of ``weights`` (more precise when given, e.g. by :func:`binomial_pair`)
    log_weights: tuple | None = None

    def __post_init__(self):
        if not self.noise.log_concave or isinstance(self.noise, Tabulated):
            raise ValueError(f"{self.noise.family} noise is not a log-concave closed-form law: the loss of "
                             "a mixture of its shifts is not monotone, so its level sets are not half-lines")
        w = np.asarray(self.weights, dtype=np.float64)
        if w.ndim != 1 or w.size < 2 or np.any(w < 0) or not w[0] > 0 or abs(w.sum() - 1) > 1e-12:
            raise ValueError("weights must be w_0 > 0, w_1.., w_k >= 0 summing to 1")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift must be positive, got {self.shift}")
        if self.log_weights is None:
            with np.errstate(divide="ignore"):
                object.__setattr__(self, "log_weights", tuple(float(v) for v in np.log(w)))
        elif len(self.log_weights) != w.size or not np.allclose(np.exp(self.log_weights), w, rtol=1e-12, atol=0):
            raise ValueError("log_weights must be the logarithms of weights")

    @property
    def k(self) -> int:
        return len(self.weights) - 1

    # ------------------------------------------------------------------------------------------
    def _log_terms(self, x):
        """``log w_j + log p(x - j s) - log p(x)`` for every j, on a new FIRST axis (k + 1, ...)."""
        x = np.asarray(x, dtype=np.float64)
        j = np.arange(self.k + 1, dtype=np.float64).reshape((-1,) + (1,) * x.ndim)
        log_w = np.asarray(self.log_weights, dtype=np.float64).reshape(j.shape)
        if isinstance(self.noise, Gaussian):     # exact: j s (2 x - j s) / (2 sigma^2)
            ratio = (j * self.shift / self.noise.sigma ** 2) * x - (j * self.shift) ** 2 / (2 * self.noise.sigma ** 2)
        else:
            ratio = self.noise.logpdf(x - j * self.shift) - self.noise.logpdf(x)
        return log_w + ratio

    def _excess_terms(self, x):
        """``E_j = log(w_j / w_0) + log p(x - j s) - log p(x)``, j = 1..k (first axis)."""
        terms = self._log_terms(x)
        return terms[1:] - terms[0]

    def excess(self, x) -> np.ndarray:
        """``log LR(x) - log w_0 = log(1 + sum_j e^{E_j}) >= 0`` with ``log1p`` where the sum is
        small: near the loss floor the level sets stay resolved to float64 relative precision."""
        e = self._excess_terms(x)
        top = e.max(0)
        with np.errstate(over="ignore", invalid="ignore"):
            small = np.log1p(np.exp(np.minimum(e, 0.0)).sum(0))
            big = top + np.log(np.exp(-np.maximum(top, 0.0)) + np.exp(e - np.maximum(top, 0.0)).sum(0))
        return np.where(top <= 0, small, big)

    def log_ratio(self, x) -> np.ndarray:
        """``log LR(x)``, non-decreasing in ``x``."""
        return self.log_weights[0] + self.excess(x)

    def _bracket(self) -> tuple[float, float]:
        reach = computational_reach(self.noise)
        return -reach, reach + self.k * self.shift

    def _table(self):
        """log LR on TABLE_POINTS equally spaced points of the bracket (made non-decreasing
        against rounding), cached: it brackets every level to one table cell."""
        cache = self.__dict__.setdefault("_level_table", [])
        if not cache:
            xs = np.linspace(*self._bracket(), TABLE_POINTS)
            cache.append((xs, np.maximum.accumulate(self.excess(xs))))
        return cache[0]

    def level_points(self, lam) -> np.ndarray:
        """x with ``log LR(x) = lam``, vectorised.  Each level is bracketed to one cell of the cached
        table, then the Illinois variant of regula falsi (Dowell & Jarratt 1971) and bisection of
        any bracket still wider than 4 float64 spacings bring it to float64 precision (at most
        BISECTION_STEPS halvings).  A level at or below ``log LR`` at the bracket's left end gives
        -inf (the whole line is above it), one at or above its right end +inf: beyond the bracket
        lies less than TAIL_NEGLIGIBLE of every component's mass."""
        lam = np.atleast_1d(np.asarray(lam, dtype=np.float64)) - self.log_weights[0]
        xs, fs = self._table()
        inside = (lam > fs[0]) & (lam < fs[-1])
        target = lam[inside]
        j = np.clip(np.searchsorted(fs, target, side="right"), 1, xs.size - 1)
        a, b = xs[j - 1], xs[j]
        out = np.where(lam <= fs[0], -np.inf, np.inf)
        if isinstance(self.noise, Gaussian):
            out[inside] = self._newton(a, b, target, self._hermite_start(j, target))
            return out
        fa, fb = fs[j - 1] - target, fs[j] - target          # fa <= 0 < fb
        for _ in range(ILLINOIS_STEPS):
            width = fb - fa
            c = np.where(width > 0, b - fb * (b - a) / np.where(width > 0, width, 1.0), 0.5 * (a + b))
            c = np.clip(c, a, b)
            fc = self.excess(c) - target
            right = fc > 0
            fa = np.where(right, fa * 0.5, fc)
            a = np.where(right, a, c)
            fb = np.where(right, fc, fb * 0.5)
            b = np.where(right, c, b)
        for _ in range(BISECTION_STEPS):
            wide = np.nonzero(b - a > 4 * np.spacing(np.maximum(np.abs(a), np.abs(b))))[0]
            if wide.size == 0:
                break
            mid = 0.5 * (a[wide] + b[wide])
            right = self.excess(mid) > target[wide]
            a[wide] = np.where(right, a[wide], mid)
            b[wide] = np.where(right, mid, b[wide])
        out[inside] = 0.5 * (a + b)
        return out

    def _hermite_start(self, j, target):
        """Starting points for Newton: the cubic Hermite interpolant of the inverse x(f) on table
        cell ``j - 1..j`` (slopes 1 / f'), within about h^4 of the root for a cell of width h."""
        xs, fs = self._table()
        slopes = self._table_slopes()
        f0, f1, x0, x1 = fs[j - 1], fs[j], xs[j - 1], xs[j]
        df = f1 - f0
        ok = (df > 0) & (slopes[j - 1] > 0) & (slopes[j] > 0)
        df_safe = np.where(ok, df, 1.0)
        u = np.clip((target - f0) / df_safe, 0.0, 1.0)
        m0 = df_safe / np.where(ok, slopes[j - 1], 1.0)
        m1 = df_safe / np.where(ok, slopes[j], 1.0)
        h00, h10, h01, h11 = (2 * u ** 3 - 3 * u ** 2 + 1, u ** 3 - 2 * u ** 2 + u,
                              -2 * u ** 3 + 3 * u ** 2, u ** 3 - u ** 2)
        guess = h00 * x0 + h10 * m0 + h01 * x1 + h11 * m1
        return np.where(ok, np.clip(guess, x0, x1), x1)

    def _table_slopes(self):
        """d/dx (log LR) at the table points (Gaussian noise), cached with the table."""
        cache = self.__dict__.setdefault("_level_slopes", [])
        if not cache:
            xs, _ = self._table()
            e = self._excess_terms(xs)
            top = np.maximum(e.max(0), 0.0)
            scaled = np.exp(e - top)
            j = np.arange(1, self.k + 1, dtype=np.float64)[:, None]
            cache.append(self.shift / self.noise.sigma ** 2 * (scaled * j).sum(0) / (np.exp(-top) + scaled.sum(0)))
        return cache[0]

    def _newton(self, a, b, target, start=None):
        """Gaussian noise: ``log LR`` is a log-sum-exp of functions affine in x, hence convex and
        increasing, so Newton's method converges to the root quadratically, monotonically after
        its first step, from any start in the bracket [a, b] (the Hermite start is within about
        1e-10 of it: one or two steps); iterates are kept inside [a, b], and a point stops once
        its step is below 4 float64 spacings."""
        j = np.arange(1, self.k + 1, dtype=np.float64)[:, None]
        u = self.shift / self.noise.sigma ** 2
        x = b.copy() if start is None else start.copy()
        live = np.arange(x.size)
        for _ in range(NEWTON_STEPS):
            e = self._excess_terms(x[live])
            top = np.maximum(e.max(0), 0.0)
            scaled = np.exp(e - top)
            total = np.exp(-top) + scaled.sum(0)                # (1 + sum e^E) e^-top
            value = np.where(top > 0, top + np.log(total), np.log1p(np.exp(np.minimum(e, 0.0)).sum(0)))
            slope = u * (scaled * j).sum(0) / total             # d/dx log LR > 0
            new = np.clip(x[live] - (value - target[live]) / slope, a[live], b[live])
            moved = np.abs(new - x[live]) > 4 * np.spacing(np.abs(new) + 1.0)
            x[live] = new
            live = live[moved]
            if live.size == 0:
                break
        return x

    def _mixture_sf(self, x):
        """sum_j w_j P(Z > x - j s) (each term on its accurate side)."""
        return sum(w * self.noise.sf(x - j * self.shift) for j, w in enumerate(self.weights) if w > 0)

    def _mixture_cdf(self, x):
        """sum_j w_j P(Z <= x - j s)."""
        return sum(w * self.noise.cdf(x - j * self.shift) for j, w in enumerate(self.weights) if w > 0)

    def tails(self, direction: str, t):
        """(U(t), W(t), V(t)): upper mass of {L > t}, lower mass of {L > t}, upper mass of {L <= t}.

        remove: {L > t} = {x > x_t} with log LR(x_t) = t;  U = A(x > x_t), W = P(x > x_t).
        add:    {L > t} = {x < x_t} with log LR(x_t) = -t; U = P(x < x_t), W = A(x < x_t)."""
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))
        if direction == "remove":
            x = self.level_points(t)
            return self._mixture_sf(x), self.noise.sf(x), self._mixture_cdf(x)
        x = self.level_points(-t)
        return self.noise.cdf(x), self._mixture_cdf(x), self.noise.sf(x)

    def infinite_mass(self, direction: str) -> float:
        """0: a log-concave closed-form law has a positive density everywhere, and w_0 > 0."""
        return 0.0

    def loss_range(self, direction: str) -> tuple[float, float]:
        """[t_lo, t_hi] outside which the loss has mass below TAIL_NEGLIGIBLE: remove
        [log w_0, edge], add [edge, -log w_0] (the loss tends to log w_0 as x -> -inf)."""
        return _cached_loss_range(self, direction)

    def _loss_range(self, direction: str) -> tuple[float, float]:
        floor = self.log_weights[0]
        if direction == "remove":
            hi = _edge(lambda t: self.tails("remove", t)[0])
            return floor, max(hi, floor + 1e-9)
        lo = -_edge(lambda t: self.tails("add", -t)[2])
        return min(lo, -floor - 1e-9), -floor

    def mean_loss(self, direction: str) -> float:
        """E[L] under the upper measure, by 8-point Gauss-Legendre on asinh-spaced cells of the
        bracket cut at every shift j s (prv-accountant centres its grid on it)."""
        lo_x, hi_x = self._bracket()
        cuts = np.unique(np.concatenate([np.sinh(np.linspace(math.asinh(lo_x), math.asinh(hi_x), 4001)),
                                         self.shift * np.arange(self.k + 1)]))
        a, b = cuts[:-1], cuts[1:]
        x = 0.5 * (a + b)[:, None] + 0.5 * (b - a)[:, None] * _GL_NODES[None, :]
        w = 0.5 * (b - a)[:, None] * _GL_WEIGHTS[None, :]
        with np.errstate(under="ignore"):
            loss = self.log_ratio(x)
            p = self.noise.pdf(x)
            if direction == "remove":
                dens = sum(wj * self.noise.pdf(x - j * self.shift) for j, wj in enumerate(self.weights))
                return float(np.sum(dens * loss * w))
            return float(np.sum(-p * loss * w))


@functools.lru_cache(maxsize=256)
def _cached_loss_range(pair: MixtureShiftPair, direction: str) -> tuple[float, float]:
    return pair._loss_range(direction)
