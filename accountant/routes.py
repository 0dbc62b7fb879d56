"""The two independent composition routes: PLD (dp-accounting) and PRV (prv-accountant).

Both start from the exact per-step tails of :mod:`accountant.privacy_loss` and differ in everything
after: discretisation, composition, error control.

* PLD route: the exact hockey-stick curve on a loss grid of step ``pld_step`` becomes a pessimistic
  PMF by Connect-the-Dots (Doroshenko et al. 2022, Alg. 1; ``pld_pmf.create_pmf_pessimistic_
  connect_dots_fixed_gap``), once per neighbouring relation; dp-accounting composes by FFT and
  truncates tails pessimistically into the infinity mass.  A second, optimistic PMF (loss rounded
  *down* into buckets) gives a lower bound, used only to check agreement.
* PRV route: a custom ``PrivacyRandomVariable`` per step and relation whose survival differences
  are exact; prv-accountant's cell-centred discretisation and FFT composition (Gopi, Lee & Wutschitz
  2021, Thm. 5.5) return (lower, estimate, upper) for epsilon.

Each route returns an interval [lower, upper] for epsilon at the given delta, maximised over the
add and remove relations.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import special
from scipy.fft import irfft, next_fast_len, rfft
from dp_accounting.pld import pld_pmf
from prv_accountant import composers, discretisers
from prv_accountant.domain import Domain
from prv_accountant.privacy_random_variables import PrivacyRandomVariable


DIRECTIONS = ("remove", "add")


@dataclass(frozen=True)
class RouteResult:
    lower: float
    upper: float
    estimate: float
    per_direction: dict
    composed: dict = field(default_factory=dict, repr=False, compare=False)

    def delta_at(self, epsilon: float) -> float:
        """Pessimistic delta at ``epsilon`` from the composed PLDs (PLD route only)."""
        return max(pess.delta(epsilon) for pess, _ in self.composed.values())

    def delta_lower_at(self, epsilon: float) -> float:
        """Optimistic delta at ``epsilon`` (a lower bound, for the agreement check)."""
        return max(opt.delta(epsilon) for _, opt in self.composed.values())

    def finite_tail(self, x: float) -> float:
        """Largest probability, over relations, of a FINITE composed loss above ``x`` (the +inf
        atom, which holds truncated tails, excluded)."""
        return max(pess.finite_tail(x) for pess, _ in self.composed.values())

    def lower_tail(self, x: float) -> float:
        """Largest probability, over relations, of a composed loss below ``x``."""
        return max(pess.lower_tail(x) for pess, _ in self.composed.values())

    def as_dict(self) -> dict:
        return {"lower": self.lower, "estimate": self.estimate, "upper": self.upper,
                "per_direction": self.per_direction}


# ----------------------------------------------------------------------------------------------
# PLD route
# ----------------------------------------------------------------------------------------------
#: truncated tail mass per composition (moved to +inf in the pessimistic PMF, docs/privacy.md sec. 6)
TRUNCATION = 1e-16
#: safety factor on the round-off model u * count (measured sums stayed below 4 u count, docs/privacy.md)
ROUNDOFF_SAFETY = 10.0
#: largest array the PLD route allocates (about 130 MB in long double)
MAX_PLD_POINTS = 2 ** 23


@dataclass(frozen=True)
class ComposedPMF:
    """A composed privacy-loss PMF on the grid ``(lower + i) * step`` plus a mass at +inf.

    ``roundoff`` bounds the absolute error of any sum of ``probs`` (entries clipped at 0) caused by
    floating point in the FFT: the pessimistic delta adds it, the optimistic one subtracts it.
    """

    step: float
    lower: int
    probs: np.ndarray
    inf_mass: float
    roundoff: float
    pessimistic: bool

    def losses(self) -> np.ndarray:
        return (np.arange(self.probs.size) + self.lower) * self.step

    def delta(self, epsilon: float) -> float:
        t = self.losses()
        above = t > epsilon
        finite = float(np.sum(self.probs[above] * -np.expm1(epsilon - t[above])))
        sign = 1.0 if self.pessimistic else -1.0
        return min(1.0, max(0.0, finite + self.inf_mass + sign * self.roundoff))

    def epsilon(self, delta: float) -> float:
        """Smallest epsilon >= 0 with delta(epsilon) <= ``delta`` (inf if the +inf mass exceeds it);
        the closed form of dp-accounting's ``get_epsilon_for_delta``, vectorised over losses >= 0."""
        sign = 1.0 if self.pessimistic else -1.0
        target = delta - sign * self.roundoff
        if self.inf_mass >= target:
            return math.inf
        t = self.losses()
        keep = t >= 0
        kind = np.longdouble if t[-1] > 700 else np.float64    # e^-t must not underflow
        t, p = t[keep][::-1].astype(kind), self.probs[keep][::-1].astype(kind)     # descending
        weighted = p * np.exp(-t)
        up_prev = self.inf_mass + np.cumsum(p) - p               # mass at losses > t_k (and +inf)
        low_prev = np.cumsum(weighted) - weighted
        with np.errstate(divide="ignore", invalid="ignore"):
            cand = np.log((up_prev - target) / low_prev)
        hit = np.nonzero((up_prev > target) & (low_prev > 0) & (cand >= t))[0]
        if hit.size:
            return max(0.0, float(cand[hit[0]]))
        up_all, low_all = self.inf_mass + p.sum(), weighted.sum()
        if up_all <= low_all + target:
            return 0.0
        return max(0.0, float(np.log((up_all - target) / low_all)))

    def finite_tail(self, x: float) -> float:
        return float(np.sum(self.probs[self.losses() > x]))

    def lower_tail(self, x: float) -> float:
        return float(np.sum(self.probs[self.losses() < x]))


