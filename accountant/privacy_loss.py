"""Exact privacy-loss tails of one Poisson-subsampled step, for both neighbouring relations.

A step is described by a *dominating pair* (docs/privacy.md).  For additive noise P with sensitivity
s, shifted copy P_s, and Poisson rate q, the pair is

* remove:  (A, P) with A = (1 - q) P + q P_s,     loss L  =  log(1 - q + q e^l(x)),  x ~ A
* add:     (P, A),                                loss L' = -log(1 - q + q e^l(x)),  x ~ P

where ``l(x) = log p(x - s) - log p(x)`` (Zhu, Dong & Wang 2022, Thm. 11; Balle et al. 2018).  Both
relations are always reported (docs/soundness.md rule 3).  Everything the accountants need is the pair of tail
functions of the loss

    U(t) = mu_upper(L > t),  W(t) = mu_lower(L > t),     delta(eps) = U(eps) - e^eps W(eps),

(the hockey-stick divergence), computed here *exactly* from the noise's CDF on the level sets of l.
No interpolation: the level sets are found by bisection on monotone pieces of l (or read off exactly
for tabulated laws), and interval masses come from survival functions on the accurate side.
"""
from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass

import numpy as np

from accountant.noise import Gaussian, Noise, Tabulated

#: per-step probability mass left outside the computational domain; far below the ~1e-15 floating
#: floor of the FFT composition, and stated in docs/privacy.md.
TAIL_NEGLIGIBLE = 1e-30
#: cap on the computational domain for laws whose TAIL_NEGLIGIBLE quantile is not a float (power-law
#: tails, e.g. LMO with a Gamma shape near 0): beyond it the loss is within 1e-150 of its limit.
REACH_CAP = 1e150


def computational_reach(noise: Noise) -> float:
    """Half-width of the x-domain on which level sets are solved: the TAIL_NEGLIGIBLE quantile,
    capped at REACH_CAP.  Mass beyond it is not dropped: the outermost pieces extend to infinity."""
    with np.errstate(over="ignore", invalid="ignore"):
        reach = float(noise.isf(TAIL_NEGLIGIBLE))
    return reach if math.isfinite(reach) and reach < REACH_CAP else REACH_CAP


# ----------------------------------------------------------------------------------------------
# Level sets of the log-likelihood ratio l(x) = log p(x - s) - log p(x)
# ----------------------------------------------------------------------------------------------
def _bisect_level(noise: Noise, shift: float, lo: float, hi: float, direction: int, lam: np.ndarray):
    """Crossing point of a monotone piece of l with every level in ``lam``.

    Works in asinh(x) (heavy tails and the bulk both resolved): a 4097-point scan brackets each
    level, then the Illinois variant of regula falsi (Dowell & Jarratt 1971) and, for brackets it
    leaves wide (kinks and flat ends of l), bisection bring every bracket to float64 precision; levels outside the range of l on the piece snap to its ends, so empty or full
    sets carry exactly zero mass, not rounding noise.
    """
    sign = 1.0 if direction > 0 else -1.0

    def f(y):  # increasing in y on the piece
        x = np.sinh(y)
        return sign * (noise.logpdf(x - shift) - noise.logpdf(x))

    target = sign * lam
    with np.errstate(over="ignore", invalid="ignore"):
        ys = np.linspace(math.asinh(lo), math.asinh(hi), 4097)
        fs = np.maximum.accumulate(f(ys))                 # enforce monotonicity against rounding
        j = np.clip(np.searchsorted(fs, target, side="right"), 1, len(ys) - 1)
        a, b = ys[j - 1], ys[j]
        fa, fb = fs[j - 1] - target, fs[j] - target
        for _ in range(14):
            width = fb - fa
            c = np.where(width > 0, b - fb * (b - a) / np.where(width > 0, width, 1.0), 0.5 * (a + b))
            c = np.clip(c, np.minimum(a, b), np.maximum(a, b))
            fc = f(c) - target
            right = fc > 0
            # Illinois: halve the stale end's value when the same end is kept twice
            fa = np.where(right, fa * 0.5, fc)
            a = np.where(right, a, c)
            fb = np.where(right, fc, fb * 0.5)
            b = np.where(right, c, b)
        # regula falsi stalls where l has a kink or a flat end (Laplace at x = 0 and x = s): bisect
        # the few brackets still wider than 1e-10 (relative, in asinh x; others are far narrower)
        inside = (target >= fs[0]) & (target < fs[-1])      # the others snap to an end below
        for _ in range(60):
            wide = np.nonzero(inside & (np.abs(b - a) > 1e-10 * np.maximum(1.0, np.abs(a))))[0]
            if wide.size == 0:
                break
            mid = 0.5 * (a[wide] + b[wide])
            right = f(mid) - target[wide] > 0
            a[wide] = np.where(right, a[wide], mid)
            b[wide] = np.where(right, mid, b[wide])
        # final estimate: the secant through the true values at the bracket's ends (exact where l
        # is linear, second order where it is smooth, inside the bracket at a kink)
        fa, fb = f(a) - target, f(b) - target
        gap = fb - fa
        y = np.where(gap > 0, a - fa * (b - a) / np.where(gap > 0, gap, 1.0), 0.5 * (a + b))
        x = np.sinh(np.clip(y, np.minimum(a, b), np.maximum(a, b)))
    # in y the piece runs from lo to hi and f increases, whichever way l runs
    x = np.where(target < fs[0], lo, x)
    return np.where(target >= fs[-1], hi, x)


