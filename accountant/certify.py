"""Certificates: epsilon(delta) and delta(epsilon) for composed mechanisms, and calibration.

The certificate is the larger upper bound of two independent routes (PLD via dp-accounting and PRV
via prv-accountant), maximised over the add and remove relations.  Each route also reports a lower
bound; if the two intervals do not overlap, the routes contradict each other and we raise
:class:`RouteDisagreement` instead of printing a number (docs/soundness.md rule 5).  For an l1 mechanism that
reduces to randomized response, the exact binomial composition is a third route.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy import special

from accountant import routes, table_check
from accountant.mechanism import Mechanism, UnsupportedMechanism, step_pair
from accountant.mixture_pair import MixtureShiftPair
from accountant.noise import Gaussian, Noise
from accountant.privacy_loss import RandomizedResponsePair, ShiftPair


class CertificationError(ValueError):
    """No certificate can be printed (unsupported mechanism or contradicting routes)."""


class RouteDisagreement(CertificationError):
    pass


class MemoryBudgetExceeded(CertificationError):
    """The certificate's grids do not fit the memory budget even at their coarsest sound setting;
    raised before the memory is allocated.  The message names the option that raises the budget."""


@dataclass(frozen=True)
class Accuracy:
    """Numerical settings (docs/privacy.md, section 6).

    ``pld_step=None`` sizes the PLD grid from the Connect-the-Dots error model so that the PLD
    bound is within about ``pld_relative_error`` of the truth; ``prv_eps_error=None`` sets
    prv-accountant's eps_error to ``prv_relative_error`` times epsilon, raised only as far as the
    grid limit of the PRV route requires.  Explicit values are used as given."""

    pld_step: float | None = None
    prv_eps_error: float | None = None
    pld_relative_error: float = 1e-4
    prv_relative_error: float = 1e-3
    #: bytes the grids of one certificate may use (``--memory-budget``, in GiB on the command line)
    memory_budget: float = routes.DEFAULT_MEMORY_BUDGET


@dataclass(frozen=True)
class Certificate:
    epsilon: float
    delta: float
    routes: dict
    mechanisms: list = field(default_factory=list)
    #: independent bounds the routes were checked against (tabulated laws: accountant.table_check)
    checks: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"epsilon": self.epsilon, "delta": self.delta, "routes": self.routes,
                "mechanisms": self.mechanisms, "checks": self.checks}


def _as_list(mechanisms) -> list[Mechanism]:
    items = [mechanisms] if isinstance(mechanisms, Mechanism) else list(mechanisms)
    if not items:
        raise ValueError("nothing to certify: no mechanism given")
    return items


def _groups(mechanisms: Sequence[Mechanism]):
    try:
        return [(step_pair(m), int(m.steps)) for m in mechanisms]
    except UnsupportedMechanism as exc:
        raise CertificationError(str(exc)) from None


def _check_delta(delta: float):
    if not (0 < delta < 1):
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if delta < 1e-13:
        raise ValueError(f"delta {delta:g} is below what float64 accounting can certify (about 1e-13)")


def _loss_moments(pair) -> tuple[float, float]:
    """(mean, variance) of the remove loss of one step, from its tails on a 2001-point grid (only
    to size the grid, so a coarse value suffices)."""
    lo, hi = pair.loss_range("remove")
    grid = np.linspace(lo, hi, 2001)
    above = pair.tails("remove", grid)[0] - pair.infinite_mass("remove")
    mass = np.maximum(np.append(1 - pair.infinite_mass("remove") - above[0], above[:-1] - above[1:]), 0)
    points = np.append(lo, 0.5 * (grid[:-1] + grid[1:]))
    total = max(mass.sum(), 1e-300)
    mean = float(np.dot(mass, points) / total)
    return mean, float(np.dot(mass, (points - mean) ** 2) / total)


def _pld_step(groups, delta: float, accuracy: Accuracy) -> float:
    """PLD grid step.  Connect-the-Dots moves each step's loss mean by at most h^2/8 and adds at most
    h^2/4 to its variance, so T steps move epsilon by about ``T h^2 / 8 (1 + z / sqrt(V))`` with V the
    composed loss variance and z = sqrt(2 ln(1/delta)) (docs/privacy.md, section 6).  The step makes
    that at most ``pld_relative_error`` times a Gaussian guess of epsilon, is at most 1e-4, and is
    at least what the grid limit of the PLD route allows."""
    if accuracy.pld_step is not None:
        return accuracy.pld_step
    total = mean = var = 0.0
    width = 0.0
    for pair, count in groups:
        m, v = _loss_moments(pair)
        total, mean, var = total + count, mean + count * m, var + count * v
        for direction in routes.DIRECTIONS:
            lo, hi = pair.loss_range(direction)
            width = max(width, hi - lo)
    z = math.sqrt(2 * math.log(1 / delta))
    sd = math.sqrt(max(var, 1e-300))
    guess = max(mean + z * sd, 1e-3)
    step = math.sqrt(8 * accuracy.pld_relative_error * guess / (total * (1 + z / sd)))
    points = min(routes.grid_limit(accuracy.memory_budget, routes.PLD_BYTES_PER_POINT, routes.MAX_PLD_POINTS),
                 routes.work_points(groups))
    span = max(width, 20 * sd)      # one step's loss range, or the composition's spread if wider
    floor = 1.05 * span / max(points, 1)
    if floor > routes.MAX_PLD_STEP:
        what = "one step's privacy-loss range" if span == width else f"the spread of {total:.3g} composed steps"
        raise routes.GridBudgetExceeded(
            f"{what} ({span:.3g}) needs {span / routes.MAX_PLD_STEP:.3g} PLD grid points "
            f"at the coarsest step {routes.MAX_PLD_STEP:g} (limit {points})",
            span / routes.MAX_PLD_STEP, points)
    return float(max(min(step, 1e-4), floor))


def _exact_rr(groups, delta: float):
    """Exact epsilon for T-fold randomized response: the loss is k L1 + (T-k) L2, k ~ Binomial."""
    if len(groups) != 1 or not isinstance(groups[0][0], RandomizedResponsePair):
        return None
    pair, count = groups[0]
    worst = 0.0
    for direction in routes.DIRECTIONS:
        loss, mass = pair.atoms(direction)
        k = np.arange(count + 1)
        total = k * loss[0] + (count - k) * loss[1]
        logpmf = (special.gammaln(count + 1) - special.gammaln(k + 1) - special.gammaln(count - k + 1)
                  + k * math.log(mass[0]) + (count - k) * math.log(mass[1]))

        def delta_at(eps):
            return float(np.sum(np.exp(logpmf) * -np.expm1(np.minimum(eps - total, 0.0))))

        lo, hi = 0.0, float(total.max()) + 1e-9
        if delta_at(0.0) <= delta:
            continue
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if delta_at(mid) > delta else (lo, mid)
        worst = max(worst, hi)
    return routes.RouteResult(worst, worst, worst, {"note": "exact binomial composition"})


def certify(mechanisms, delta: float, accuracy: Accuracy = Accuracy()) -> Certificate:
    """Certified epsilon at ``delta`` for the composition of ``mechanisms`` (a Mechanism or a list).

    ``epsilon`` is ``math.inf`` when the mass of an infinite privacy loss (a table without tails
    whose support does not cover its shift) exceeds ``delta``: no finite epsilon holds then.

    Every grid is sized from the law and ``accuracy.memory_budget`` and refused before it is
    allocated if it does not fit; the routes then coarsen (sound, looser).  Where the numerical
    routes cannot run at all (a privacy loss far beyond what a grid resolves: tiny noise, huge
    sensitivity), the closed-form bound of :func:`closed_form_bound` is the certificate, or ``inf``
    when there is none; :class:`MemoryBudgetExceeded` when a larger budget would have helped."""
    _check_delta(delta)
    mechs = _as_list(mechanisms)
    groups = _groups(mechs)
    described = [m.describe() for m in mechs]
    bound = closed_form_bound(groups, delta)
    if bound is not None and bound["upper"] == 0.0:      # nothing to refine: epsilon 0 holds exactly
        return Certificate(0.0, delta, {"closed_form": bound}, described)
    try:
        _loss_ranges(groups)
        return _certify_numerically(groups, delta, accuracy, bound, described)
    except (routes.GridBudgetExceeded, routes.RouteFailure) as exc:
        return _without_grids(exc, groups, delta, accuracy, bound, described)


def _certify_numerically(groups, delta, accuracy, bound, described) -> Certificate:
    step = _pld_step(groups, delta, accuracy)
    pld = routes.pld_route(groups, delta, step, memory_budget=accuracy.memory_budget,
                           coarsen=accuracy.pld_step is None)
    if math.isinf(pld.lower):
        info = {"pld": pld.as_dict()}
        info["pld"].update(step=pld.step, infinite_loss_mass=_infinite_loss_mass(groups))
        return Certificate(math.inf, delta, info, described)
    span = _prv_span(pld, delta)
    eps_error = _prv_eps_error(groups, pld.upper, span, delta, accuracy)
    prv = routes.prv_route(groups, delta, eps_error, span, memory_budget=accuracy.memory_budget,
                           coarsen=accuracy.prv_eps_error is None)
    results = {"pld": pld, "prv": prv}
    exact = _exact_rr(groups, delta)
    if exact is None and bound is not None and bound["exact"]:
        exact = routes.RouteResult(bound["lower"], bound["upper"], bound["upper"], {"note": bound["note"]})
    if exact is not None:
        results["exact"] = exact
    _check_agreement(results)
    epsilon = max(r.upper for r in results.values())
    info = {name: r.as_dict() for name, r in results.items()}
    info["pld"]["step"] = pld.step
    info["prv"]["eps_error"] = prv.step
    if bound is not None and bound["upper"] < epsilon:
        # a theorem's bound below the grids' (a pure epsilon, or the exact Gaussian at q 1): both are
        # upper bounds, so the smaller one holds
        info["closed_form"] = bound
        epsilon = bound["upper"]
    checks = {}
    independent = table_check.check(groups, delta)
    if independent is not None:
        _check_independent(independent, results, epsilon)
        checks["table"] = {"lower": independent.lower,
                           "upper": independent.upper if math.isfinite(independent.upper) else None}
    return Certificate(epsilon, delta, info, described, checks)


#: grids beyond this many bytes are not worth suggesting a larger budget for (about 1 TiB)
_LARGEST_SENSIBLE_BUDGET = 2.0 ** 40


def _without_grids(exc, groups, delta, accuracy, bound, described) -> Certificate:
    """The certificate when no grid route can run within the budget (see :func:`certify`)."""
    reason = str(exc)
    if isinstance(exc, routes.GridBudgetExceeded) and (accuracy.pld_step is not None
                                                       or accuracy.prv_eps_error is not None):
        raise CertificationError(reason) from None      # an explicit setting the grid cannot honour
    if bound is not None:
        info = dict(bound, note=bound["note"] + f"; the grid routes could not run ({reason})")
        return Certificate(bound["upper"], delta, {"closed_form": info}, described)
    needed = getattr(exc, "points", math.inf) * routes.PLD_BYTES_PER_POINT
    if (isinstance(exc, routes.GridBudgetExceeded) and accuracy.memory_budget < needed <= _LARGEST_SENSIBLE_BUDGET):
        raise MemoryBudgetExceeded(
            f"this certificate needs about {needed / 2 ** 30:.3g} GiB of grids at its coarsest sound "
            f"setting, more than the memory budget of {accuracy.memory_budget / 2 ** 30:.3g} GiB; "
            f"raise --memory-budget (Accuracy(memory_budget=...))") from None
    info = {"epsilon": math.inf, "note": "the privacy loss reaches beyond what any grid resolves and "
                                         f"no closed form applies, so no finite epsilon is certified ({reason})"}
    return Certificate(math.inf, delta, {"closed_form": {"lower": 0.0, "upper": math.inf, **info}}, described)


def _loss_ranges(groups):
    """Each step's privacy-loss range (cached by the pairs); a loss too large for its tail bound
    to be found is a :class:`routes.RouteFailure`."""
    try:
        with np.errstate(all="ignore"):
            for pair, _ in groups:
                for direction in routes.DIRECTIONS:
                    lo, hi = pair.loss_range(direction)
                    if not (math.isfinite(lo) and math.isfinite(hi)):
                        raise ValueError(f"privacy-loss range [{lo}, {hi}] is not finite")
    except (ValueError, OverflowError, FloatingPointError) as exc:
        raise routes.RouteFailure(str(exc)) from None


# ----------------------------------------------------------------------------------------------
# Closed forms: analytic Gaussian and pure-DP composition
# ----------------------------------------------------------------------------------------------
def gaussian_delta(mu: float, epsilon: float) -> float:
    """delta(epsilon) of the Gaussian mechanism with mu = sensitivity / sigma (Balle & Wang 2018,
    Thm. 8): Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu), in 50-digit arithmetic."""
    import mpmath
    with mpmath.workdps(50):
        mu, eps = mpmath.mpf(mu), mpmath.mpf(epsilon)
        if mu == 0:
            return 0.0
        value = mpmath.ncdf(mu / 2 - eps / mu) - mpmath.exp(eps) * mpmath.ncdf(-mu / 2 - eps / mu)
        return float(max(value, 0))


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Smallest epsilon >= 0 with :func:`gaussian_delta` <= ``delta``, by bisection in 50-digit
    arithmetic to 1e-12 relative and rounded up (``inf`` beyond the float range)."""
    import mpmath
    with mpmath.workdps(50):
        mu, target = mpmath.mpf(mu), mpmath.mpf(delta)

        def excess(eps):
            return mpmath.ncdf(mu / 2 - eps / mu) - mpmath.exp(eps) * mpmath.ncdf(-mu / 2 - eps / mu) - target

        if mu == 0 or excess(mpmath.mpf(0)) <= 0:
            return 0.0
        lo, hi = mpmath.mpf(0), mu * mu / 2 + mu * mpmath.sqrt(2 * mpmath.log(1 / target)) + 1
        while excess(hi) > 0:
            lo, hi = hi, 2 * hi
        while hi - lo > mpmath.mpf(10) ** -12 * hi:
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
        return math.nextafter(float(hi), math.inf) if hi < mpmath.mpf(np.finfo(float).max) else math.inf


