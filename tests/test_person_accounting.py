"""Person-level accounting of record-level Poisson runs (docs/privacy.md, "Person-level DP").

A person named in k records: one step's pair is the Binomial(k, q) mixture of shifts.  Checked
against ShiftPair (k = 1), dp-accounting's mixture-of-Gaussians PLD (an independent implementation),
a brute-force computation of the pair (T = 1 exact up to a root, T = 2 by a 2-D integral), group
privacy (an upper bound), monotonicity in k, and a 2-D grid over the angle between two records'
gradients (the aligned case is the worst)."""
from __future__ import annotations

import dataclasses
import functools
import json
import math

import numpy as np
import pytest
from scipy import special

from accountant.certify import certify
from accountant.ledger import PrivacyLedger
from accountant.mechanism import Mechanism, UnsupportedMechanism, step_pair
from accountant.mixture_pair import MixtureShiftPair, binomial_pair, binomial_weights
from accountant.noise import LMO, Gaussian, GeneralizedGaussian, Laplace
from accountant.person import GROUP, TIGHT, group_privacy, person_epsilon
from accountant.privacy_loss import ShiftPair, TAIL_NEGLIGIBLE, hockey_stick

Q, DELTA = 0.05, 1e-5


def _gaussian(k: int, steps: int, sigma: float = 1.0, q: float = Q) -> Mechanism:
    return Mechanism(Gaussian(sigma), 1.0, "l2", q, steps, records_per_unit=k)


# ---------------------------------------------------------------------------------------------
# 1. k = 1 is ShiftPair
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma,q", [(1.0, 0.05), (0.7, 0.3), (3.0, 0.001)])
def test_mixture_with_one_record_equals_shift_pair(sigma, q):
    noise = Gaussian(sigma)
    shift, mixture = ShiftPair(noise, 1.0, q), binomial_pair(noise, 1.0, 1, q)
    for direction in ("remove", "add"):
        lo, hi = shift.loss_range(direction)
        t = np.linspace(lo, hi, 4001)
        for a, b in zip(shift.tails(direction, t), mixture.tails(direction, t)):
            # relative 1e-9: near the loss floor ShiftPair's closed form (log1p(-(1 - q) e^-t))
            # cancels and is off by up to 1e-12 (sigma 3, q 1e-3), 1e-13 elsewhere; absolute
            # TAIL_NEGLIGIBLE where the mixture's domain ends (mass beyond it is counted there)
            assert np.all(np.abs(a - b) <= 1e-9 * np.abs(a) + TAIL_NEGLIGIBLE)
        assert mixture.mean_loss(direction) == pytest.approx(shift.mean_loss(direction), rel=1e-9)
        assert mixture.loss_range(direction)[1 if direction == "remove" else 0] == pytest.approx(
            shift.loss_range(direction)[1 if direction == "remove" else 0], rel=1e-6)


@pytest.mark.parametrize("k", [1, 3])
def test_mixture_tails_against_50_digit_reference(k):
    """U(t) of the remove relation against mpmath at 50 digits, including levels just above the
    loss floor k log(1 - q) where the level set is ill-conditioned."""
    import mpmath
    sigma, q = 3.0, 1e-3
    pair = binomial_pair(Gaussian(sigma), 1.0, k, q)
    floor = k * math.log1p(-q)
    ts = np.array([floor + 1e-6, floor + 1e-4, 0.0013411663543485377, 0.02, 0.3, 1.0])
    upper, lower, below = pair.tails("remove", ts)
    with mpmath.workdps(50):
        w = [mpmath.binomial(k, j) * mpmath.mpf(q) ** j * (1 - mpmath.mpf(q)) ** (k - j) for j in range(k + 1)]
        s = mpmath.mpf(sigma)
        for t, u, low, v in zip(ts, upper, lower, below):
            lr = lambda x: mpmath.log(sum(w[j] * mpmath.exp((2 * x * j - j * j) / (2 * s * s))  # noqa: E731
                                          for j in range(k + 1)))
            x = mpmath.findroot(lambda x: lr(x) - mpmath.mpf(t), (-40, 60), solver="anderson")
            ref_u = sum(w[j] * mpmath.ncdf(-(x - j) / s) for j in range(k + 1))
            ref_v = sum(w[j] * mpmath.ncdf((x - j) / s) for j in range(k + 1))
            assert u == pytest.approx(float(ref_u), rel=1e-12)
            assert low == pytest.approx(float(mpmath.ncdf(-x / s)), rel=1e-12)
            # below the computational domain (mass < TAIL_NEGLIGIBLE) the lower tail is counted as 0
            assert v == pytest.approx(float(ref_v), rel=1e-12, abs=TAIL_NEGLIGIBLE)