def _split(piece, x, outer_lo: bool, outer_hi: bool):
    """The intervals (lo, x] and (x, hi] of a piece split at the level crossing ``x``.  An outermost
    piece owns the tail beyond the computational domain: it joins the interval adjacent to that end
    (l is monotone there, so the tail lies on the same side of the level, up to the stated gap)."""
    lo, hi = piece.lo, piece.hi
    left_a = np.where(x > lo, -math.inf, lo) if outer_lo else np.full_like(x, lo)
    right_a = np.where(x > lo, x, -math.inf) if outer_lo else x
    right_b = np.where(x < hi, math.inf, hi) if outer_hi else np.full_like(x, hi)
    left_b = np.where(x < hi, x, math.inf) if outer_hi else x
    return (left_a, left_b), (right_a, right_b)


def _masses(noise: Noise, shift: float, a, b):
    """(P(a, b], P_s(a, b]) where P_s is the law shifted right by ``shift``."""
    return noise.interval_mass(a, b), noise.interval_mass(np.asarray(a) - shift, np.asarray(b) - shift)


def level_set_masses(noise: Noise, shift: float, lam):
    """Masses of {l > lam} and {l <= lam} under P and P_s.

    Returns ``(p_above, s_above, p_below, s_below)``, arrays shaped like ``lam``.
    """
    lam = np.atleast_1d(np.asarray(lam, dtype=np.float64))
    if isinstance(noise, Tabulated):
        return _tabulated_masses(noise, shift, lam)
    if isinstance(noise, Gaussian):
        # l(x) = (2 x s - s^2) / (2 sigma^2) is increasing: {l > lam} = (x*, inf)
        xs = noise.sigma ** 2 * lam / shift + shift / 2
        return noise.sf(xs), noise.sf(xs - shift), noise.cdf(xs), noise.cdf(xs - shift)
    reach = computational_reach(noise)
    out = [np.zeros_like(lam) for _ in range(4)]
    for piece in noise.loss_pieces(shift, reach):
        x = _bisect_level(noise, shift, piece.lo, piece.hi, piece.direction, lam)
        left, right = _split(piece, x, outer_lo=piece.lo <= -reach, outer_hi=piece.hi >= reach + shift)
        above, below = (right, left) if piece.direction > 0 else (left, right)
        pa, sa = _masses(noise, shift, *above)
        pb, sb = _masses(noise, shift, *below)
        out[0] += pa
        out[1] += sa
        out[2] += pb
        out[3] += sb
    # Beyond [-reach, reach + shift] l is monotone (symmetric unimodality) and the level crossing
    # snaps to the domain's end: the tails join the correct side for every level outside the gap
    # between l(+-reach) and l(+-inf) (mass below TAIL_NEGLIGIBLE, or a gap below 1e-150).
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# Tabulated laws: an exact partition of x-space
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TableCells:
    """The cells between consecutive points of ``edges U (edges + shift)`` inside [-reach, reach + s].

    The cut points are sorted and compared as exact rationals (every float is an integer over a
    common power of two), never as float64 sums: ``1 + 1e-20`` is a cell edge of its own even though
    it rounds to 1.  On a cell both log p(x) and log p(x - s) are linear in the offset t from the
    cell's start (slope 0 in the core, -/+ rate in the tails); each is stored as its value at the
    cell's denser end (``log_p_top``: exact up to one rounding even where a steep tail makes the
    other end's value huge) and its slope, so the log-likelihood ratio is
    ``l(t) = l0 + (slope_s - slope_p) t``.  ``width`` and the masses are the exact values rounded
    once to float64 (a core mass is ``mass_j * (cell width / bin width)`` with the ratio computed
    exactly).
    """

    width: np.ndarray
    log_p_top: np.ndarray
    slope_p: np.ndarray
    log_s_top: np.ndarray
    slope_s: np.ndarray
    p_mass: np.ndarray
    s_mass: np.ndarray

    def log_p(self, t, sel=slice(None)):
        """log p at offsets ``t`` (broadcast against the selected cells as a column)."""
        return _log_density(self.log_p_top[sel], self.slope_p[sel], self.width[sel], t)

    def log_s(self, t, sel=slice(None)):
        return _log_density(self.log_s_top[sel], self.slope_s[sel], self.width[sel], t)

    @property
    def l0(self) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return self.log_s(0.0) - self.log_p(0.0)

    @property
    def l_slope(self) -> np.ndarray:
        return self.slope_s - self.slope_p


