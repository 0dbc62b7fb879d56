"""An independent check of every certificate of a tabulated law (docs/privacy.md, "Tables").

The PLD and PRV routes both compose the per-step tails of :mod:`accountant.privacy_loss`; a bug
there is shared, and two routes would agree on a wrong number.  This module computes the loss
distribution of one step again, from the table alone, with its own code:

* cells: the cut points ``edges U (edges + s)`` as ``fractions.Fraction`` values, walked in order
  with two pointers; core masses are exact rationals ``mass_j * |cell| / |bin|`` rounded once,
  tail masses closed-form exponential integrals; cells touching a tail are split in 8.  On each
  cell the log-likelihood ratio l lies in [min log p_s - max log p, max log p_s - min log p].
* one step (T = 1): the exact hockey-stick lies between ``sum_c (U_c - e^eps V_c)_+`` (the event
  "the release lands in one of the cells where that is positive") and
  ``sum_c U_c (1 - e^(eps - L_max,c))_+`` (the loss raised to its largest value on each cell); both
  bounds are monotone in eps and give an interval for epsilon.
* T steps: a lower bound from binomial events.  If E is a union of cells with masses u under the
  upper law and v under the lower law, then "at least k of the T releases land in E" has
  probabilities P(Bin(T, u) >= k) and P(Bin(T, v) >= k), and delta(eps) is at least their
  hockey-stick difference (data processing for the hockey-stick divergence, Balle et al. 2018).

A composition is at least as private-loss-heavy as any of its parts (post-processing), so the lower
bound of one tabulated group bounds the whole certificate from below.  The certificate must lie at
or above this lower bound, and for a single release within the interval; otherwise no certificate
is printed (accountant.certify).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from scipy import stats

from accountant.noise import Tabulated

#: cells with a tail on one side are split in this many equal parts (tighter loss intervals)
TAIL_SPLIT = 8
#: relative shading of the event probabilities against float round-off in their sums
SHADE = 1e-9


@dataclass(frozen=True)
class StepAtoms:
    """One step and relation: per cell the upper mass, the lower mass and the loss interval."""

    upper: np.ndarray
    lower: np.ndarray
    loss_lo: np.ndarray
    loss_hi: np.ndarray


@dataclass(frozen=True)
class CheckResult:
    lower: float          # a lower bound on the true epsilon
    upper: float          # an upper bound (inf unless one release of one tabulated law)


def _tail_side(tab: Tabulated, edges: list, right: bool, a: Fraction, b: Fraction):
    """(mass, min log density, max log density) of the table law on [a, b] inside one tail."""
    if tab.tail_mass == 0:
        return 0.0, -math.inf, -math.inf
    r, tm = tab.tail_rate, tab.tail_mass
    near, far = (float(a - edges[-1]), float(b - edges[-1])) if right else (float(edges[0] - b), float(edges[0] - a))
    mass = tm * math.exp(-r * near) * -math.expm1(-r * float(b - a))     # exact width, not far - near
    top = math.log(tm) + math.log(r)
    return mass, top - r * far, top - r * near


def step_cells(tab: Tabulated, shift: float):
    """Arrays (P mass, P_s mass, l_min, l_max) over the cells of [-reach, reach + s], the two outer
    cells included, from exact rationals (see the module docstring)."""
    edges = [Fraction(float(e)) for e in tab.edges]
    s = Fraction(float(shift))
    shifted = [e + s for e in edges]
    cuts = sorted(set(edges) | set(shifted))
    n = len(tab.mass)
    masses = [Fraction(float(m)) for m in tab.mass]
    widths = [edges[j + 1] - edges[j] for j in range(n)]
    log_d = [math.log(m) - math.log(w) if m else -math.inf for m, w in zip(masses, widths)]

    def side(j, a, b, cell):       # j: bin of the cell (-1 left of the table, n right of it)
        if 0 <= j < n:
            return (float(masses[j] * cell / widths[j]) if masses[j] else 0.0), log_d[j], log_d[j]
        return _tail_side(tab, edges, j >= n, a, b)

    rows = []
    i = k = 0       # x lies in bin i - 1 (edges[i - 1] <= a < edges[i]), x - s in bin k - 1
    for a, b in zip(cuts[:-1], cuts[1:]):
        while i < len(edges) and edges[i] <= a:
            i += 1
        while k < len(edges) and shifted[k] <= a:
            k += 1
        jx, js = min(i - 1, n), min(k - 1, n)
        parts = TAIL_SPLIT if (jx in (-1, n) or js in (-1, n)) and tab.tail_mass > 0 else 1
        for p in range(parts):
            lo, hi = (a + (b - a) * p / parts, a + (b - a) * (p + 1) / parts) if parts > 1 else (a, b)
            cell = hi - lo
            pm, p_min, p_max = side(jx, lo, hi, cell)
            sm, s_min, s_max = side(js, lo - s, hi - s, cell) if js in (-1, n) else side(js, None, None, cell)
            rows.append((pm, sm, _diff(s_min, p_max), _diff(s_max, p_min)))
    if tab.tail_mass > 0:   # x < -reach and x > reach + s: both in one tail, l = -/+ rate s
        far = tab.tail_mass * math.exp(-tab.tail_rate * float(s))
        rows.append((tab.tail_mass, far, -tab.tail_rate * float(s), -tab.tail_rate * float(s)))
        rows.append((far, tab.tail_mass, tab.tail_rate * float(s), tab.tail_rate * float(s)))
    out = np.array(rows, dtype=np.float64).reshape(-1, 4).T
    live = (out[0] > 0) | (out[1] > 0)
    return tuple(col[live] for col in out)


def _diff(a: float, b: float) -> float:
    """a - b for log densities: +inf where only b vanishes, -inf where only a does."""
    if b == -math.inf:
        return math.inf
    return a - b


def _mix(ell: np.ndarray, q: float) -> np.ndarray:
    """log(1 - q + q e^l), increasing in l (no overflow for large l).  Where the sum is below 1/2
    (q near 1 and l very negative) it is formed as logaddexp(log(1 - q), log q + l): log1p of
    q (e^l - 1) would cancel there (at q = 1 - 2^-53 the argument is -1 to within its own
    rounding)."""
    if q == 1:
        return ell
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        x = q * np.expm1(np.minimum(ell, 700.0))
        small = np.log1p(x)
        low = np.logaddexp(math.log1p(-q), math.log(q) + np.minimum(ell, 0.0))
        large = ell + math.log(q) + np.log1p((1 - q) / q * np.exp(-np.maximum(ell, 700.0)))
    return np.where(ell > 700, large, np.where(x < -0.5, low, small))


def step_atoms(cells, q: float, direction: str) -> StepAtoms:
    """One Poisson-subsampled step from :func:`step_cells`: remove (A, P), add (P, A), with
    A = (1 - q) P + q P_s and loss log(1 - q + q e^l) (remove) or its negative (add)."""
    p, s, l_min, l_max = cells
    a = (1 - q) * p + q * s
    lo, hi = _mix(l_min, q), _mix(l_max, q)
    if direction == "remove":
        return StepAtoms(a, p, lo, hi)
    return StepAtoms(p, a, -hi, -lo)


def _one_step_delta(atoms: StepAtoms, eps: float) -> tuple[float, float]:
    """(lower, upper) bounds on delta(eps) of one step.  Below, per cell the larger of
    (U - e^eps V)_+ and U (1 - e^(eps - L_min))_+ (valid where V underflowed to 0); above,
    U (1 - e^(eps - L_max))_+.  Only a cell whose loss is +inf counts its whole mass at every eps."""
    e = math.exp(eps) if eps < 700 else math.inf
    infinite = atoms.loss_lo == math.inf
    with np.errstate(over="ignore", invalid="ignore"):
        jensen = np.where(atoms.lower > 0, atoms.upper - e * atoms.lower, np.where(infinite, atoms.upper, 0.0))
        by_loss = atoms.upper * -np.expm1(np.minimum(eps - atoms.loss_lo, 0.0))
        low = float(np.sum(np.maximum(np.nan_to_num(np.maximum(jensen, by_loss), nan=0.0), 0.0)))
        factor = np.where(atoms.loss_hi == math.inf, 1.0, -np.expm1(np.minimum(eps - atoms.loss_hi, 0.0)))
        up = float(np.sum(atoms.upper * np.maximum(factor, 0.0)))
    return low, up


#: largest epsilon the one-release interval resolves (a lower bound stops here, an upper one is inf)
EPS_CAP = 1e4


def _solve(fn, delta: float, lower: bool) -> float:
    """Smallest eps >= 0 with fn(eps) <= delta for a non-increasing fn: inf when even the +inf
    loss mass fn(1e300) exceeds delta; beyond EPS_CAP, EPS_CAP for a lower bound, inf for an upper."""
    if fn(1e300) > delta:
        return math.inf
    hi = EPS_CAP
    if fn(hi) > delta:
        return hi if lower else math.inf
    if fn(0.0) <= delta:
        return 0.0
    lo = 0.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if fn(mid) > delta else (lo, mid)
    return lo if lower else hi


def one_step_interval(atoms: StepAtoms, delta: float) -> tuple[float, float]:
    """[lower, upper] for the epsilon of one step at ``delta``."""
    lower = _solve(lambda e: _one_step_delta(atoms, e)[0], delta, True)
    upper = _solve(lambda e: _one_step_delta(atoms, e)[1], delta, False)
    return lower, upper


def _events(atoms: StepAtoms, steps: int, floor: float, thresholds: int = 256):
    """(P(Bin(T, u) >= k), P(Bin(T, v) >= k), v == 0) over events "at least k of T releases land in
    the cells of loss above a threshold", shaded against round-off (u rounded down, v up); entries
    whose lower probability is too close to underflow to be trusted are dropped (None if none)."""
    mid = 0.5 * (np.nan_to_num(atoms.loss_lo, neginf=-1e300) + np.nan_to_num(atoms.loss_hi, posinf=1e300))
    order = np.argsort(-mid, kind="stable")
    u = np.cumsum(atoms.upper[order]) * (1 - SHADE)
    v = np.cumsum(atoms.lower[order]) * (1 + SHADE)
    only_infinite = np.cumsum(atoms.loss_lo[order] != math.inf) == 0    # v = 0 exactly, not by underflow
    idx = np.nonzero(u > floor)[0]
    if idx.size == 0:
        return None
    idx = np.unique(idx[np.linspace(0, len(idx) - 1, min(thresholds, len(idx))).round().astype(int)])
    u, v, only_infinite = np.minimum(u[idx], 1.0), np.minimum(v[idx], 1.0), only_infinite[idx]
    ks = np.unique(np.concatenate([np.arange(1, min(steps, 32) + 1),
                                   np.geomspace(1, steps, 32).round().astype(int)]))
    bu = (stats.binom.sf(ks[None, :] - 1, steps, u[:, None]) * (1 - SHADE)).ravel()
    bv = (stats.binom.sf(ks[None, :] - 1, steps, v[:, None]) * (1 + SHADE)).ravel()
    exact_zero = np.broadcast_to(only_infinite[:, None], (len(u), len(ks))).ravel()   # an infinite loss
    trusted = exact_zero | (bv >= 1e-280)
    return bu[trusted], bv[trusted], exact_zero[trusted]


def event_lower_bound(atoms: StepAtoms, steps: int, delta: float) -> float:
    """Largest log((P(Bin(T, u) >= k) - delta) / P(Bin(T, v) >= k)) over the events of
    :func:`_events`: a lower bound on the epsilon of T composed steps at ``delta``."""
    events = _events(atoms, steps, delta / max(steps, 1) * 1e-3)
    if events is None:
        return 0.0
    bu, bv, zero = events
    with np.errstate(divide="ignore", invalid="ignore"):
        cand = np.where(bu > delta, np.log(np.maximum(bu - delta, 1e-300)) - np.log(bv), -math.inf)
    cand = np.where(zero & (bu > delta), math.inf, cand)
    return max(float(np.max(cand, initial=0.0)), 0.0)


def event_delta_lower_bound(atoms: StepAtoms, steps: int, epsilon: float) -> float:
    """Largest P(Bin(T, u) >= k) - e^eps P(Bin(T, v) >= k): a lower bound on delta(eps)."""
    events = _events(atoms, steps, 0.0)
    if events is None:
        return 0.0
    bu, bv, _ = events
    with np.errstate(over="ignore", invalid="ignore"):
        gap = bu - math.exp(min(epsilon, 700.0)) * bv
    return max(float(np.max(np.nan_to_num(gap, nan=0.0, neginf=0.0), initial=0.0)), 0.0)


def _tables(groups):
    from accountant.privacy_loss import ShiftPair

    return [(pair, count) for pair, count in groups
            if isinstance(pair, ShiftPair) and isinstance(pair.noise, Tabulated)]


def delta_lower(groups, epsilon: float) -> float | None:
    """An independent lower bound on the composed delta at ``epsilon`` (None without a table)."""
    tables = _tables(groups)
    if not tables:
        return None
    best = 0.0
    for pair, count in tables:
        cells = step_cells(pair.noise, pair.shift)
        for direction in ("remove", "add"):
            atoms = step_atoms(cells, pair.q, direction)
            if count == 1:
                best = max(best, _one_step_delta(atoms, epsilon)[0])
            best = max(best, event_delta_lower_bound(atoms, count, epsilon))
    return best


def check(groups, delta: float) -> CheckResult | None:
    """Independent bounds for a composition ``groups`` = [(step pair, count)], or None when no group
    is a Poisson-subsampled shift of a tabulated law."""
    tables = _tables(groups)
    if not tables:
        return None
    lower, upper = 0.0, math.inf
    single = len(groups) == 1 and groups[0][1] == 1
    for pair, count in tables:
        cells = step_cells(pair.noise, pair.shift)
        for direction in ("remove", "add"):
            atoms = step_atoms(cells, pair.q, direction)
            if single:
                low, up = one_step_interval(atoms, delta)
                upper = up if upper == math.inf else max(upper, up)
            else:
                low = event_lower_bound(atoms, count, delta)
            lower = max(lower, low)
    return CheckResult(lower, upper)
