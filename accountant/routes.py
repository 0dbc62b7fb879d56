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
from scipy.fft import next_fast_len
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
        return max(float(pess.get_delta_for_epsilon(epsilon)) for pess, _ in self.composed.values())

    def delta_lower_at(self, epsilon: float) -> float:
        """Optimistic delta at ``epsilon`` (a lower bound, for the agreement check)."""
        return max(float(opt.get_delta_for_epsilon(epsilon)) for _, opt in self.composed.values())

    def finite_tail(self, x: float) -> float:
        """Largest probability, over relations, of a FINITE composed loss above ``x`` (the +inf
        atom, which holds truncated tails, excluded).  Reads the dense PMF of dp-accounting 0.6."""
        worst = 0.0
        for pmf, _ in self.composed.values():
            dense = pmf.to_dense_pmf()
            losses = (np.arange(dense.size) + dense._lower_loss) * dense._discretization
            worst = max(worst, float(np.sum(dense._probs[losses > x])))
        return worst

    def as_dict(self) -> dict:
        return {"lower": self.lower, "estimate": self.estimate, "upper": self.upper,
                "per_direction": self.per_direction}


# ----------------------------------------------------------------------------------------------
# PLD route
# ----------------------------------------------------------------------------------------------
def _pld_pmfs(pair, direction: str, step: float):
    lo, hi = pair.loss_range(direction)
    k_lo, k_hi = math.floor(lo / step), math.ceil(hi / step)
    if k_hi - k_lo > 4_000_000:
        raise ValueError("privacy-loss range too wide for the PLD grid; increase the PLD step")
    grid = np.arange(k_lo, k_hi + 1) * step
    upper, lower, below = pair.tails(direction, grid)
    deltas = np.clip(upper - np.exp(grid) * lower, 0.0, 1.0)
    pessimistic = pld_pmf.create_pmf_pessimistic_connect_dots_fixed_gap(step, k_lo, k_hi, deltas)
    # optimistic buckets: mass of (g_i, g_i+1] is placed at g_i; the +inf atom is dropped.
    finite_above = np.maximum(upper - pair.infinite_mass(direction), 0.0)
    probs = np.append(np.maximum(finite_above[:-1] - finite_above[1:], 0.0), finite_above[-1])
    probs[0] += below[0]
    optimistic = pld_pmf.DensePLDPmf(step, k_lo, probs, 0.0, False)
    return pessimistic, optimistic


def pld_route(groups: Sequence[tuple], delta: float, step: float) -> RouteResult:
    """``groups``: sequence of (step_pair, count).  Epsilon interval at ``delta``."""
    per_direction, composed = {}, {}
    lower_all, upper_all = 0.0, 0.0
    for direction in DIRECTIONS:
        pess_total, opt_total = None, None
        for pair, count in groups:
            pess, opt = _pld_pmfs(pair, direction, step)
            pess, opt = pess.self_compose(count), opt.self_compose(count)
            pess_total = pess if pess_total is None else pld_pmf.compose_pmfs(pess_total, pess, 1e-15)
            opt_total = opt if opt_total is None else pld_pmf.compose_pmfs(opt_total, opt, 1e-15)
        upper = pess_total.get_epsilon_for_delta(delta)
        lower = opt_total.get_epsilon_for_delta(delta)
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


def _prv_composed(groups: Sequence[tuple], delta_error: float, eps_error: float, eps_max: float) -> dict:
    """Composed discrete PRVs per relation, on a domain covering [-eps_max - 1, eps_max + 1]."""
    total = sum(count for _, count in groups)
    mesh = eps_error / math.sqrt(total / 2 * math.log(12 / delta_error))
    out = {}
    for direction in DIRECTIONS:
        prvs = [StepPRV(pair, direction) for pair, _ in groups]
        span = max(eps_max, *(max(abs(p.t_lo), abs(p.t_hi)) for p in prvs)) + 1.0
        if 2 * span / mesh > 2.5e7:
            raise ValueError("PRV grid would exceed 2.5e7 points; relax eps_error")
        domain = _fast_domain(span, mesh)
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
        if up >= span - 1.0:
            raise ValueError(f"PRV domain [-{span:.3g}, {span:.3g}] too small for epsilon {up:.3g}")
        lower_all, est_all, upper_all = max(lower_all, low), max(est_all, est), max(upper_all, up)
    return RouteResult(lower_all, upper_all, est_all, per_direction)


def prv_delta(groups: Sequence[tuple], epsilon: float, delta_error: float, eps_error: float,
              eps_max: float) -> tuple[float, float, float]:
    """(lower, estimate, upper) for delta at ``epsilon``, max over relations (prv-accountant's
    bounds: the estimate at epsilon +/- eps_error, -/+ delta_error)."""
    worst = (0.0, 0.0, 0.0)
    for composed, _ in _prv_composed(groups, delta_error, eps_error, eps_max).values():
        low = float(composed.compute_delta_estimate(epsilon + eps_error)) - delta_error
        est = float(composed.compute_delta_estimate(epsilon))
        up = float(composed.compute_delta_estimate(epsilon - eps_error)) + delta_error
        worst = tuple(max(a, b) for a, b in zip(worst, (low, est, up)))
    return worst
