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
from accountant.noise import Noise
from accountant.privacy_loss import RandomizedResponsePair


class CertificationError(ValueError):
    """No certificate can be printed (unsupported mechanism or contradicting routes)."""


class RouteDisagreement(CertificationError):
    pass


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
    floor = 1.05 * max(width, 20 * sd) / routes.MAX_PLD_POINTS
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
    whose support does not cover its shift) exceeds ``delta``: no finite epsilon holds then."""
    _check_delta(delta)
    mechs = _as_list(mechanisms)
    groups = _groups(mechs)
    step = _pld_step(groups, delta, accuracy)
    pld = routes.pld_route(groups, delta, step)
    if math.isinf(pld.lower):
        info = {"pld": pld.as_dict()}
        info["pld"].update(step=step, infinite_loss_mass=_infinite_loss_mass(groups))
        return Certificate(math.inf, delta, info, [m.describe() for m in mechs])
    span = _prv_span(pld, delta)
    eps_error = _prv_eps_error(groups, pld.upper, span, delta, accuracy)
    prv = routes.prv_route(groups, delta, eps_error, span)
    results = {"pld": pld, "prv": prv}
    exact = _exact_rr(groups, delta)
    if exact is not None:
        results["exact"] = exact
    _check_agreement(results)
    epsilon = max(r.upper for r in results.values())
    info = {name: r.as_dict() for name, r in results.items()}
    info["pld"]["step"] = step
    info["prv"]["eps_error"] = eps_error
    checks = {}
    independent = table_check.check(groups, delta)
    if independent is not None:
        _check_independent(independent, results, epsilon)
        checks["table"] = {"lower": independent.lower,
                           "upper": independent.upper if math.isfinite(independent.upper) else None}
    return Certificate(epsilon, delta, info, [m.describe() for m in mechs], checks)


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
    floor = routes.smallest_eps_error(groups, span, delta * 1e-3)
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
    return routes.pld_route(groups, delta, _pld_step(groups, delta, accuracy)).upper


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
    pld = routes.pld_route(groups, 0.5, _pld_step(groups, _DELTA_FOR_SIZING, accuracy), roundoff_budget=0.0)
    pld_up, pld_low = pld.delta_at(epsilon), pld.delta_lower_at(epsilon)
    if pld_low >= 1.0:
        return 1.0
    delta_error = max(1e-3 * pld_up, 1e-18)
    span = max(1.2 * epsilon, 0.01)
    while max(pld.finite_tail(span), pld.lower_tail(-span)) > 1e-2 * delta_error and span < 1e4:
        span *= 1.2
    floor = routes.smallest_eps_error(groups, span, delta_error)
    if accuracy.prv_eps_error is not None:
        eps_error, shrink = accuracy.prv_eps_error, False
    else:
        eps_error, shrink = max(accuracy.prv_relative_error * max(epsilon, 0.01), floor), True
    best = None
    while True:
        bounds = routes.prv_delta(groups, epsilon, delta_error, eps_error, span)
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


def calibrate(make_noise: Callable[[float], Noise], epsilon: float, delta: float, sampling_rate: float,
              steps: int, geometry: str = "scalar", sensitivity: float = 1.0,
              accuracy: Accuracy = Accuracy(), max_scale: float = 1e4) -> tuple[float, Certificate]:
    """Smallest scale s (to 1e-4 relative) with certified epsilon <= ``epsilon``; never overshoots.

    Epsilon decreases in the scale.  A bracketed bisection in log-scale runs on the pessimistic PLD,
    first with a 10x coarser grid, then at full accuracy inside the last bracket; the full two-route
    certificate follows, and if it exceeds the target the scale grows by 0.05% steps until it does not.
    """
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    _check_delta(delta)

    def mech(s):
        return Mechanism(make_noise(s), sensitivity, geometry, sampling_rate, steps)

    def pld_eps(s, coarse):
        groups = _groups([mech(s)])
        step = _pld_step(groups, delta, accuracy) * (10 if coarse else 1)
        try:
            return routes.pld_route(groups, delta, step).upper
        except ValueError:          # loss range too wide for a grid: far too little noise
            return math.inf

    lo = hi = 1.0
    if pld_eps(1.0, True) > epsilon:
        while pld_eps(hi, True) > epsilon:
            lo, hi = hi, hi * 2
            if hi > max_scale:
                raise CertificationError(
                    f"target epsilon {epsilon:g} at delta {delta:g} is infeasible for this noise "
                    f"family: even scale {max_scale:g} times the sensitivity is not enough")
    else:
        while pld_eps(lo, True) <= epsilon and lo > 1e-6:
            lo, hi = lo / 2, lo
    for coarse, tol in ((True, 1e-3), (False, 1e-4)):
        if not coarse:
            lo = hi / (1 + 2e-2)
            while pld_eps(lo, False) <= epsilon and lo > 1e-6:
                lo, hi = lo / (1 + 2e-2), lo
            if pld_eps(hi, False) > epsilon:
                lo, hi = hi, hi * (1 + 2e-2)
                while pld_eps(hi, False) > epsilon:
                    lo, hi = hi, hi * (1 + 2e-2)
        while hi / lo > 1 + tol:
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if pld_eps(mid, coarse) > epsilon else (lo, mid)
    scale = hi
    for _ in range(400):
        cert = certify(mech(scale), delta, accuracy)
        if cert.epsilon <= epsilon:
            return scale, cert
        scale *= 1.0005
    raise CertificationError("calibration did not converge")