def _chernoff_range(probs: np.ndarray, count: int, tail: float) -> tuple[int, int]:
    """Index range [lo, hi] of the ``count``-fold sum of ``probs`` (a sub-probability vector on
    0..n-1) outside which at most ``tail`` of its mass lies: the Chernoff bound
    P(S >= a) <= E[e^{r S}] e^{-r a}, at orders r spread around the Gaussian optimum."""
    n = probs.size
    support = np.nonzero(probs > 0)[0]
    idx, p = support.astype(np.float64), probs[support]
    mean = float(np.dot(idx, p) / p.sum())
    sd = math.sqrt(max(float(np.dot((idx - mean) ** 2, p) / p.sum()), 1e-12))
    best = math.sqrt(2 * math.log(2 / tail) / count) / sd
    lo, hi = 0, (n - 1) * count
    for order in np.geomspace(1e-2 * best, 1e2 * best, 25):
        for r in (order, -order):
            x = r * (idx - mean)
            top = float(x.max())
            log_mgf = top + math.log(float(np.dot(p, np.exp(x - top)))) + r * mean
            bound = (count * log_mgf + math.log(2 / tail)) / r
            if not math.isfinite(bound):
                continue
            if r > 0:
                hi = min(hi, math.ceil(bound))
            else:
                lo = max(lo, math.floor(bound))
    lo = max(lo, 0)
    return lo, max(min(hi, (n - 1) * count), lo)


def _power(z: np.ndarray, count: int) -> np.ndarray:
    """z ** count by repeated squaring (complex long double ``**`` is 10x slower)."""
    out, base = None, z
    while count:
        if count & 1:
            out = base.copy() if out is None else out * base
        count >>= 1
        if count:
            base = base * base
    return out


def _fft_power(probs: np.ndarray, count: int, lo: int, hi: int, kind):
    """Entries lo..hi of the ``count``-fold self-convolution of ``probs`` by one real FFT in
    precision ``kind``; returns (values clipped at 0, round-off allowance for any sum of them)."""
    n_out = hi - lo + 1
    size = next_fast_len(max(n_out, probs.size), real=True)
    x = np.zeros(size, dtype=kind)
    x[:probs.size] = probs
    y = irfft(_power(rfft(x), count), size)
    return np.maximum(np.roll(y, -lo)[:n_out], 0).astype(np.float64), roundoff_allowance(kind, count)


