"""Person-level epsilon of a record-level run: the guarantee for a person named in at most k records.

The run is unchanged (per-record clipping, each record Poisson-sampled on its own).  Two corpora are
neighbours if they differ in *every* record naming one person (docs/privacy.md, "Person-level DP").

* Gaussian noise (l2, l1 or scalar geometry): the tight certificate of the Binomial(k, q) mixture of
  shifts (:class:`accountant.mixture_pair.MixtureShiftPair`), certified by both routes like any
  record-level certificate.  ``method = "tight mixture"``.
* Any other law (Laplace, LMO, tables, the l1 randomized-response route): group privacy of the
  record-level certificate, labelled ``"group privacy (fallback)"``, never "tight".  A mechanism
  that is (eps_r, delta_r)-DP for records is (k eps_r, delta_r sum_{i<k} e^{i eps_r})-DP for groups
  of k records (chain k record-level neighbours; Vadhan 2017, "The Complexity of Differential
  Privacy"; docs/privacy.md section 9 gives the proof; the sum is <= k e^{(k-1) eps_r} delta_r).
  delta_r is searched so that the group delta is at most the target; if no delta_r >= 1e-13 (the
  float64 floor of the accountant) achieves it, epsilon is ``inf`` and ``reason`` says so.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from accountant.certify import Accuracy, certify, pld_epsilon
from accountant.mechanism import Mechanism, UnsupportedMechanism, step_pair

TIGHT = "tight mixture"
GROUP = "group privacy (fallback)"
#: smallest record-level delta the group fallback may use (certify refuses smaller ones)
SMALLEST_RECORD_DELTA = 1e-13


@dataclass(frozen=True)
class PersonCertificate:
    """Person-level epsilon at ``delta`` for a person in at most ``k`` records, beside the record-level one."""

    epsilon: float
    delta: float
    k: int
    method: str
    record_epsilon: float
    #: tight: the routes' intervals (as in Certificate.routes); group: the record-level delta used
    routes: dict = field(default_factory=dict)
    #: why the fallback was used, or why no finite epsilon holds
    reason: str = ""

    def as_dict(self) -> dict:
        """JSON-ready (an infinite epsilon is ``None``: strict JSON has no infinity)."""
        finite = lambda v: v if math.isfinite(v) else None    # noqa: E731
        return {"epsilon": finite(self.epsilon), "delta": self.delta, "k": self.k, "method": self.method,
                "record_epsilon": finite(self.record_epsilon), "routes": self.routes, "reason": self.reason}


def _as_list(mechanisms) -> list[Mechanism]:
    items = [mechanisms] if isinstance(mechanisms, Mechanism) else list(mechanisms)
    if not items:
        raise ValueError("nothing to certify: no mechanism given")
    if any(m.records_per_unit != 1 for m in items):
        raise ValueError("person_epsilon takes the record-level mechanisms (records_per_unit 1) and a k")
    return items


def person_mechanisms(mechanisms, k: int) -> list[Mechanism]:
    """The same run accounted for a person in at most ``k`` records."""
    return [dataclasses.replace(m, records_per_unit=int(k)) for m in _as_list(mechanisms)]


def group_privacy(mechanisms, delta: float, k: int, accuracy: Accuracy = Accuracy()) -> tuple[float, float]:
    """(k eps_r, delta_r): group privacy of the record-level certificate with the largest delta_r
    on a grid (2 per decade, then 10 bisection steps in log delta_r) whose group delta
    ``delta_r sum_{i<k} e^{i eps_r}`` is at most ``delta``; (inf, nan) if none >= 1e-13 is.

    eps_r(delta_r) is searched with the PLD route's upper bound (fast, never below the certificate)
    and the chosen delta_r is certified by both routes and checked again."""
    mechs = _as_list(mechanisms)

    def group_delta(eps_r, delta_r):
        if not math.isfinite(eps_r):
            return math.inf
        return delta_r * sum(math.exp(i * eps_r) for i in range(k))

    def fits(delta_r, quick):
        eps_r = (pld_epsilon if quick else lambda m, d, a: certify(m, d, a).epsilon)(mechs, delta_r, accuracy)
        return group_delta(eps_r, delta_r) <= delta, eps_r

    if k == 1:
        return certify(mechs, delta, accuracy).epsilon, delta
    top = delta / k                        # the group delta is at least k delta_r
    grid = [top * 10 ** (-i / 2) for i in range(100) if top * 10 ** (-i / 2) >= SMALLEST_RECORD_DELTA]
    prev = None
    for delta_r in grid:
        if fits(delta_r, True)[0]:
            lo, hi = delta_r, prev        # lo fits, hi (larger) does not
            if hi is not None:
                for _ in range(10):
                    mid = math.sqrt(lo * hi)
                    lo, hi = (mid, hi) if fits(mid, True)[0] else (lo, mid)
            # the printed number: both routes at the chosen delta_r, smaller delta_r until it fits
            for _ in range(30):          # the certificate is at most ~1e-3 above the PLD bound
                if lo < SMALLEST_RECORD_DELTA:
                    break
                ok, eps_r = fits(lo, False)
                if ok:
                    return k * eps_r, lo
                lo *= 0.9
            break
        prev = delta_r
    return math.inf, math.nan


def person_epsilon(mechanisms, delta: float, k: int, accuracy: Accuracy = Accuracy(),
                   record_epsilon: float | None = None) -> PersonCertificate:
    """Person-level certificate of the record-level ``mechanisms`` (a Mechanism or a list) for a
    person named in at most ``k`` records; ``record_epsilon`` (the record-level certificate at
    ``delta``) is computed unless given."""
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    k = int(k)
    mechs = _as_list(mechanisms)
    if record_epsilon is None:
        record_epsilon = certify(mechs, delta, accuracy).epsilon
    reason = ""
    try:    # the tight pair exists for k >= 2 exactly when step_pair builds it
        for m in person_mechanisms(mechs, max(k, 2)):
            step_pair(m)
    except UnsupportedMechanism as exc:
        reason = str(exc)
    if not reason:
        if k == 1:      # the Binomial(1, q) mixture is the record-level pair itself
            return PersonCertificate(record_epsilon, delta, 1, TIGHT, record_epsilon,
                                     reason="k = 1: the record-level certificate")
        cert = certify(person_mechanisms(mechs, k), delta, accuracy)
        return PersonCertificate(cert.epsilon, delta, k, TIGHT, record_epsilon, cert.routes)
    if k == 1:          # a group of one record: the record-level certificate
        return PersonCertificate(record_epsilon, delta, 1, GROUP, record_epsilon,
                                 {"record_delta": delta}, reason)
    eps, delta_r = group_privacy(mechs, delta, k, accuracy)
    if not math.isfinite(eps):
        reason += (f"; group privacy gives no finite epsilon: no record-level delta >= "
                   f"{SMALLEST_RECORD_DELTA:g} keeps the group delta of {k} records <= {delta:g}")
        return PersonCertificate(math.inf, delta, k, GROUP, record_epsilon, {}, reason)
    return PersonCertificate(eps, delta, k, GROUP, record_epsilon, {"record_delta": delta_r}, reason)