def _pure_epsilon(pair) -> float | None:
    """Pure epsilon of one Poisson-subsampled step whose log-density has a finite Lipschitz bound:
    eps0 = sensitivity x slope, amplified by Poisson subsampling to log(1 + q (e^eps0 - 1)) (Li, Qardaji & Su
    2012; Balle, Barthe & Gaboardi 2018), in a form that does not overflow."""
    if isinstance(pair, RandomizedResponsePair):
        eps0, q = pair.eps0, pair.q
    elif isinstance(pair, ShiftPair) and not isinstance(pair.noise, Gaussian):
        try:
            slope = float(pair.noise.log_lipschitz())
        except (NotImplementedError, AttributeError):
            return None
        eps0, q = pair.shift * slope, pair.q
    else:
        return None
    if not math.isfinite(eps0):             # no finite slope (tables, generalised Gaussians)
        return None
    return eps0 + math.log(q + (1 - q) * math.exp(-eps0))


def closed_form_bound(groups, delta: float) -> dict | None:
    """A closed-form upper bound on epsilon at ``delta``, or None when some step has none.

    Gaussian steps compose to a Gaussian mechanism with mu^2 = sum T (C / sigma)^2 (Dong, Roth & Su
    2022, Cor. 3.3); Poisson subsampling never increases a hockey-stick divergence (joint convexity),
    so its analytic epsilon (Balle & Wang 2018) bounds every q, and is exact when every q is 1.  Steps
    with a pure epsilon add it (basic composition with delta 0, Dwork & Roth 2014, Thm. 3.16)."""
    mu2, pure, exact, gaussian = 0.0, 0.0, True, False
    for pair, count in groups:
        if isinstance(pair, ShiftPair) and isinstance(pair.noise, Gaussian):
            ratio = pair.shift / pair.noise.sigma
            mu2 += count * ratio * ratio
            exact, gaussian = exact and pair.q == 1, True
            continue
        if isinstance(pair, MixtureShiftPair) and isinstance(pair.noise, Gaussian):
            # joint convexity, then Lemma M (docs/privacy.md, section 9): every component of the
            # mixture is dominated by the largest shift k C, in both relations
            ratio = pair.k * pair.shift / pair.noise.sigma
            mu2 += count * ratio * ratio
            exact, gaussian = False, True
            continue
        eps = _pure_epsilon(pair)
        if eps is None:
            return None
        pure += count * eps
        exact = False
    gauss = gaussian_epsilon(math.sqrt(mu2), delta) if math.isfinite(mu2) else math.inf
    upper = gauss + pure
    if not math.isfinite(upper):            # no information: the grids (or a refusal) decide
        return None
    note = ("pure-DP composition" if not gaussian else "analytic Gaussian (Balle & Wang 2018) of the "
            "composition" + (" plus pure-DP composition" if pure > 0 else ""))
    if gaussian and not exact:
        note += ", without the amplification by subsampling"
    exact = exact and gaussian
    return {"lower": upper if exact else 0.0, "upper": upper, "exact": exact, "note": note}