def _log_density(top, slope, width, t):
    """Log density at offset ``t`` of a cell side stored by its denser end's value ``top``."""
    top, slope, width = (np.asarray(v)[..., None] if np.ndim(t) > np.ndim(v) else v
                         for v in (top, slope, width))
    with np.errstate(invalid="ignore"):
        return top - np.abs(slope) * np.where(slope > 0, width - t, t)


def _side(tab: Tabulated, ints: list, den: int, lo: int, hi: int):
    """(log density at the denser end, slope, exact mass of [lo, hi]) of the table law on the cell
    [lo, hi] (numerators over ``den``), which lies inside one bin or one tail."""
    n = len(tab.mass)
    j = bisect.bisect_right(ints, lo) - 1
    if 0 <= j < n:
        bin_w = ints[j + 1] - ints[j]
        m = float(tab.mass[j])
        if m == 0:
            return -math.inf, 0.0, 0.0
        return math.log(m) - math.log(bin_w / den), 0.0, m * ((hi - lo) / bin_w)
    if tab.tail_mass == 0:
        return -math.inf, 0.0, 0.0
    r, tm = tab.tail_rate, tab.tail_mass
    if j >= n:    # right tail: density tm r e^{-r (x - reach)}, decreasing in t
        near, width = (lo - ints[-1]) / den, (hi - lo) / den      # the exact width, not far - near
        mass = tm * math.exp(-r * near) * -math.expm1(-r * width)
        return math.log(tm * r) - r * near, -r, mass
    near, width = (ints[0] - hi) / den, (hi - lo) / den          # left tail, increasing in t
    mass = tm * math.exp(-r * near) * -math.expm1(-r * width)
    return math.log(tm * r) - r * near, r, mass