def roundoff_allowance(kind, count: int) -> float:
    """Bound on the summed absolute FFT round-off of a ``count``-fold composition: the relative error
    of each Fourier coefficient grows like ``count`` times the unit roundoff u under the power, and
    the measured error summed over the whole output stayed below 4 u count for T = 10..1e5
    (docs/privacy.md, section 6); ROUNDOFF_SAFETY u count is used."""
    return ROUNDOFF_SAFETY * float(np.finfo(kind).eps) * max(count, 2)


def _self_compose(pmf: ComposedPMF, count: int, budget: float) -> ComposedPMF:
    """``count``-fold composition: in float64 when its round-off allowance (about 1e-15 T) stays
    below ``budget``, else in long double (about 1e-18 T)."""
    if count == 1:
        return pmf
    lo, hi = _chernoff_range(pmf.probs, count, TRUNCATION)
    kind = np.float64 if roundoff_allowance(np.float64, count) <= budget else np.longdouble
    probs, roundoff = _fft_power(pmf.probs, count, lo, hi, kind)
    inf_mass = -math.expm1(count * math.log1p(-pmf.inf_mass)) if pmf.inf_mass < 1 else 1.0
    if pmf.pessimistic:                     # truncated tails are counted at +inf
        inf_mass += TRUNCATION
    # an optimistic PMF drops them, and their aliases (at most TRUNCATION) count as round-off
    extra = count * pmf.roundoff + (0.0 if pmf.pessimistic else TRUNCATION)
    return ComposedPMF(pmf.step, pmf.lower * count + lo, probs, inf_mass, roundoff + extra, pmf.pessimistic)


def _compose(a: ComposedPMF, b: ComposedPMF) -> ComposedPMF:
    size = next_fast_len(a.probs.size + b.probs.size - 1, real=True)
    fa = rfft(np.asarray(a.probs, dtype=np.longdouble), size)
    fb = rfft(np.asarray(b.probs, dtype=np.longdouble), size)
    kind = np.longdouble
    probs = np.maximum(irfft(fa * fb, size)[:a.probs.size + b.probs.size - 1], 0).astype(np.float64)
    roundoff = roundoff_allowance(kind, 2)
    inf_mass = 1 - (1 - a.inf_mass) * (1 - b.inf_mass)
    return ComposedPMF(a.step, a.lower + b.lower, probs, inf_mass, roundoff + a.roundoff + b.roundoff,
                       a.pessimistic)


def _pld_pmfs(pair, direction: str, step: float):
    lo, hi = pair.loss_range(direction)
    k_lo, k_hi = math.floor(lo / step), math.ceil(hi / step)
    if k_hi - k_lo > MAX_PLD_POINTS:
        raise ValueError(f"a PLD step of {step:.3g} needs {k_hi - k_lo:.3g} grid points for this "
                         f"privacy-loss range (limit {MAX_PLD_POINTS}); choose a larger --pld-step")
    grid = np.arange(k_lo, k_hi + 1) * step
    upper, lower, below = pair.tails(direction, grid)
    inf_mass = pair.infinite_mass(direction)
    deltas = np.clip(upper - np.exp(grid) * lower, 0.0, 1.0)
    # delta(eps) is non-increasing; round-off in U - e^eps W at large eps can tilt it by an ulp:
    # the running maximum from the right is the non-increasing curve just above (pessimistic)
    deltas = np.maximum.accumulate(deltas[::-1])[::-1]
    dense = pld_pmf.create_pmf_pessimistic_connect_dots_fixed_gap(step, k_lo, k_hi, deltas).to_dense_pmf()
    pessimistic = ComposedPMF(step, dense._lower_loss, np.asarray(dense._probs, dtype=np.float64),
                              float(dense._infinity_mass), 0.0, True)
    # optimistic buckets: mass of (g_i, g_i+1] is placed at g_i; the +inf atom is kept.
    finite_above = np.maximum(upper - inf_mass, 0.0)
    probs = np.append(np.maximum(finite_above[:-1] - finite_above[1:], 0.0), finite_above[-1])
    probs[0] += below[0]
    optimistic = ComposedPMF(step, k_lo, probs, inf_mass, 0.0, False)
    return pessimistic, optimistic