def _check_independent(independent, results: dict, epsilon: float) -> None:
    """A tabulated law's certificate must lie at or above the independent lower bound of
    accountant.table_check (and, for one release, its routes at or below the independent upper
    bound); otherwise a shared bug is suspected and no certificate is printed."""
    tol = 1e-9 + AGREEMENT_SLACK * abs(epsilon)
    lowest = max(r.lower for r in results.values())
    if independent.lower > epsilon + tol or lowest > independent.upper + tol:
        raise RouteDisagreement(
            f"accountants disagree: the routes give epsilon in [{lowest:.6g}, {epsilon:.6g}], the "
            f"independent table check [{independent.lower:.6g}, {independent.upper:.6g}]; no certificate is printed")


def _infinite_loss_mass(groups) -> float:
    """Probability, under the worse relation, that the composed privacy loss is +inf."""
    worst = 0.0
    for direction in routes.DIRECTIONS:
        finite = 1.0
        for pair, count in groups:
            finite *= (1 - pair.infinite_mass(direction)) ** count
        worst = max(worst, 1 - finite)
    return worst


def _prv_eps_error(groups, epsilon: float, span: float, delta: float, accuracy: Accuracy) -> float:
    """prv-accountant's eps_error: as given, else ``prv_relative_error * epsilon``, raised as far as
    needed for the PRV grid (mesh = eps_error / sqrt(T/2 log(12/delta_error))) to fit its limit."""
    if accuracy.prv_eps_error is not None:
        return accuracy.prv_eps_error
    floor = routes.smallest_eps_error(groups, span, delta * 1e-3, accuracy.memory_budget)
    return float(max(accuracy.prv_relative_error * epsilon, floor, 1e-9))