def test_k1_routes_reproduce_record_certificate():
    """The routes fed the k = 1 mixture give the record-level certificate's numbers
    (sigma 1, q .05, delta 1e-5, T 1: 1.03401, PLD [1.03274, 1.03279], PRV [1.03157, 1.03401])."""
    from accountant import routes
    record = certify(_gaussian(1, 1), DELTA)
    pair = binomial_pair(Gaussian(1.0), 1.0, 1, Q)
    step = record.routes["pld"]["step"]
    pld = routes.pld_route([(pair, 1)], DELTA, step)
    assert pld.upper == pytest.approx(record.routes["pld"]["upper"], rel=1e-9)
    assert pld.lower == pytest.approx(record.routes["pld"]["lower"], rel=1e-9)
    assert record.epsilon == pytest.approx(1.03401, abs=1e-5)


def test_step_pair_choice_and_json_round_trip():
    assert isinstance(step_pair(_gaussian(1, 1)), ShiftPair)
    pair = step_pair(_gaussian(3, 1))
    assert isinstance(pair, MixtureShiftPair) and pair.k == 3
    assert pair.weights == pytest.approx([0.95 ** 3, 3 * 0.05 * 0.95 ** 2, 3 * 0.05 ** 2 * 0.95, 0.05 ** 3],
                                         rel=1e-14)
    # q = 1: every record in every step, one shift of k C
    full = step_pair(Mechanism(Gaussian(1.0), 1.0, "l2", 1.0, 1, records_per_unit=4))
    assert isinstance(full, ShiftPair) and full.shift == 4.0
    assert "records_per_unit" not in _gaussian(1, 5).describe()      # record-level unchanged
    assert _gaussian(4, 5).describe()["records_per_unit"] == 4
    assert _gaussian(4, 5).with_steps(9).records_per_unit == 4
    ledger = PrivacyLedger(DELTA)
    ledger.record(_gaussian(4, 1), 7)
    back = PrivacyLedger.from_json(ledger.to_json())
    assert [m.describe() for m in back.mechanisms()] == [_gaussian(4, 7).describe()]
    assert json.loads(ledger.to_json())["entries"][0]["mechanism"]["records_per_unit"] == 4
    with pytest.raises(ValueError):
        Mechanism(Gaussian(1.0), records_per_unit=0)


# ---------------------------------------------------------------------------------------------
# 2. Against dp-accounting's mixture-of-Gaussians PLD and the design numbers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps,k,expected", [
    (1, 1, 1.0328), (1, 2, 2.2019), (1, 4, 4.5539), (1, 8, 9.2039),
    (100, 1, 3.5021), (100, 2, 7.7020), (100, 4, 17.4961), (100, 8, 41.9954)])
def test_person_epsilon_matches_independent_values(steps, k, expected):
    """``expected``: dp-accounting's mixture-of-Gaussians PLD (pessimistic, interval 1e-4), computed
    apart (the live comparison is the slow test below: dp-accounting needs minutes per mixture).
    The PLD route's interval holds it, and the certificate (the larger route upper bound; PRV's
    eps_error is 1e-3 epsilon) lies within 2.5e-3 above it."""
    record = certify(_gaussian(1, steps), DELTA)
    cert = person_epsilon(_gaussian(1, steps), DELTA, k, record_epsilon=record.epsilon)
    assert cert.method == TIGHT and cert.k == k and cert.record_epsilon == record.epsilon
    routes = cert.routes if k > 1 else record.routes
    assert routes["pld"]["lower"] <= expected + 5e-5 and routes["pld"]["upper"] >= expected - 5e-5
    assert routes["prv"]["lower"] <= expected + 5e-5 and routes["prv"]["upper"] >= expected - 5e-5
    assert expected - 5e-5 <= cert.epsilon <= expected * (1 + 2.5e-3)


def _dp_accounting_interval(k: int, steps: int, interval: float = 1e-3) -> tuple[float, float]:
    """dp-accounting's optimistic and pessimistic epsilon for the mixture (an independent
    implementation of the same pair: MixtureGaussianPrivacyLoss, both adjacencies)."""
    from dp_accounting.pld import privacy_loss_distribution as pld
    out = []
    for pessimistic in (False, True):
        dist = pld.from_mixture_gaussian_mechanism(1.0, list(range(k + 1)), list(binomial_weights(k, Q)),
                                                   pessimistic_estimate=pessimistic,
                                                   value_discretization_interval=interval)
        out.append((dist.self_compose(steps) if steps > 1 else dist).get_epsilon_for_delta(DELTA))
    return out[0], out[1]