def pld_route(groups: Sequence[tuple], delta: float, step: float,
              roundoff_budget: float | None = None) -> RouteResult:
    """``groups``: sequence of (step_pair, count).  Epsilon interval at ``delta``.

    Compositions run in float64 unless their round-off allowance would exceed ``roundoff_budget``
    (default 1e-4 delta), then in long double; the allowance is part of both bounds."""
    budget = 1e-4 * delta if roundoff_budget is None else roundoff_budget
    per_direction, composed = {}, {}
    lower_all, upper_all = 0.0, 0.0
    for direction in DIRECTIONS:
        totals = [None, None]
        for pair, count in groups:
            for i, pmf in enumerate(_pld_pmfs(pair, direction, step)):
                pmf = _self_compose(pmf, count, budget)
                totals[i] = pmf if totals[i] is None else _compose(totals[i], pmf)
        pess_total, opt_total = totals
        upper, lower = pess_total.epsilon(delta), opt_total.epsilon(delta)
        per_direction[direction] = {"lower": lower, "upper": upper}
        composed[direction] = (pess_total, opt_total)
        upper_all, lower_all = max(upper_all, upper), max(lower_all, lower)
    return RouteResult(lower_all, upper_all, upper_all, per_direction, composed)


# ----------------------------------------------------------------------------------------------
# PRV route
# ----------------------------------------------------------------------------------------------
class StepPRV(PrivacyRandomVariable):
    """Privacy random variable of one step and one relation, conditioned on being finite.

    ``probability(a, b)`` is computed from survival differences in the upper tail and from CDF
    differences in the lower tail, in long double as prv-accountant's float guard assumes.
    """

    def __init__(self, pair, direction: str):
        self.pair, self.direction = pair, direction
        self.t_lo, self.t_hi = pair.loss_range(direction)
        self._inf = pair.infinite_mass(direction)
        self._mean = pair.mean_loss(direction) / (1 - self._inf)

    @property
    def pm_inf(self) -> float:
        return self._inf

    def _tails(self, t):
        t = np.asarray(t, dtype=np.float64)
        flat = t.ravel()
        gt = np.zeros_like(flat)
        le = np.ones_like(flat)
        inside = (flat >= self.t_lo) & (flat < self.t_hi)
        below = flat < self.t_lo
        gt[below], le[below] = 1.0 - self._inf, 0.0
        if np.any(inside):
            u, _, v = self.pair.tails(self.direction, flat[inside])
            gt[inside], le[inside] = u - self._inf, v
        # mass of the finite loss above t_hi is below TAIL_NEGLIGIBLE: counted as at t_hi
        scale = 1.0 / (1.0 - self._inf)
        return (gt * scale).reshape(t.shape), (le * scale).reshape(t.shape)

    def cdf(self, t):
        return self._tails(t)[1]

    def probability(self, a, b):
        a_gt, a_le = self._tails(a)
        b_gt, b_le = self._tails(b)
        upper_side = np.asarray(a_gt, dtype=np.longdouble) - np.asarray(b_gt, dtype=np.longdouble)
        lower_side = np.asarray(b_le, dtype=np.longdouble) - np.asarray(a_le, dtype=np.longdouble)
        return np.maximum(np.where(a_gt < 0.5, upper_side, lower_side), 0)

    def mean(self) -> float:
        return self._mean


def _fast_domain(span: float, mesh: float) -> Domain:
    """An even-sized, origin-aligned domain covering [-span, span] whose size is a 5-smooth number,
    so the long-double FFT inside prv-accountant is fast (an awkward size costs 15x)."""
    size = next_fast_len(2 * math.ceil(span / mesh) + 2, real=True)
    while size % 2:
        size = next_fast_len(size + 1, real=True)
    half = (size - 2) // 2
    return Domain(-half * mesh, (half + 1) * mesh, size)


