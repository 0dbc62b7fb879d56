"""The one composition/read-out core (accountant.composition) against brute force and dp-accounting's
public API."""
import math

import numpy as np
import pytest
from dp_accounting.pld import pld_pmf

from accountant import composition as C
from accountant import routes
from accountant.noise import Gaussian, LaplaceMixture
from accountant.privacy_loss import ShiftPair


def _brute_epsilon(losses, probs, inf_mass, delta):
    """Bisection on the hockey-stick curve (monotone in epsilon), to 1e-13."""
    if C.hockey_stick(losses, probs, inf_mass, 0.0) <= delta:
        return 0.0
    lo, hi = 0.0, float(losses.max()) + 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if C.hockey_stick(losses, probs, inf_mass, mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("seed", range(5))
def test_epsilon_read_out_is_the_exact_root_of_the_hockey_stick(seed):
    rng = np.random.default_rng(seed)
    losses = np.sort(rng.normal(0.5, 1.5, 300))
    probs = rng.dirichlet(np.ones(300)) * 0.999
    for delta in (1e-1, 1e-2, 1e-3):
        got = C.epsilon_for_delta(losses, probs, 1e-4, delta)
        assert got == pytest.approx(_brute_epsilon(losses, probs, 1e-4, delta), abs=1e-10)
        assert C.hockey_stick(losses, probs, 1e-4, got) <= delta * (1 + 1e-9)


def test_read_out_does_not_overflow_for_huge_losses():
    losses = np.array([0.0, 800.0, 1500.0])
    probs = np.array([0.5, 0.3, 0.2])
    eps = C.epsilon_for_delta(losses, probs, 0.0, 0.1)
    assert math.isfinite(eps) and eps == pytest.approx(_brute_epsilon(losses, probs, 0.0, 0.1), rel=1e-12)
    assert C.epsilon_for_delta(losses, probs, 0.2, 0.1) == math.inf


@pytest.mark.parametrize("count", [2, 7, 64])
def test_self_convolve_matches_repeated_direct_convolution(count):
    rng = np.random.default_rng(count)
    p = rng.dirichlet(np.ones(40))
    direct = p.astype(np.longdouble)                  # the reference in long double
    for _ in range(count - 1):
        direct = np.convolve(direct, p.astype(np.longdouble))
    for kind in (np.float64, np.longdouble):
        lo, got, allowance = C.self_convolve(p, count, 1e-16, kind)
        window = direct[lo:lo + got.size]
        assert float(direct.sum() - window.sum()) <= 1e-16 + 1e-17      # the Chernoff window's tail
        # round-off within the allowance; the tail outside wraps onto the window (at most 1e-16)
        assert float(np.abs(window - got).sum()) <= allowance + 1e-16
        assert allowance == C.roundoff_allowance(kind, count)


def test_precision_switches_to_long_double_when_float64_roundoff_exceeds_the_budget():
    assert C.precision(1000, 1e-9) is np.float64
    assert C.precision(10 ** 6, 1e-9) is np.longdouble


@pytest.mark.parametrize("noise,q,step", [(Gaussian(1.0), 0.01, 1e-3), (LaplaceMixture([0.5, 0.5], [0.5, 1.5]), 0.05, 2e-3)])
def test_connect_the_dots_equals_dp_accountings(noise, q, step):
    """Our vectorised Connect-the-Dots against dp-accounting's, read through its public delta."""
    pair = ShiftPair(noise, 1.0, q)
    for direction in routes.DIRECTIONS:
        k_lo, k_hi = routes.pld_grid(pair, direction, step)
        grid = np.arange(k_lo, k_hi + 1) * step
        upper, lower, _ = pair.tails(direction, grid)
        deltas = routes.hockey_stick_on_grid(upper, lower, grid)
        ours = C.connect_the_dots(step, k_lo, deltas)
        theirs = pld_pmf.create_pmf_pessimistic_connect_dots_fixed_gap(step, k_lo, k_hi, deltas)
        assert ours.lower == k_lo and ours.probs.size == k_hi - k_lo + 1
        for eps in (0.0, 0.01, 0.05, 0.2, 1.0):
            assert ours.delta(eps) == pytest.approx(theirs.get_delta_for_epsilon(eps), rel=1e-9, abs=1e-15)
        composed_ours = ours.self_compose(50, 0.0)
        composed_theirs = theirs.self_compose(50, tail_mass_truncation=1e-15)
        for delta in (1e-3, 1e-5):
            assert composed_ours.epsilon(delta) == pytest.approx(
                composed_theirs.get_epsilon_for_delta(delta), rel=2e-3, abs=2 * step)


def test_composed_pmf_pessimistic_read_out_adds_the_roundoff():
    p = C.ComposedPMF(0.1, 0, np.array([0.5, 0.3, 0.2]), 0.0, 1e-3, True)
    o = C.ComposedPMF(0.1, 0, np.array([0.5, 0.3, 0.2]), 0.0, 1e-3, False)
    exact = C.hockey_stick(p.losses(), p.probs, 0.0, 0.05)
    assert p.delta(0.05) == pytest.approx(exact + 1e-3) and o.delta(0.05) == pytest.approx(exact - 1e-3)
    assert p.epsilon(0.05) >= o.epsilon(0.05)


@pytest.mark.parametrize("steps", [100, 3000])
def test_prv_route_float64_composition_within_the_roundoff_allowance(steps):
    """prv-accountant composes in the precision of the PMFs it is given (``F ** n``, not repeated
    squaring): its float64 composition, against the long-double one on the same grid, stays within
    the allowance the PRV route adds to its delta error."""
    groups = [(ShiftPair(Gaussian(1.0), 1.0, 0.01), steps)]
    args = (1e-9, 0.05, 3.0)
    f64 = routes._prv_composed(groups, *args, kind=np.float64)
    ld = routes._prv_composed(groups, *args, kind=np.longdouble)
    for direction in routes.DIRECTIONS:
        a, b = f64[direction][0].pmf, ld[direction][0].pmf
        assert a.dtype == np.float64 and b.dtype == np.longdouble
        err = float(np.abs(a.astype(np.longdouble) - b).sum())
        model, floor = routes._prv_roundoff(groups, np.float64, 0.05, 1e-9, 3.0)
        assert err <= model + floor, (err, steps)
        assert err <= 0.25 * floor          # measured 0.05 to 0.13 u N