@pytest.mark.slow
@pytest.mark.parametrize("steps,k", [(1, 2), (2, 4), (100, 2)])
def test_person_epsilon_against_dp_accounting(steps, k):
    low, high = _dp_accounting_interval(k, steps)
    cert = person_epsilon(_gaussian(1, steps), DELTA, k)
    for route in ("pld", "prv"):
        assert cert.routes[route]["lower"] <= high and cert.routes[route]["upper"] >= low
    assert cert.epsilon >= low


# ---------------------------------------------------------------------------------------------
# 3. Brute force of the pair (independent of both routes)
# ---------------------------------------------------------------------------------------------
def _log_lr(x, k, q=Q):
    """log sum_j w_j phi(x - j) / phi(x), unit Gaussian noise, shift 1 (written out anew)."""
    j = np.arange(k + 1)
    log_w = (special.gammaln(k + 1) - special.gammaln(j + 1) - special.gammaln(k - j + 1)
             + j * math.log(q) + (k - j) * math.log1p(-q))
    terms = log_w + j * np.asarray(x)[..., None] - j * j / 2.0
    top = terms.max(-1)
    return top + np.log(np.exp(terms - top[..., None]).sum(-1))


def _inverse(level, k):
    """x with log LR(x) = level, by plain bisection (log LR increases from log w_0 to inf)."""
    level = np.asarray(level, dtype=np.float64)
    lo, hi = np.full(level.shape, -60.0), np.full(level.shape, 60.0 + k)
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        up = _log_lr(mid, k) > level
        lo, hi = np.where(up, lo, mid), np.where(up, mid, hi)
    x = 0.5 * (lo + hi)
    return np.where(level <= _log_lr(-60.0, k), -np.inf, x)


@functools.lru_cache(maxsize=None)
def _outer_nodes(k):
    """20-point Gauss-Legendre nodes on 400 panels over x1, with p(x1), a(x1), log LR(x1)."""
    nodes, weights = np.polynomial.legendre.leggauss(20)
    edges = np.linspace(-14.0, 14.0 + k, 401)
    mid, half = 0.5 * (edges[1:] + edges[:-1]), 0.5 * (edges[1:] - edges[:-1])
    x1 = (mid[:, None] + half[:, None] * nodes[None, :]).ravel()
    wx = (half[:, None] * weights[None, :]).ravel()
    p1 = np.exp(-0.5 * x1 * x1) / math.sqrt(2 * math.pi)
    l1 = _log_lr(x1, k)
    return wx, p1, p1 * np.exp(l1), l1


def _mix_sf(x, k):
    w = np.array(binomial_weights(k, Q))
    return (w * special.ndtr(-(np.asarray(x)[..., None] - np.arange(k + 1)))).sum(-1)


def _mix_cdf(x, k):
    w = np.array(binomial_weights(k, Q))
    return (w * special.ndtr(np.asarray(x)[..., None] - np.arange(k + 1))).sum(-1)


def _brute_delta(eps, k, steps, direction):
    """Hockey-stick divergence of the T-fold pair at eps, T = 1 or 2."""
    if steps == 1:
        if direction == "remove":
            x = _inverse(eps, k)
            return float(_mix_sf(x, k) - math.exp(eps) * special.ndtr(-x))
        x = _inverse(-eps, k)
        return float(special.ndtr(x) - math.exp(eps) * _mix_cdf(x, k))
    # T = 2: the x2 integral in closed form on the half-line where the summed loss exceeds eps
    wx, p1, a1, l1 = _outer_nodes(k)
    if direction == "remove":
        x2 = _inverse(eps - l1, k)
        inner = a1 * _mix_sf(x2, k) - math.exp(eps) * p1 * special.ndtr(-x2)
    else:
        x2 = _inverse(-eps - l1, k)
        inner = p1 * special.ndtr(x2) - math.exp(eps) * a1 * _mix_cdf(x2, k)
    return float(np.sum(np.maximum(inner, 0.0) * wx))


@functools.lru_cache(maxsize=None)
def _brute_epsilon(k, steps, direction, lo=0.0, hi=40.0):
    """Epsilon at DELTA in [lo, hi] (delta(eps) is decreasing) by Brent's method on log delta, to 1e-8."""
    from scipy.optimize import brentq

    def excess(eps):
        return math.log(max(_brute_delta(eps, k, steps, direction), 1e-300)) - math.log(DELTA)

    return brentq(excess, lo, hi, xtol=1e-8, rtol=1e-12)