#: largest PRV grid (prv-accountant composes in long double: 2^23 points take a few seconds)
MAX_PRV_POINTS = 2 ** 23


def _mesh(groups, eps_error: float, delta_error: float) -> float:
    """prv-accountant's grid mesh for an eps_error (Gopi, Lee & Wutschitz 2021, Thm. 5.5)."""
    total = sum(count for _, count in groups)
    return eps_error / math.sqrt(total / 2 * math.log(12 / delta_error))


def _domain_span(groups, eps_max: float) -> float:
    """Half-width of the PRV domain: eps_max, widened to hold every step's loss range."""
    reach = max(max(abs(t) for t in pair.loss_range(d)) for pair, _ in groups for d in DIRECTIONS)
    return max(eps_max, 1.05 * reach)


def smallest_eps_error(groups, eps_max: float, delta_error: float) -> float:
    """The smallest eps_error whose PRV grid on the domain for ``eps_max`` fits MAX_PRV_POINTS."""
    largest_mesh = 2 * _domain_span(groups, eps_max) / (MAX_PRV_POINTS - 4)
    return largest_mesh / _mesh(groups, 1.0, delta_error)


def _prv_composed(groups: Sequence[tuple], delta_error: float, eps_error: float, eps_max: float) -> dict:
    """Composed discrete PRVs per relation, on a domain covering [-eps_max, eps_max]."""
    mesh = _mesh(groups, eps_error, delta_error)
    span = _domain_span(groups, eps_max)
    if 2 * span / mesh > MAX_PRV_POINTS:
        raise ValueError(f"a PRV eps_error of {eps_error:.3g} needs {2 * span / mesh:.3g} grid points "
                         f"(limit {MAX_PRV_POINTS}); choose a larger --prv-eps-error")
    domain = _fast_domain(span, mesh)
    out = {}
    for direction in DIRECTIONS:
        prvs = [StepPRV(pair, direction) for pair, _ in groups]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            discrete = [discretisers.CellCentred().discretise(prv, domain) for prv in prvs]
            out[direction] = (composers.Heterogeneous(discrete).compute_composition([c for _, c in groups]), span)
    return out


def prv_route(groups: Sequence[tuple], delta: float, eps_error: float, eps_max: float) -> RouteResult:
    """prv-accountant composition of the custom step PRVs; ``eps_max`` sizes the domain [-L, L]."""
    delta_error = delta * 1e-3
    per_direction = {}
    lower_all = upper_all = est_all = 0.0
    for direction, (composed, span) in _prv_composed(groups, delta_error, eps_error, eps_max).items():
        low, est, up = composed.compute_epsilon(delta, delta_error, eps_error)
        per_direction[direction] = {"lower": low, "estimate": est, "upper": up, "domain": span}
        if up >= span:
            raise ValueError(f"PRV domain [-{span:.3g}, {span:.3g}] too small for epsilon {up:.3g}")
        lower_all, est_all, upper_all = max(lower_all, low), max(est_all, est), max(upper_all, up)
    return RouteResult(lower_all, upper_all, est_all, per_direction)


def prv_delta(groups: Sequence[tuple], epsilon: float, delta_error: float, eps_error: float,
              eps_max: float) -> tuple[float, float, float]:
    """(lower, estimate, upper) for delta at ``epsilon``, max over relations (prv-accountant's
    bounds: the estimate at epsilon +/- eps_error, -/+ delta_error, and -/+ the long-double floor
    of a sum over the grid, eps * size)."""
    worst = (0.0, 0.0, 0.0)
    for composed, _ in _prv_composed(groups, delta_error, eps_error, eps_max).values():
        floor = float(np.finfo(np.longdouble).eps) * len(composed.pmf)
        low = float(composed.compute_delta_estimate(epsilon + eps_error)) - delta_error - floor
        est = float(composed.compute_delta_estimate(epsilon))
        up = float(composed.compute_delta_estimate(epsilon - eps_error)) + delta_error + floor
        worst = tuple(max(a, b) for a, b in zip(worst, (low, est, up)))
    return worst
