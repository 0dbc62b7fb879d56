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

from accountant import routes
from accountant.mechanism import Mechanism, UnsupportedMechanism, step_pair
from accountant.noise import Noise
from accountant.privacy_loss import RandomizedResponsePair


class CertificationError(ValueError):
    """No certificate can be printed (unsupported mechanism or contradicting routes)."""


class RouteDisagreement(CertificationError):
    pass


@dataclass(frozen=True)
class Accuracy:
    """Numerical settings.  ``pld_step=None`` chooses a step far below the per-step loss spread;
    ``prv_relative_error`` sets prv-accountant's eps_error relative to the PLD estimate."""

    pld_step: float | None = None
    prv_relative_error: float = 1e-3
    prv_min_error: float = 1e-4


@dataclass(frozen=True)
class Certificate:
    epsilon: float
    delta: float
    routes: dict
    mechanisms: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"epsilon": self.epsilon, "delta": self.delta, "routes": self.routes,
                "mechanisms": self.mechanisms}


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


def _pld_step(groups, accuracy: Accuracy) -> float:
    if accuracy.pld_step is not None:
        return accuracy.pld_step
    widths = []
    for pair, _ in groups:
        lo, hi = pair.loss_range("remove")
        widths.append(hi - lo)
    return float(min(1e-4, min(widths) / 2000))


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
    """Certified epsilon at ``delta`` for the composition of ``mechanisms`` (a Mechanism or a list)."""
    _check_delta(delta)
    mechs = _as_list(mechanisms)
    groups = _groups(mechs)
    step = _pld_step(groups, accuracy)
    pld = routes.pld_route(groups, delta, step)
    eps_error = max(accuracy.prv_min_error, accuracy.prv_relative_error * pld.upper)
    span = _prv_span(pld, delta)
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
    return Certificate(epsilon, delta, info, [m.describe() for m in mechs])


def _prv_span(pld: routes.RouteResult, delta: float) -> float:
    """Half-width of the PRV domain such that the composed finite loss exceeds it (and would wrap
    around in the FFT) with probability far below prv-accountant's delta error, measured on the
    pessimistic PLD of the same composition."""
    span = 1.2 * pld.upper + 1
    for _ in range(30):
        if pld.finite_tail(span) <= 1e-2 * delta * 1e-3:
            return span
        span *= 1.3
    raise CertificationError("cannot size the PRV domain: the privacy loss has too heavy a tail")


#: relative slack of the agreement check: the float64 FFT floor (about 1e-15 in delta, i.e. a few
#: 1e-6 relative in epsilon at delta 1e-10; REFERENCE.md) can move a route's bound by that much.
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
    return routes.pld_route(groups, delta, _pld_step(groups, accuracy)).upper


def delta_for_epsilon(mechanisms, epsilon: float, accuracy: Accuracy = Accuracy()) -> float:
    """Certified delta at ``epsilon``: the larger upper bound of the PLD route (pessimistic) and
    the PRV route, max over add and remove; the routes' intervals must overlap."""
    if not (epsilon >= 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a finite non-negative number, got {epsilon}")
    groups = _groups(_as_list(mechanisms))
    pld = routes.pld_route(groups, 0.5, _pld_step(groups, accuracy))
    pld_up, pld_low = pld.delta_at(epsilon), pld.delta_lower_at(epsilon)
    delta_error = max(1e-3 * pld_up, 1e-15)
    eps_error = max(accuracy.prv_min_error, accuracy.prv_relative_error * max(epsilon, 0.1))
    span = 1.2 * epsilon + 1
    while pld.finite_tail(span) > 1e-2 * delta_error and span < 1e4:
        span *= 1.3
    prv_low, _, prv_up = routes.prv_delta(groups, epsilon, delta_error, eps_error, span)
    if pld_low > prv_up + 1e-12 or prv_low > pld_up + 1e-12:
        raise RouteDisagreement(
            f"accountants disagree on delta at epsilon {epsilon:g}: PLD [{pld_low:.4g}, {pld_up:.4g}], "
            f"PRV [{prv_low:.4g}, {prv_up:.4g}]; no certificate is printed")
    return min(1.0, max(pld_up, prv_up))


def delta_for_epsilon_pld(mechanisms, epsilon: float, accuracy: Accuracy = Accuracy()) -> float:
    """The pessimistic PLD delta alone (fast; for searches and tests of the PLD route)."""
    groups = _groups(_as_list(mechanisms))
    return routes.pld_route(groups, 0.5, _pld_step(groups, accuracy)).delta_at(epsilon)


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
        step = _pld_step(groups, accuracy) * (10 if coarse else 1)
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
