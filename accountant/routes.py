"""The two independent composition routes: PLD (dp-accounting) and PRV (prv-accountant).

Both start from the exact per-step tails of :mod:`accountant.privacy_loss` and differ in everything
after: discretisation, composition, error control.

* PLD route: the exact hockey-stick curve on a loss grid of step ``pld_step`` becomes a pessimistic
  PMF by Connect-the-Dots (Doroshenko et al. 2022, Alg. 1; :func:`accountant.composition.
  connect_the_dots`, checked against dp-accounting's), once per neighbouring relation, composed by
  :mod:`accountant.composition` (one FFT per step law, tails truncated pessimistically into the
  infinity mass).  A second, optimistic PMF (loss rounded
  *down* into buckets) gives a lower bound, used only to check agreement.
* PRV route: a custom ``PrivacyRandomVariable`` per step and relation whose survival differences
  are exact; prv-accountant's cell-centred discretisation and FFT composition (Gopi, Lee & Wutschitz
  2021, Thm. 5.5) return (lower, estimate, upper) for epsilon.

Each route returns an interval [lower, upper] for epsilon at the given delta, maximised over the
add and remove relations.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy.fft import next_fast_len
from prv_accountant import composers, discretisers
from prv_accountant.domain import Domain
from prv_accountant.privacy_random_variables import PrivacyRandomVariable

from accountant.composition import (TRUNCATION, ComposedPMF, chernoff_range, connect_the_dots, epsilon_for_delta,
                                    roundoff_allowance)
from accountant.noise import Tabulated


DIRECTIONS = ("remove", "add")


@dataclass(frozen=True)
class RouteResult:
    lower: float
    upper: float
    estimate: float
    per_direction: dict
    composed: dict = field(default_factory=dict, repr=False, compare=False)
    step: float | None = None

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
#: largest PLD grid (also bounds the time: a long-double composition of 2^23 points takes seconds)
MAX_PLD_POINTS = 2 ** 23
#: default memory budget of one certificate (``Accuracy(memory_budget=...)``, ``--memory-budget``)
DEFAULT_MEMORY_BUDGET = 4 * 2 ** 30
#: peak bytes per point of the PLD route's largest array: the long-double composition holds its
#: input, its half-size complex transform, two running products of the power and the inverse
#: transform (16 + 3 x 16 + 16 bytes), plus float64 copies
PLD_BYTES_PER_POINT = 100
#: the same for prv-accountant's long-double discretisation and Fourier composition
PRV_BYTES_PER_POINT = 160
#: coarsest PLD step.  Connect-the-Dots stays an upper bound at any step, but beyond this the
#: certificate is no longer informative and the grid no longer resolves a step's loss
MAX_PLD_STEP = 1.0


class GridBudgetExceeded(ValueError):
    """A grid the certificate needs does not fit the memory budget (raised before allocating).
    ``points``: the grid size needed; ``limit``: what the budget allows."""

    def __init__(self, message: str, points: float, limit: int):
        super().__init__(message)
        self.points, self.limit = float(points), int(limit)


class RouteFailure(ValueError):
    """A route cannot evaluate this mechanism numerically (e.g. prv-accountant's mean check)."""


def grid_limit(memory_budget: float, bytes_per_point: int, cap: int) -> int:
    """Largest grid (points) a route may allocate under ``memory_budget`` bytes, at most ``cap``."""
    return int(max(0, min(cap, memory_budget // bytes_per_point)))


#: evaluations (grid point x linear table cell) one route may spend per relation on a table's
#: level-set masses: each costs about a microsecond, so this bounds the time of a certificate to
#: tens of seconds; a grid that would need more is coarsened (soundly) like one too large for memory
TAIL_WORK = 2e7


@functools.lru_cache(maxsize=256)
def linear_cells(pair) -> int:
    """Cells of a table's loss partition on which the log-likelihood ratio is linear (exactly one of
    x, x - s in an exponential tail); the level-set masses cost one pass over them per grid point.
    0 for other laws (their cost per point does not grow with the law)."""
    noise = getattr(pair, "noise", None)
    if not isinstance(noise, Tabulated) or noise.tail_mass == 0:
        return 0
    cuts = np.unique(np.concatenate([noise.edges, noise.edges + pair.shift]))
    mid = 0.5 * (cuts[:-1] + cuts[1:])
    return int(np.sum((np.abs(mid) > noise.reach) ^ (np.abs(mid - pair.shift) > noise.reach)))


def work_points(groups) -> float:
    """Largest grid whose level-set masses fit TAIL_WORK for every step of ``groups``."""
    cells = max(linear_cells(pair) for pair, _ in groups)
    return TAIL_WORK / cells if cells else math.inf


def chunked_tails(pair, direction: str, t: np.ndarray, memory_budget: float):
    """``pair.tails(direction, t)`` evaluated in slices of ``t``: the level-set masses of a table
    build (linear cells x points) arrays, so one call on a whole grid can need many GB; slices of
    about 2^17 such elements also run twice as fast as large ones (cache)."""
    t = np.asarray(t, dtype=np.float64)
    cells = linear_cells(pair)
    chunk = int(max(1024, memory_budget // 8 // (16 * 160)))
    if cells:
        chunk = min(chunk, max(16, 2 ** 17 // cells))
    if t.size <= chunk:
        return pair.tails(direction, t)
    parts = [pair.tails(direction, t[i:i + chunk]) for i in range(0, t.size, chunk)]
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))


def _check_points(points: float, max_points: int, what: str):
    if not points <= max_points:
        raise GridBudgetExceeded(f"the {what} needs {points:.3g} grid points (limit {max_points}); "
                                 "choose a larger --pld-step or raise --memory-budget", points, max_points)


def hockey_stick_on_grid(upper: np.ndarray, lower: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """delta(g) = U(g) - e^g W(g) on a grid, without overflow (e^g W is formed as exp(g + log W)
    and capped at e, so it never meets inf * 0) and made non-increasing by a running maximum from
    the right: the exact curve is non-increasing, and where round-off breaks that, the larger
    (pessimistic) value is kept (Connect-the-Dots needs a non-increasing curve)."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        scaled = np.exp(np.minimum(grid + np.log(np.maximum(lower, 0.0)), 1.0))
    deltas = np.clip(upper - scaled, 0.0, 1.0)
    return np.maximum.accumulate(deltas[::-1])[::-1]


def pld_grid(pair, direction: str, step: float) -> tuple[int, int]:
    """Index range [k_lo, k_hi] of the PLD grid of one step and relation."""
    lo, hi = pair.loss_range(direction)
    return math.floor(lo / step), math.ceil(hi / step)


def _pld_pmfs(pair, direction: str, step: float, max_points: int = MAX_PLD_POINTS,
              memory_budget: float = DEFAULT_MEMORY_BUDGET):
    k_lo, k_hi = pld_grid(pair, direction, step)
    _check_points(k_hi - k_lo + 1, min(max_points, work_points([(pair, 1)])), f"PLD grid of step {step:.3g}")
    grid = np.arange(k_lo, k_hi + 1) * step
    upper, lower, below = chunked_tails(pair, direction, grid, memory_budget)
    inf_mass = pair.infinite_mass(direction)
    deltas = hockey_stick_on_grid(upper, lower, grid)
    pessimistic = connect_the_dots(step, k_lo, deltas)
    # optimistic buckets: mass of (g_i, g_i+1] is placed at g_i; the +inf atom is kept.
    finite_above = np.maximum(upper - inf_mass, 0.0)
    probs = np.append(np.maximum(finite_above[:-1] - finite_above[1:], 0.0), finite_above[-1])
    probs[0] += below[0]
    optimistic = ComposedPMF(step, k_lo, probs, inf_mass, 0.0, False)
    return pessimistic, optimistic


def pld_route(groups: Sequence[tuple], delta: float, step: float,
              roundoff_budget: float | None = None, memory_budget: float = DEFAULT_MEMORY_BUDGET,
              coarsen: bool = False, upper_only: bool = False) -> RouteResult:
    """``groups``: sequence of (step_pair, count).  Epsilon interval at ``delta``; with
    ``upper_only`` the optimistic PMFs are not composed (half the time; lower bound 0: searches).

    Compositions run in float64 unless their round-off allowance would exceed ``roundoff_budget``
    (default 1e-4 delta), then in long double; the allowance is part of both bounds.  No grid has
    more points than ``memory_budget`` allows (nor MAX_PLD_POINTS): one that would is refused
    before it is allocated (:class:`GridBudgetExceeded`), or, with ``coarsen``, the step grows until
    it fits, up to MAX_PLD_STEP (a Connect-the-Dots PMF dominates the pair at any step, Doroshenko
    et al. 2022).  The step used is ``result.step``."""
    budget = 1e-4 * delta if roundoff_budget is None else roundoff_budget
    max_points = grid_limit(memory_budget, PLD_BYTES_PER_POINT, MAX_PLD_POINTS)
    if coarsen:
        step = max(step, _composed_step(groups, step, max_points))
    while True:
        try:
            return _pld_route(groups, delta, step, budget, max_points, memory_budget, upper_only)
        except GridBudgetExceeded as exc:
            if not coarsen or step >= MAX_PLD_STEP or not math.isfinite(exc.points):
                raise
            step = min(MAX_PLD_STEP, step * max(1.05 * exc.points / max(exc.limit, 1), 1.05))


def _composed_step(groups, step: float, max_points: int) -> float:
    """The step at which every composition fits ``max_points``, estimated from the Chernoff ranges
    of the per-step PMFs at a 16x coarser step (cheap); the route checks the sizes again."""
    probe = min(16 * step, MAX_PLD_STEP)
    widest = 0.0
    for direction in DIRECTIONS:
        for pair, count in groups:
            k_lo, k_hi = pld_grid(pair, direction, probe)
            if count == 1 or k_hi - k_lo + 1 > max_points:
                continue
            try:
                pess, _ = _pld_pmfs(pair, direction, probe, max_points)
            except GridBudgetExceeded:
                continue
            lo, hi = chernoff_range(pess.probs, count, TRUNCATION)
            widest = max(widest, (hi - lo + 1) * probe)
    return 1.1 * widest / max(max_points, 1)


def _pld_route(groups, delta, step, budget, max_points, memory_budget, upper_only=False) -> RouteResult:
    # every step's PMFs first, and the size of every composition checked before any is computed
    pmfs = {(d, i): _pld_pmfs(pair, d, step, max_points, memory_budget)
            for d in DIRECTIONS for i, (pair, _) in enumerate(groups)}
    kinds = (0,) if upper_only else (0, 1)
    windows = {}
    for direction in DIRECTIONS:
        for k in kinds:
            total = 0
            for i, (_, count) in enumerate(groups):
                pmf = pmfs[direction, i][k]
                lo, hi = chernoff_range(pmf.probs, count, TRUNCATION) if count > 1 else (0, pmf.probs.size - 1)
                windows[direction, i, k] = (lo, hi)
                _check_points(max(hi - lo + 1, pmf.probs.size), max_points, f"{count}-fold composition")
                total += hi - lo + 1
            _check_points(total, max_points, "composition")
    per_direction, composed = {}, {}
    lower_all, upper_all = 0.0, 0.0
    for direction in DIRECTIONS:
        totals = [None, None]
        for i, (pair, count) in enumerate(groups):
            for k in kinds:
                pmf = pmfs[direction, i][k].self_compose(count, budget, windows[direction, i, k])
                totals[k] = pmf if totals[k] is None else totals[k].compose(pmf)
        pess_total, opt_total = totals
        upper = pess_total.epsilon(delta)
        lower = 0.0 if upper_only else opt_total.epsilon(delta)
        per_direction[direction] = {"lower": lower, "upper": upper}
        composed[direction] = (pess_total, opt_total)
        upper_all, lower_all = max(upper_all, upper), max(lower_all, lower)
    return RouteResult(lower_all, upper_all, upper_all, per_direction, composed, step=step)


# ----------------------------------------------------------------------------------------------
# PRV route
# ----------------------------------------------------------------------------------------------
class StepPRV(PrivacyRandomVariable):
    """Privacy random variable of one step and one relation, conditioned on being finite.

    ``probability(a, b)`` is computed from survival differences in the upper tail and from CDF
    differences in the lower tail, in long double as prv-accountant's float guard assumes.
    """

    def __init__(self, pair, direction: str, memory_budget: float = DEFAULT_MEMORY_BUDGET,
                 kind=np.longdouble):
        self.pair, self.direction, self.memory_budget, self.kind = pair, direction, memory_budget, kind
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
            u, _, v = chunked_tails(self.pair, self.direction, flat[inside], self.memory_budget)
            gt[inside], le[inside] = u - self._inf, v
        # mass of the finite loss above t_hi is below TAIL_NEGLIGIBLE: counted as at t_hi
        scale = 1.0 / (1.0 - self._inf)
        return (gt * scale).reshape(t.shape), (le * scale).reshape(t.shape)

    def cdf(self, t):
        return self._tails(t)[1]

    def probability(self, a, b):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a.ndim == 1 and a.shape == b.shape and a.size > 1 and np.all(
                np.abs(a[1:] - b[:-1]) <= 1e-9 * (b[0] - a[0])):
            # adjacent cells (prv-accountant's grid): one evaluation at the shared edges, so each
            # cell is bounded by exactly the edges of its neighbours (a partition of the line)
            edge_gt, edge_le = self._tails(np.append(a, b[-1]))
            a_gt, a_le, b_gt, b_le = edge_gt[:-1], edge_le[:-1], edge_gt[1:], edge_le[1:]
        else:
            a_gt, a_le = self._tails(a)
            b_gt, b_le = self._tails(b)
        upper_side = np.asarray(a_gt, dtype=self.kind) - np.asarray(b_gt, dtype=self.kind)
        lower_side = np.asarray(b_le, dtype=self.kind) - np.asarray(a_le, dtype=self.kind)
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


def prv_points(groups, memory_budget: float) -> int:
    """Largest PRV grid under ``memory_budget`` and TAIL_WORK (at most MAX_PRV_POINTS)."""
    return int(min(grid_limit(memory_budget, PRV_BYTES_PER_POINT, MAX_PRV_POINTS), work_points(groups)))


def smallest_eps_error(groups, eps_max: float, delta_error: float,
                       memory_budget: float = DEFAULT_MEMORY_BUDGET) -> float:
    """The smallest eps_error whose PRV grid on the domain for ``eps_max`` fits the grid limit
    (MAX_PRV_POINTS, or fewer points if the memory budget requires)."""
    largest_mesh = 2 * _domain_span(groups, eps_max) / max(prv_points(groups, memory_budget) - 4, 1)
    return largest_mesh / _mesh(groups, 1.0, delta_error)


def _prv_composed(groups: Sequence[tuple], delta_error: float, eps_error: float, eps_max: float,
                  memory_budget: float = DEFAULT_MEMORY_BUDGET, kind=np.longdouble) -> dict:
    """Composed discrete PRVs per relation, on a domain covering [-eps_max, eps_max]; the PMFs
    (and prv-accountant's FFTs) in precision ``kind``."""
    mesh = _mesh(groups, eps_error, delta_error)
    span = _domain_span(groups, eps_max)
    limit = prv_points(groups, memory_budget)
    if not 2 * span / mesh <= limit:
        raise GridBudgetExceeded(f"a PRV eps_error of {eps_error:.3g} needs {2 * span / mesh:.3g} grid "
                                 f"points (limit {limit}); choose a larger --prv-eps-error",
                                 2 * span / mesh, limit)
    domain = _fast_domain(span, mesh)
    out = {}
    for direction in DIRECTIONS:
        prvs = [StepPRV(pair, direction, memory_budget, kind) for pair, _ in groups]
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            try:
                discrete = [discretisers.CellCentred().discretise(prv, domain) for prv in prvs]
                composed = composers.Heterogeneous(discrete).compute_composition([c for _, c in groups])
            except (RuntimeError, FloatingPointError, OverflowError) as exc:
                raise RouteFailure(f"prv-accountant cannot discretise this privacy loss at eps_error "
                                   f"{eps_error:.3g}: {exc}") from None
            out[direction] = (composed, span)
    return out


def _prv_epsilon(composed, delta: float, slack: float, eps_error: float,
                 floor: float = 0.0) -> tuple[float, float, float]:
    """(lower, estimate, upper) epsilon of a composed discrete PRV: prv-accountant's bounds (the
    estimate at delta -/+ ``slack``, -/+ eps_error; Gopi, Lee & Wutschitz 2021, Thm. 5.5) with the
    read-out of :func:`accountant.composition.epsilon_for_delta` (log space: no overflow beyond
    losses of 700).  ``slack`` is delta_error plus the round-off allowance of the composition; a
    delta within ``floor`` of it (prv-accountant's floating-point floor) is refused."""
    delta_inf = -math.expm1(float(composed.log_pmc_inf))
    delta_fin = (delta - delta_inf) / (1 - delta_inf)
    if delta_fin <= 0:
        return math.inf, math.inf, math.inf
    if floor > delta_fin - slack:
        raise RouteFailure("floating-point errors of the PRV grid dominate at this delta")
    t = np.asarray(composed.domain.ts(), dtype=np.float64)
    p = np.asarray(composed.pmf, dtype=np.float64)

    low, est, up = epsilon_for_delta(t, p, 0.0, [delta_fin + slack, delta_fin, delta_fin - slack])
    return low - eps_error, est, up + eps_error


def prv_route(groups: Sequence[tuple], delta: float, eps_error: float, eps_max: float,
              memory_budget: float = DEFAULT_MEMORY_BUDGET, coarsen: bool = False) -> RouteResult:
    """prv-accountant composition of the custom step PRVs; ``eps_max`` sizes the domain [-L, L].

    prv-accountant refuses a discretisation whose mean misses the exact mean by half a mesh (a
    large loss, e.g. tiny noise, where the exact mean is known to fewer digits than the mesh); with
    ``coarsen`` eps_error grows 4x at a time (at most 3 times): a larger eps_error is still a valid
    error bound (Gopi, Lee & Wutschitz 2021, Thm. 5.5), only a looser one.  ``result.step`` holds the
    eps_error used."""
    for attempt in range(4):
        try:
            return _prv_route(groups, delta, eps_error, eps_max, memory_budget)
        except RouteFailure:
            if not coarsen or attempt == 3:
                raise
            eps_error *= 4


def _prv_roundoff(groups, kind, eps_error: float, delta_error: float, eps_max: float) -> tuple[float, float]:
    """(round-off allowance, floor) of a PRV composition in precision ``kind``: the FFT model of
    :func:`accountant.composition.roundoff_allowance` (per self-composition, plus one per pairwise
    convolution), which widens both bounds, and prv-accountant's own floor, unit round-off times
    the grid size, below which it refuses to read a delta."""
    total = sum(count for _, count in groups)
    size = 2 * _domain_span(groups, eps_max) / _mesh(groups, eps_error, delta_error) + 2
    model = roundoff_allowance(kind, total) + (len(groups) - 1) * roundoff_allowance(kind, 2)
    return model, float(np.finfo(kind).eps) * size


def _prv_route(groups, delta, eps_error, eps_max, memory_budget) -> RouteResult:
    delta_error = delta * 1e-3
    # prv-accountant composes in the PMFs' precision: float64 while its round-off allowance stays
    # below 1e-4 delta (as the PLD route), else long double; the allowance widens both bounds
    kind = np.float64 if max(_prv_roundoff(groups, np.float64, eps_error, delta_error, eps_max)) <= 1e-4 * delta \
        else np.longdouble
    roundoff, floor = _prv_roundoff(groups, kind, eps_error, delta_error, eps_max)
    if kind is np.float64:
        # prv-accountant's power F ** n and long transforms: the float64 error summed over the grid
        # measured 0.05 to 0.13 u N against long double (N 1e4 to 2e5), above 10 u T for few steps
        roundoff += floor
    per_direction = {}
    lower_all = upper_all = est_all = 0.0
    for direction, (composed, span) in _prv_composed(groups, delta_error, eps_error, eps_max,
                                                     memory_budget, kind).items():
        low, est, up = _prv_epsilon(composed, delta, delta_error + roundoff, eps_error, floor)
        per_direction[direction] = {"lower": low, "estimate": est, "upper": up, "domain": span}
        if not up < span:
            raise RouteFailure(f"PRV domain [-{span:.3g}, {span:.3g}] too small for epsilon {up:.3g}")
        lower_all, est_all, upper_all = max(lower_all, low), max(est_all, est), max(upper_all, up)
    return RouteResult(lower_all, upper_all, est_all, per_direction, step=eps_error)


def prv_delta(groups: Sequence[tuple], epsilon: float, delta_error: float, eps_error: float,
              eps_max: float, memory_budget: float = DEFAULT_MEMORY_BUDGET) -> tuple[float, float, float]:
    """(lower, estimate, upper) for delta at ``epsilon``, max over relations (prv-accountant's
    bounds: the estimate at epsilon +/- eps_error, -/+ delta_error, and -/+ the long-double floor
    of a sum over the grid, eps * size)."""
    worst = (0.0, 0.0, 0.0)
    for composed, _ in _prv_composed(groups, delta_error, eps_error, eps_max, memory_budget).values():
        floor = float(np.finfo(np.longdouble).eps) * len(composed.pmf)
        low = float(composed.compute_delta_estimate(epsilon + eps_error)) - delta_error - floor
        est = float(composed.compute_delta_estimate(epsilon))
        up = float(composed.compute_delta_estimate(epsilon - eps_error)) + delta_error + floor
        worst = tuple(max(a, b) for a, b in zip(worst, (low, est, up)))
    return worst