def _prv_span(pld: routes.RouteResult, delta: float) -> float:
    """Half-width of the PRV domain such that the composed finite loss leaves [-span, span] (and
    would wrap around in the FFT) with probability far below prv-accountant's delta error on
    either side, measured on the pessimistic PLD of the same composition."""
    span = max(1.2 * pld.upper, 0.01)
    for _ in range(60):
        if max(pld.finite_tail(span), pld.lower_tail(-span)) <= 1e-2 * delta * 1e-3:
            return span
        span *= 1.2
    raise CertificationError("cannot size the PRV domain: the privacy loss has too heavy a tail")


#: relative slack of the agreement check on top of each route's interval (docs/privacy.md, section 6:
#: the round-off of both FFT compositions is already inside the intervals).
AGREEMENT_SLACK = 2e-5


def _check_agreement(results: dict):
    names = list(results)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ra, rb = results[a], results[b]
            tol = 1e-9 + AGREEMENT_SLACK * max(abs(ra.upper), abs(rb.upper))
            if ra.lower > rb.upper + tol or rb.lower > ra.upper + tol:
                raise RouteDisagreement(
                    f"accountants disagree: {a} gives epsilon in [{ra.lower:.6g}, {ra.upper:.6g}], "
                    f"{b} gives [{rb.lower:.6g}, {rb.upper:.6g}]; no certificate is printed")