def tabulated_cells(tab: Tabulated, shift: float) -> TableCells:
    """The exact cell partition of ``tab`` against its copy shifted by ``shift`` (cached per table)."""
    cache = tab.__dict__.setdefault("_cells_cache", {})
    if shift not in cache:
        ratios = [float(v).as_integer_ratio() for v in tab.edges] + [float(shift).as_integer_ratio()]
        den = max(d for _, d in ratios)
        ints = [num * (den // d) for num, d in ratios]
        ints, s = ints[:-1], ints[-1]
        cuts = sorted(set(ints) | {e + s for e in ints})
        rows = []
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            lp, bp, pm = _side(tab, ints, den, lo, hi)
            ls, bs, sm = _side(tab, ints, den, lo - s, hi - s)
            rows.append(((hi - lo) / den, lp, bp, ls, bs, pm, sm))
        cols = np.array(rows, dtype=np.float64).reshape(-1, 7).T
        cache[shift] = TableCells(*cols)
    return cache[shift]


def _cell_part_masses(top, slope, width, t0, t1):
    """Mass on offsets [t0, t1] of a cell side with log density ``top`` at its denser end and
    slope ``slope`` (exact formula, evaluated from the denser end of [t0, t1]: nothing overflows)."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        dt = np.maximum(t1 - t0, 0.0)
        k = np.abs(slope)
        peak = _log_density(top, slope, width, np.where(slope > 0, t1, t0))
        curved = np.exp(peak) * -np.expm1(-k * dt) / np.where(k > 0, k, 1.0)
        flat = np.exp(top) * dt
    return np.where(np.isneginf(top) | (dt == 0), 0.0, np.where(slope == 0, flat, curved))


def _tabulated_masses(tab: Tabulated, shift: float, lam: np.ndarray):
    """Exact level-set masses for a piecewise log-linear law, on the exact cells of
    :func:`tabulated_cells`.  Constant cells (both x and x - s in the core, most of them) are
    aggregated by sorting; on the few linear cells (one of x, x - s in a tail) l is split at its
    crossing with each level in closed form."""
    c = tabulated_cells(tab, shift)
    l0, slope = c.l0, c.l_slope
    live = (c.p_mass > 0) | (c.s_mass > 0)
    lin = live & (slope != 0) & np.isfinite(l0)
    const = live & ~lin

    # outer cells (-inf, -reach) and (reach + shift, inf): constant ratio exp(-/+ rate * shift)
    values, p_atoms, s_atoms = [l0[const]], [c.p_mass[const]], [c.s_mass[const]]
    if tab.tail_mass > 0:
        values.append(np.array([-tab.tail_rate * shift, tab.tail_rate * shift]))
        p_atoms.append(np.array([tab.tail_mass, tab.tail_mass * math.exp(-tab.tail_rate * shift)]))
        s_atoms.append(np.array([tab.tail_mass * math.exp(-tab.tail_rate * shift), tab.tail_mass]))
    values = np.concatenate(values)
    p_atoms, s_atoms = np.concatenate(p_atoms), np.concatenate(s_atoms)
    order = np.argsort(values, kind="stable")
    values, p_atoms, s_atoms = values[order], p_atoms[order], s_atoms[order]
    # suffix sums accumulated from the top (small tail masses first) and prefix sums from the bottom
    p_suffix = np.concatenate([np.cumsum(p_atoms[::-1])[::-1], [0.0]])
    s_suffix = np.concatenate([np.cumsum(s_atoms[::-1])[::-1], [0.0]])
    p_prefix = np.concatenate([[0.0], np.cumsum(p_atoms)])
    s_prefix = np.concatenate([[0.0], np.cumsum(s_atoms)])
    first_above = np.searchsorted(values, lam, side="right")
    p_above, s_above = p_suffix[first_above], s_suffix[first_above]
    p_below, s_below = p_prefix[first_above], s_prefix[first_above]

    # linear cells: l(t) = l0 + slope t on offsets [0, width]; split at the crossing t*
    if np.any(lin):
        w, v0, k = c.width[lin][:, None], l0[lin][:, None], slope[lin][:, None]
        cross = np.clip((lam[None, :] - v0) / k, 0.0, w)
        zero = np.zeros_like(cross)
        end = np.broadcast_to(w, cross.shape)
        rising = np.broadcast_to(k > 0, cross.shape)
        above = (np.where(rising, cross, zero), np.where(rising, end, cross))
        below = (np.where(rising, zero, cross), np.where(rising, cross, end))
        for side, (t0, t1) in (("above", above), ("below", below)):
            pm = _cell_part_masses(c.log_p_top[lin][:, None], c.slope_p[lin][:, None], w, t0, t1).sum(0)
            sm = _cell_part_masses(c.log_s_top[lin][:, None], c.slope_s[lin][:, None], w, t0, t1).sum(0)
            if side == "above":
                p_above, s_above = p_above + pm, s_above + sm
            else:
                p_below, s_below = p_below + pm, s_below + sm
    return p_above, s_above, p_below, s_below


# ----------------------------------------------------------------------------------------------
# Dominating pairs of one step
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShiftPair:
    """One step of additive noise with sensitivity ``shift`` under Poisson rate ``q``."""

    noise: Noise
    shift: float
    q: float

    def tails(self, direction: str, t):
        """(U(t), W(t), V(t)): upper mass of {L > t}, lower mass of {L > t}, upper mass of {L <= t}.

        V is returned separately (not as 1 - U) so that the lower tail keeps full precision.
        """
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))
        q = self.q
        sign = 1.0 if direction == "remove" else -1.0
        # remove: L > t <=> l > lam(t);  add: L' > t <=> l < lam(-t);  lam(t) = log((e^t - 1 + q)/q),
        # written t + log1p(-(1 - q) e^-t) - log q: no cancellation in e^t - 1 + q when e^t is small
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            rest = (1 - q) * np.exp(-sign * t)
            lam = np.where(rest < 1, sign * t + np.log1p(-rest) - math.log(q), -np.inf)
        pa, sa, pb, sb = level_set_masses(self.noise, self.shift, lam)
        if direction == "remove":
            return (1 - q) * pa + q * sa, pa, (1 - q) * pb + q * sb
        empty = rest >= 1         # e^-t <= 1 - q: the loss never exceeds t
        return np.where(empty, 0.0, pb), np.where(empty, 0.0, (1 - q) * pb + q * sb), np.where(empty, 1.0, pa)

    def infinite_mass(self, direction: str) -> float:
        """Upper-measure mass where the loss is +inf (a density vanishing where its shift does not:
        bounded tables).  It is counted in delta for every epsilon, never dropped."""
        if not isinstance(self.noise, Tabulated) or self.noise.tail_mass > 0:
            return 0.0
        if direction == "remove":   # x with p(x) = 0 < p(x - s)
            pa, sa, _, _ = level_set_masses(self.noise, self.shift, np.array([np.finfo(float).max]))
            return float((1 - self.q) * pa[0] + self.q * sa[0])
        if self.q < 1:              # a >= (1 - q) p > 0 wherever p > 0
            return 0.0
        _, _, pb, _ = level_set_masses(self.noise, self.shift, np.array([-np.finfo(float).max]))
        return float(pb[0])

    def loss_range(self, direction: str) -> tuple[float, float]:
        """[t_lo, t_hi] outside which the finite loss has mass below TAIL_NEGLIGIBLE (t_lo may carry
        an atom).  Cached: both routes ask for it."""
        return _cached_loss_range(self, direction)

    def _loss_range(self, direction: str) -> tuple[float, float]:
        floor = math.log1p(-self.q) if self.q < 1 else None
        inf_mass = self.infinite_mass(direction)
        upper_gt = lambda t: self.tails(direction, t)[0] - inf_mass   # noqa: E731
        upper_le = lambda t: self.tails(direction, -t)[2]  # noqa: E731
        if direction == "remove":
            lo = floor if floor is not None else -_edge(upper_le)
            return lo, max(_edge(upper_gt), lo + 1e-9)
        hi = -floor if floor is not None else _edge(upper_gt)
        return min(-_edge(upper_le), hi - 1e-9), hi

    def mean_loss(self, direction: str) -> float:
        return mean_loss(self, direction)


@functools.lru_cache(maxsize=256)
def _cached_loss_range(pair: "ShiftPair", direction: str) -> tuple[float, float]:
    return pair._loss_range(direction)


def _edge(tail) -> float:
    """Smallest t >= 0 with tail(t) <= TAIL_NEGLIGIBLE, for a non-increasing ``tail`` (vectorised:
    a log-spaced scan, then two linear refinements; the answer is rounded *up*)."""
    grid = np.concatenate([[0.0], np.geomspace(1e-7, 1e4, 221)])
    values = tail(grid)
    for _ in range(3):
        ok = np.nonzero(values <= TAIL_NEGLIGIBLE)[0]
        if len(ok) == 0:
            raise ValueError("privacy loss has no usable tail bound (noise far too small?)")
        i = ok[0]
        if i == 0:
            return 0.0
        grid = np.linspace(grid[i - 1], grid[i], 64)
        values = tail(grid)
    return float(grid[np.nonzero(values <= TAIL_NEGLIGIBLE)[0][0]])


_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(8)


def _subsampled_loss(ell, q: float):
    """log(1 - q + q e^ell) without overflow (ell > 0: ell + log(q + (1 - q) e^-ell))."""
    if q == 1:
        return ell
    with np.errstate(over="ignore"):
        big = ell + np.log(q + (1 - q) * np.exp(-np.maximum(ell, 0.0)))
        return np.where(ell > 0, big, np.log1p(q * np.expm1(np.minimum(ell, 0.0))))


def mean_loss(pair: "ShiftPair", direction: str) -> float:
    """E[L; L finite] under the upper measure (the KL divergence of the pair when no loss is
    infinite), by 8-point Gauss-Legendre on cells
    that split x-space at every kink of the density (table edges, 0, the shift); prv-accountant needs
    it to centre its discretisation (Gopi et al. 2021, Sec. 5)."""
    noise, s, q = pair.noise, pair.shift, pair.q
    if isinstance(noise, Tabulated):
        return _tabulated_mean_loss(noise, s, q, direction)
    reach = computational_reach(noise)
    cuts = np.unique(np.concatenate([np.sinh(np.linspace(-math.asinh(reach), math.asinh(reach + s), 4001)),
                                     [0.0, s]]))
    lo, hi = cuts[:-1], cuts[1:]
    x = 0.5 * (lo + hi)[:, None] + 0.5 * (hi - lo)[:, None] * _GL_NODES[None, :]
    w = 0.5 * (hi - lo)[:, None] * _GL_WEIGHTS[None, :]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ell = noise.logpdf(x - s) - noise.logpdf(x)
        loss = _subsampled_loss(ell, q)
        p = noise.pdf(x)
        a = (1 - q) * p + q * noise.pdf(x - s)
        integrand = a * loss if direction == "remove" else -p * loss
    finite = np.isfinite(loss) & ((a > 0) | (p > 0))
    return float(np.sum(np.where(finite, integrand, 0.0) * w))


def _tabulated_mean_loss(tab: Tabulated, s: float, q: float, direction: str) -> float:
    """E[L; L finite] for a table on its exact cells: constant cells from their masses, linear
    cells (tails) by 8-point Gauss-Legendre in the offset, the outer cells exactly."""
    c = tabulated_cells(tab, s)
    l0, k = c.l0, c.l_slope
    lin = (k != 0) & np.isfinite(l0)
    t = 0.5 * c.width[lin][:, None] * (1 + _GL_NODES[None, :])
    gl_w = 0.5 * c.width[lin][:, None] * _GL_WEIGHTS[None, :]
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        log_p, log_s = c.log_p(t, lin), c.log_s(t, lin)
        p_lin, s_lin = np.exp(log_p) * gl_w, np.exp(log_s) * gl_w
        ell = [l0[~lin], (log_s - log_p).ravel()]
    p_m, s_m = [c.p_mass[~lin], p_lin.ravel()], [c.s_mass[~lin], s_lin.ravel()]
    if tab.tail_mass > 0:   # outer cells: l = -/+ rate * s
        r, tm = tab.tail_rate, tab.tail_mass
        ell.append(np.array([-r * s, r * s]))
        p_m.append(np.array([tm, tm * math.exp(-r * s)]))
        s_m.append(np.array([tm * math.exp(-r * s), tm]))
    ell, p, sm = np.concatenate(ell), np.concatenate(p_m), np.concatenate(s_m)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        loss = _subsampled_loss(ell, q)
        a = (1 - q) * p + q * sm
        integrand = a * loss if direction == "remove" else -p * loss
    finite = np.isfinite(loss) & ((a > 0) | (p > 0))
    return float(np.sum(np.where(finite, integrand, 0.0)))


@dataclass(frozen=True)
class RandomizedResponsePair:
    """Dominating pair of any pure eps0-DP step: randomized response (Kairouz et al. 2015;
    Dong, Roth & Su 2022, Prop. 2.5), Poisson-subsampled with rate ``q``.

    Outcomes {1, 2}: P = (e^eps0, 1)/(1 + e^eps0), Q = (1, e^eps0)/(1 + e^eps0), base law Q,
    A = (1 - q) Q + q P.  remove: (A, Q); add: (Q, A).
    """

    eps0: float
    q: float

    def atoms(self, direction: str):
        """(loss values, upper masses) of the two outcomes."""
        e = math.exp(-self.eps0)           # stable for large eps0
        p_hi, p_lo = 1 / (1 + e), e / (1 + e)   # P = (p_hi, p_lo), Q = (p_lo, p_hi)
        a = np.array([(1 - self.q) * p_lo + self.q * p_hi, (1 - self.q) * p_hi + self.q * p_lo])
        qv = np.array([p_lo, p_hi])
        loss = np.log(a) - np.log(qv)
        if direction == "remove":
            return loss, a
        return -loss, qv

    def tails(self, direction: str, t):
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))
        loss, mass = self.atoms(direction)
        lower = mass * np.exp(-loss)
        above = loss[None, :] > t[:, None]
        return (above * mass).sum(1), (above * lower).sum(1), (~above * mass).sum(1)

    def infinite_mass(self, direction: str) -> float:
        return 0.0

    def mean_loss(self, direction: str) -> float:
        loss, mass = self.atoms(direction)
        return float(np.dot(loss, mass))

    def loss_range(self, direction: str) -> tuple[float, float]:
        loss, _ = self.atoms(direction)
        return float(loss.min()), float(max(loss.max(), loss.min() + 1e-9))


def hockey_stick(pair, direction: str, eps) -> np.ndarray:
    """delta(eps) = U(eps) - e^eps W(eps) >= 0 (the exact hockey-stick divergence of one step)."""
    eps = np.atleast_1d(np.asarray(eps, dtype=np.float64))
    upper, lower, _ = pair.tails(direction, eps)
    return np.maximum(upper - np.exp(eps) * lower, 0.0)