@pytest.mark.parametrize("steps,k", [(1, 1), (1, 2), (1, 4), (1, 8), (2, 1), (2, 2), (2, 4), (2, 8)])
def test_routes_bracket_brute_force(steps, k):
    cert = certify(_gaussian(k, steps), DELTA)
    for direction in ("remove", "add"):
        intervals = [cert.routes[r]["per_direction"][direction] for r in ("pld", "prv")]
        lo = max(0.0, min(i["lower"] for i in intervals) - 0.05)
        hi = max(i["upper"] for i in intervals) + 0.05
        truth = _brute_epsilon(k, steps, direction, lo, hi)
        for route, interval in zip(("pld", "prv"), intervals):
            assert interval["upper"] >= truth - 1e-6, (route, direction, interval, truth)
            assert interval["lower"] <= truth + 1e-6, (route, direction, interval, truth)
        if direction == "remove":
            assert cert.epsilon >= truth - 1e-6


@pytest.mark.parametrize("steps,direction,expected", [
    (1, "remove", 2.20190), (1, "add", 0.09706), (2, "remove", 2.50425), (2, "add", 0.18484)])
def test_brute_force_matches_design_values(steps, direction, expected):
    """The brute force itself against values computed apart (k 2)."""
    assert _brute_epsilon(2, steps, direction, max(0.0, expected - 0.01), expected + 0.01) == pytest.approx(
        expected, abs=2e-5)


# ---------------------------------------------------------------------------------------------
# 4. Group privacy is an upper bound; 5. monotone in k
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,expected", [(2, 2.8619), (4, 11.3445)])
def test_group_privacy_bounds_tight_from_above(k, expected):
    tight = person_epsilon(_gaussian(1, 1), DELTA, k).epsilon
    group, delta_r = group_privacy(_gaussian(1, 1), DELTA, k)
    assert tight <= group
    # the fallback's group delta (the exact chain sum) is at most the target ...
    eps_r = group / k
    assert delta_r * sum(math.exp(i * eps_r) for i in range(k)) <= DELTA
    # ... and it is no worse than the cruder k e^{(k-1) eps} delta_r form of the design table
    assert group <= expected * (1 + 1e-3)


def test_group_privacy_none_finite_is_infinite():
    eps, delta_r = group_privacy(_gaussian(1, 1), DELTA, 8)
    assert eps == math.inf and math.isnan(delta_r)


def test_person_epsilon_none_finite_says_why():
    # a Gaussian-shaped law that is not the Gaussian class: no tight pair, and at k 8 group privacy
    # finds no record-level delta (as for the Gaussian) -> inf, labelled, with the reason
    cert = person_epsilon(Mechanism(GeneralizedGaussian(math.sqrt(2.0), 2.0), 1.0, "scalar", Q, 1), DELTA, 8)
    assert cert.method == GROUP and cert.epsilon == math.inf
    assert "no finite epsilon" in cert.reason and cert.as_dict()["epsilon"] is None


def test_monotone_in_k():
    """One step's hockey stick, both relations, is non-decreasing in k on an epsilon grid: the pair
    for k is dominated by the pair for k + 1, so every composition is too (a person in k records is
    a person in k + 1 records whose last gradient is 0).  The certificates follow."""
    eps = np.linspace(0.0, 12.0, 241)
    for direction in ("remove", "add"):
        curves = [hockey_stick(binomial_pair(Gaussian(1.0), 1.0, k, Q), direction, eps) for k in range(1, 10)]
        for a, b in zip(curves, curves[1:]):
            assert np.all(a <= b * (1 + 1e-12) + 1e-300)
    certs = [person_epsilon(_gaussian(1, 1), DELTA, k).epsilon for k in (1, 2, 3)]
    assert certs[0] < certs[1] < certs[2]
    assert certs[0] == certify(_gaussian(1, 1), DELTA).epsilon


# ---------------------------------------------------------------------------------------------
# 6. Aligned gradients are the worst (2-D grid)
# ---------------------------------------------------------------------------------------------
def _grid_hockey_stick(theta, eps, direction, n=1201):
    """Hockey stick of (sum_S pi_S N(v_S, I_2), N(0, I_2)) for g_1 = e_1, g_2 at angle theta,
    q .05, by the midpoint rule on [-9, 11]^2."""
    xs = np.linspace(-9.0, 11.0, n)
    h = xs[1] - xs[0]
    x, y = np.meshgrid(xs, xs, indexing="ij")
    g1, g2 = np.array([1.0, 0.0]), np.array([math.cos(theta), math.sin(theta)])

    def phi(v):
        return np.exp(-0.5 * ((x - v[0]) ** 2 + (y - v[1]) ** 2)) / (2 * math.pi)

    p = phi(np.zeros(2))
    a = (1 - Q) ** 2 * p + Q * (1 - Q) * (phi(g1) + phi(g2)) + Q * Q * phi(g1 + g2)
    upper, lower = (a, p) if direction == "remove" else (p, a)
    return float(np.sum(np.maximum(upper - math.exp(eps) * lower, 0.0)) * h * h)