def pld_epsilon(mechanisms, delta: float, accuracy: Accuracy = Accuracy()) -> float:
    """The PLD route's upper bound alone: a fast, valid upper bound for searches (ledgers,
    calibration), never printed as the certificate."""
    _check_delta(delta)
    groups = _groups(_as_list(mechanisms))
    bound = closed_form_bound(groups, delta)
    try:
        _loss_ranges(groups)
        return routes.pld_route(groups, delta, _pld_step(groups, delta, accuracy), memory_budget=accuracy.memory_budget,
                                coarsen=accuracy.pld_step is None, upper_only=True).upper
    except (routes.GridBudgetExceeded, routes.RouteFailure):
        return math.inf if bound is None else bound["upper"]


#: delta that the step sizing assumes when the delta is the unknown (a small one: finer grid)
_DELTA_FOR_SIZING = 1e-10


def delta_for_epsilon(mechanisms, epsilon: float, accuracy: Accuracy = Accuracy()) -> float:
    """Certified delta at ``epsilon``: the larger upper bound of the PLD route (pessimistic) and
    the PRV route, max over add and remove; the routes' intervals must overlap.

    PRV bounds delta by its estimate at ``epsilon - eps_error`` (plus delta_error), which is loose
    where delta(epsilon) is steep (near an atom of the loss): eps_error shrinks 4x at a time, while
    the grid fits and the bound improves, until it is within 0.5% of the estimate.  Below the numerical floor
    (docs/privacy.md, section 6) a reported delta is the floor, not the mechanism's delta."""
    if not (epsilon >= 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a finite non-negative number, got {epsilon}")
    groups = _groups(_as_list(mechanisms))
    try:
        _loss_ranges(groups)
        return _delta_numerically(groups, epsilon, accuracy)
    except (routes.GridBudgetExceeded, routes.RouteFailure):
        return closed_form_delta(groups, epsilon)


def closed_form_delta(groups, epsilon: float) -> float:
    """Delta at ``epsilon`` from the closed forms of :func:`closed_form_bound` (1 where none applies):
    the Gaussian part's analytic delta at epsilon minus the pure part's epsilon."""
    mu2, pure = 0.0, 0.0
    for pair, count in groups:
        if isinstance(pair, ShiftPair) and isinstance(pair.noise, Gaussian):
            mu2 += count * (pair.shift / pair.noise.sigma) ** 2
            continue
        eps = _pure_epsilon(pair)
        if eps is None:
            return 1.0
        pure += count * eps
    if not (epsilon >= pure and math.isfinite(mu2)):
        return 1.0
    return min(1.0, gaussian_delta(math.sqrt(mu2), epsilon - pure))


def _delta_numerically(groups, epsilon: float, accuracy: Accuracy) -> float:
    pld = routes.pld_route(groups, 0.5, _pld_step(groups, _DELTA_FOR_SIZING, accuracy), roundoff_budget=0.0,
                           memory_budget=accuracy.memory_budget, coarsen=accuracy.pld_step is None)
    pld_up, pld_low = pld.delta_at(epsilon), pld.delta_lower_at(epsilon)
    if pld_low >= 1.0:
        return 1.0
    delta_error = max(1e-3 * pld_up, 1e-18)
    span = max(1.2 * epsilon, 0.01)
    while max(pld.finite_tail(span), pld.lower_tail(-span)) > 1e-2 * delta_error and span < 1e4:
        span *= 1.2
    floor = routes.smallest_eps_error(groups, span, delta_error, accuracy.memory_budget)
    if accuracy.prv_eps_error is not None:
        eps_error, shrink = accuracy.prv_eps_error, False
    else:
        eps_error, shrink = max(accuracy.prv_relative_error * max(epsilon, 0.01), floor), True
    best = None
    while True:
        bounds = routes.prv_delta(groups, epsilon, delta_error, eps_error, span, accuracy.memory_budget)
        if best is not None and bounds[2] >= best[2]:
            break                      # the grid's float floor now outweighs the smaller eps_error
        best = bounds
        if not shrink or bounds[2] <= 1.005 * max(bounds[1], pld_up) or eps_error / 4 < floor:
            break
        eps_error /= 4
    prv_low, _, prv_up = best
    if pld_low > prv_up * (1 + 1e-9) + 1e-18 or prv_low > pld_up * (1 + 1e-9) + 1e-18:
        raise RouteDisagreement(
            f"accountants disagree on delta at epsilon {epsilon:g}: PLD [{pld_low:.4g}, {pld_up:.4g}], "
            f"PRV [{prv_low:.4g}, {prv_up:.4g}]; no certificate is printed")
    result = min(1.0, max(pld_up, prv_up))
    independent = table_check.delta_lower(groups, epsilon)
    if independent is not None and independent > result * (1 + 1e-6) + 1e-18:
        raise RouteDisagreement(
            f"accountants disagree on delta at epsilon {epsilon:g}: the routes give at most {result:.4g}, "
            f"the independent table check at least {independent:.4g}; no certificate is printed")
    return result


def delta_for_epsilon_pld(mechanisms, epsilon: float, accuracy: Accuracy = Accuracy()) -> float:
    """The pessimistic PLD delta alone (fast; for searches and tests of the PLD route)."""
    groups = _groups(_as_list(mechanisms))
    step = _pld_step(groups, _DELTA_FOR_SIZING, accuracy)
    return routes.pld_route(groups, 0.5, step, roundoff_budget=0.0).delta_at(epsilon)


class ScaleNotFound(CertificationError):
    """No scale below the cap meets the target."""


def solve_scale(gap: Callable[[float], float], start: float, rtol: float, max_scale: float,
                slope: float = -1.0, min_scale: float = 1e-6, error=ScaleNotFound) -> float:
    """Smallest log-scale x (to ``rtol``) with ``gap(x) <= 0``, for ``gap`` non-increasing in x
    (more noise, less privacy loss): the one root finder of every calibration.

    Secant steps from ``log(start)`` (the first with the guessed ``slope`` dgap/dx: -1 for
    log(epsilon / target), since epsilon is close to proportional to 1/scale; 2 log(delta) for
    log(delta / target) of Gaussian-like noise), so a warm start converges in 3-4 evaluations; if the
    secant stalls (the near-vertical curves of pure-DP noise), a bracket by factors of 2 and Brent's
    method.  The answer is on the feasible side: ``gap(x) <= 0`` was evaluated at the returned x."""
    from scipy.optimize import brentq

    top, bottom = math.log(max_scale), math.log(min_scale)
    cache = {}

    def g(x):
        if x not in cache:
            cache[x] = gap(x)
        return cache[x]

    def finish(x):
        while g(x) > 0:
            x += rtol / 2
            if x > top + 1e-12:
                raise error(f"no scale below {max_scale:g} meets the target")
        return x

    x0 = min(max(math.log(start), bottom), top)
    f0 = g(x0)
    x1 = x0 + max(-0.5, min(0.5, -f0 / slope)) if math.isfinite(f0) else x0 + 0.5
    x1 = min(x1 if x1 != x0 else x0 + rtol, top)
    f1 = g(x1)
    for _ in range(10):
        if abs(x1 - x0) < rtol / 2 and f1 <= 0:
            return finish(x1)
        if f1 == f0 or not (math.isfinite(f0) and math.isfinite(f1)):
            break
        x2 = min(max(x1 - f1 * (x1 - x0) / (f1 - f0), x1 - 0.7), x1 + 0.7, top)
        if x2 == x1 and f1 > 0:
            break
        x0, f0, x1, f1 = x1, f1, x2, g(x2)
    # bracket [a, b] with g(a) > 0 >= g(b), then Brent's method
    step, a = math.log(2.0), min(x1, top)
    if g(a) > 0:
        while True:
            if a >= top - 1e-12:
                raise error(f"no scale below {max_scale:g} meets the target")
            b = min(a + step, top)
            if g(b) <= 0:
                break
            a = b
    else:
        b, a = a, a - step
        while g(a) <= 0:
            if a < bottom:
                return finish(a)
            b, a = a, a - step
    if not (math.isfinite(g(a)) and math.isfinite(g(b))):
        while b - a > rtol / 2:           # Brent needs finite values: plain bisection
            mid = 0.5 * (a + b)
            a, b = (mid, b) if g(mid) > 0 else (a, mid)
        return finish(b)
    return finish(brentq(g, a, b, xtol=rtol / 2, rtol=1e-12, maxiter=60))


def calibrate(make_noise: Callable[[float], Noise], epsilon: float, delta: float, sampling_rate: float,
              steps: int, geometry: str = "scalar", sensitivity: float = 1.0,
              accuracy: Accuracy = Accuracy(), max_scale: float = 1e4, *, start: float | None = None,
              rtol: float = 1e-4, margin: float = 1.3, max_certificates: int = 40, progress=None,
              delta_at: Callable[[float, float], float] | None = None,
              sampling: str = "poisson") -> tuple[float, Certificate]:
    """Smallest scale s (to about ``rtol``) with certified epsilon <= ``epsilon``; never overshoots.
    The one calibrator: ``make_private``, the CLI and noise_search call it.

    Epsilon decreases in the scale.  Stage 1 solves (:func:`solve_scale`) on the PLD route's upper
    bound alone, first on a 10x coarser grid, then at full accuracy from that answer, for
    ``epsilon (1 - margin prv_relative_error)``: the certificate is the larger upper bound of both
    routes, and the PRV route's is its estimate plus ``prv_relative_error`` epsilon, so one full
    certificate usually follows.  ``delta_at(scale, eps)`` may replace the PLD in stage 1 (e.g. a
    fast exact delta of one release of a table).  If the certificate still exceeds ``epsilon``, the
    scale grows by the ratio (epsilon is close to proportional to 1/scale) and is certified again;
    if a closed form decided the certificate (the exact Gaussian at q 1, a pure bound), the margin
    was not needed and the solve is repeated without it.  ``progress.update(1)`` per certificate.
    """
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    _check_delta(delta)

    def mech(s):
        return Mechanism(make_noise(s), sensitivity, geometry, sampling_rate, steps, sampling=sampling)

    target = epsilon * (1 - margin * accuracy.prv_relative_error)

    def pld_gap(coarse):
        def gap(x):
            groups = _groups([mech(math.exp(x))])
            try:
                _loss_ranges(groups)
                step = _pld_step(groups, delta, accuracy) * (10 if coarse else 1)
                eps = routes.pld_route(groups, delta, step, memory_budget=accuracy.memory_budget,
                                       coarsen=True, upper_only=True).upper
            except (routes.GridBudgetExceeded, routes.RouteFailure):
                # loss range too wide for a grid (far too little noise): the closed form, if any
                bound = closed_form_bound(groups, delta)
                eps = math.inf if bound is None else bound["upper"]
            return math.log(eps / target) if eps > 0 else -math.inf
        return gap

    infeasible = (f"target epsilon {epsilon:g} at delta {delta:g} is infeasible for this noise family: "
                  f"even scale {max_scale:g} times the sensitivity is not enough")

    def solve(gap, first, tol, slope):
        try:
            return math.exp(solve_scale(gap, first, tol, max_scale, slope))
        except ScaleNotFound:
            raise ScaleNotFound(infeasible) from None

    if delta_at is not None:
        scale = solve(lambda x: math.log(max(delta_at(math.exp(x), target), 1e-300) / delta),
                      start or 1.0, rtol, 2 * math.log(delta))
    else:
        scale = solve(pld_gap(True), start or 1.0, 1e-3, -1.0)
        scale = solve(pld_gap(False), scale, rtol, -1.0)
    for _ in range(max_certificates):
        cert = certify(mech(scale), delta, accuracy)
        if progress is not None:
            progress.update(1)
        if cert.epsilon <= epsilon:
            if margin > 0 and "closed_form" in cert.routes and delta_at is None:
                tighter = calibrate(make_noise, epsilon, delta, sampling_rate, steps, geometry, sensitivity,
                                    accuracy, max_scale, start=scale, rtol=rtol, margin=0.0,
                                    max_certificates=max_certificates, progress=progress)
                if tighter[0] < scale:
                    return tighter
            return scale, cert
        if scale >= max_scale:
            raise ScaleNotFound(infeasible)
        scale = min(max_scale, scale * max(cert.epsilon / epsilon, 1.0) * (1 + 1e-4))
    raise CertificationError("calibration did not converge")