@pytest.mark.parametrize("direction,eps", [("remove", 1.0), ("remove", 0.5), ("add", 0.03)])
def test_aligned_gradients_are_worst(direction, eps):
    exact = hockey_stick(MixtureShiftPair(Gaussian(1.0), 1.0, binomial_weights(2, Q)), direction, [eps])[0]
    aligned = _grid_hockey_stick(0.0, eps, direction)
    assert aligned == pytest.approx(exact, rel=1e-4)          # the grid resolves the 1-D pair
    values = [_grid_hockey_stick(t, eps, direction) for t in np.linspace(0, math.pi, 7)[1:]]
    assert max(values) <= exact * (1 + 1e-4)
    assert values[-1] < 0.5 * exact        # opposite gradients cancel: far below the aligned case


# ---------------------------------------------------------------------------------------------
# 11. Refusals and labels
# ---------------------------------------------------------------------------------------------
def test_non_gaussian_laws_fall_back_to_labelled_group_privacy():
    # scalar Laplace (mixed-sign contributions: no theorem), Laplace under l1 (randomized-response
    # route), LMO (not log-concave): never "tight"
    for mech in (Mechanism(Laplace(4.0), 1.0, "scalar", Q, 1),
                 Mechanism(Laplace(4.0), 1.0, "l1", Q, 1),
                 Mechanism(LMO(0.5, 0.3, 0.2, 2.5, 1.0, 2.0, 0.1, 1.0).scaled(4.0), 1.0, "l1", Q, 1)):
        with pytest.raises(UnsupportedMechanism):
            step_pair(Mechanism(mech.noise, 1.0, mech.geometry, Q, 1, records_per_unit=2))
        cert = person_epsilon(mech, DELTA, 2)
        assert cert.method == GROUP and "group privacy" in cert.reason
        record = certify(mech, cert.routes["record_delta"]).epsilon
        assert cert.epsilon == pytest.approx(2 * record, rel=1e-12)
        assert cert.epsilon >= cert.record_epsilon
        assert person_epsilon(mech, DELTA, 1).method == GROUP      # even k = 1 is not called tight
    assert person_epsilon(_gaussian(1, 1), DELTA, 1).method == TIGHT


def test_mixture_pair_refuses_non_log_concave_noise():
    with pytest.raises(ValueError, match="log-concave"):
        MixtureShiftPair(LMO(0.5, 0.3, 0.2, 2.5, 1.0, 2.0, 0.1, 1.0).scaled(4.0), 1.0, binomial_weights(2, Q))
    with pytest.raises(ValueError):
        person_epsilon(_gaussian(1, 1), DELTA, 0)
    with pytest.raises(ValueError, match="records_per_unit"):
        person_epsilon(_gaussian(2, 1), DELTA, 2)


def test_closed_form_bound_of_the_mixture_is_the_unsampled_group_shift():
    """Where the grids cannot run, certify falls back to the closed form: the Gaussian mechanism
    with sensitivity k C (joint convexity, then Lemma M), never below the tight certificate."""
    from accountant.certify import closed_form_bound, gaussian_epsilon
    mech = _gaussian(2, 3)
    bound = closed_form_bound([(step_pair(mech), 3)], DELTA)
    assert bound["upper"] == gaussian_epsilon(2 * math.sqrt(3), DELTA) and not bound["exact"]
    assert bound["upper"] >= certify(mech, DELTA).epsilon


def test_person_certificate_is_strict_json():
    """metrics.json / ledger.json carry the person-level numbers: no NaN or infinity in them."""
    tight = person_epsilon(_gaussian(1, 1), DELTA, 2).as_dict()
    back = json.loads(json.dumps(tight, allow_nan=False))
    assert back["method"] == TIGHT and back["k"] == 2 and back["epsilon"] > back["record_epsilon"]
    infinite = dataclasses.replace(person_epsilon(_gaussian(1, 1), DELTA, 1), epsilon=math.inf,
                                   record_epsilon=math.inf, method=GROUP)
    out = json.loads(json.dumps(infinite.as_dict(), allow_nan=False))
    assert out["epsilon"] is None and out["record_epsilon"] is None
