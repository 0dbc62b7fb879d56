"""sampling="fixed": batches of exactly B of N drawn without replacement, certified under substitution.

Checked against brute force (the exact output law: the mixture over all C(N, B) batches of the noisy
sum, for hand-chosen per-example contributions; T = 1 and 2) and, for larger T, against a pessimistic
and an optimistic PLD composition written here from the Gaussian closed forms.
"""
import itertools
import math

import numpy as np
import pytest
from scipy import special

from accountant.certify import certify
from accountant.fixed_pair import FixedPair
from accountant.mechanism import Mechanism, UnsupportedMechanism, step_pair
from accountant.noise import Gaussian, Laplace

C = 1.0   # clipping bound of one contribution; a substitution moves the sum by at most 2C


def _mixture(noise, contributions, batch, x):
    """Density at ``x`` of sum(contributions of a uniformly drawn batch) + noise: every batch."""
    sums = np.array([sum(contributions[j] for j in s)
                     for s in itertools.combinations(range(len(contributions)), batch)])
    return np.mean(np.exp(noise.logpdf(x[:, None] - sums[None, :])), axis=1)


def _exact_delta(noise, d, d2, batch, steps, eps, reach, points):
    """max over both orders of H_{e^eps} between the T-fold products of the two output laws
    (trapezoid rule; the densities vanish at +-reach)."""
    x = np.linspace(-reach, reach, points)
    h = x[1] - x[0]
    p, q = _mixture(noise, d, batch, x), _mixture(noise, d2, batch, x)
    if steps == 2:
        p, q = np.outer(p, p).ravel(), np.outer(q, q).ravel()
        h = h * h
    return max(np.sum(np.maximum(p - math.exp(eps) * q, 0)) * h, np.sum(np.maximum(q - math.exp(eps) * p, 0)) * h)


# (contributions of D, of its substitution neighbour D', batch size): the first is the worst case
# (the others equal D's replacement, so M(D') is one law and M(D) the gamma-mixture: tight at T = 1)
CASES = [([1.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0], 2),
         ([0.5, -1.0, 1.0, 0.25, 0.0], [-1.0, -1.0, 1.0, 0.25, 0.0], 2),
         ([1.0, 0.5, -0.5, 0.0, 1.0], [-0.5, 0.5, -0.5, 0.0, 1.0], 3)]


GAUSS, LAPLACE = (Gaussian(1.0), 14.0, 2801), (Laplace(1.0), 40.0, 3201)


@pytest.mark.parametrize("noise,reach,points,steps", [
    (*GAUSS, 1), (*LAPLACE, 1), (*LAPLACE, 2), pytest.param(*GAUSS, 2, marks=pytest.mark.slow)])   # 45 s
def test_fixed_against_brute_force(noise, reach, points, steps):
    for d, d2, batch in CASES:
        gamma = batch / len(d)
        for delta in (1e-2, 1e-4):
            cert = certify(Mechanism(noise, 2 * C, "scalar", gamma, steps, sampling="fixed"), delta)
            exact = _exact_delta(noise, d, d2, batch, steps, cert.epsilon, reach,
                                 points if steps == 2 else 200001)
            # the quadrature is accurate to ~1e-6 relative (Gaussian) and ~2e-4 (Laplace's kinks)
            assert exact <= delta * (1 + 1e-3), (d, d2, batch, delta, cert.epsilon, exact)
            if steps == 1 and d == CASES[0][0] and delta == 1e-2:
                assert exact >= 0.9 * delta         # nearly attained by the worst case


def test_poisson_certificate_is_not_a_fixed_size_certificate():
    """The case that makes a separate certificate necessary: the worst substitution neighbours of
    fixed-size batches leak more than the Poisson certificate at the same rate and clipping (add/remove,
    sensitivity C) promises; the fixed certificate covers them."""
    noise, (d, d2, batch), delta = Gaussian(1.0), CASES[0], 1e-2
    gamma = batch / len(d)
    poisson = certify(Mechanism(noise, C, "scalar", gamma, 1), delta).epsilon
    fixed = certify(Mechanism(noise, 2 * C, "scalar", gamma, 1, sampling="fixed"), delta).epsilon
    assert _exact_delta(noise, d, d2, batch, 1, poisson, 14.0, 200001) > 5 * delta
    assert _exact_delta(noise, d, d2, batch, 1, fixed, 14.0, 200001) <= delta * (1 + 1e-3)


def _gaussian_symmetric_pmf(sigma, s, gamma, h, reach, pessimistic):
    """The symmetric substitution loss of one Gaussian step on the grid h Z, its losses rounded up
    (pessimistic) or down, from closed forms: the remove loss of (A, P), A = gamma N(s) + (1-gamma) N(0),
    P = N(0), is M = log(1 - gamma + gamma e^l), l = (2 x s - s^2) / (2 sigma^2)."""
    t = np.arange(0, reach + h, h)
    lam = np.log(np.expm1(t) + gamma) - math.log(gamma)          # l > lam  <=>  M > t
    x = sigma ** 2 * lam / s + s / 2
    a_gt = (1 - gamma) * special.ndtr(-x / sigma) + gamma * special.ndtr(-(x - s) / sigma)
    p_gt = special.ndtr(-x / sigma)
    n = len(t)
    probs = np.zeros(2 * n - 1)                                   # losses -(n-1) h .. (n-1) h
    pos = a_gt[:-1] - a_gt[1:]                                    # A(M in (t_k, t_k+1])
    neg = p_gt[:-1] - p_gt[1:]                                    # mirrored: L in [-t_k+1, -t_k)
    if pessimistic:
        probs[n:] += pos
        probs[n - 1 - np.arange(len(neg))] += neg                 # up to -t_k
        probs[-1] += a_gt[-1]                                     # beyond the reach: the top
        probs[n - 1] += 1 - a_gt[0] - p_gt[0]
    else:
        probs[n - 1:-1] += pos
        probs[n - 2 - np.arange(len(neg))] += neg
        probs[0] += p_gt[-1]
        probs[n - 1] += 1 - a_gt[0] - p_gt[0]
    return probs


def _composed_epsilon(probs, h, steps, delta):
    n = (len(probs) - 1) // 2
    size = 1 << int(math.ceil(math.log2(steps * (len(probs) - 1) + 1)))
    out = np.fft.irfft(np.fft.rfft(probs, size) ** steps, size)[: steps * (len(probs) - 1) + 1]
    out = np.maximum(out, 0)
    loss = (np.arange(len(out)) - steps * n) * h

    def delta_at(eps):
        keep = loss > eps
        return float(np.sum(out[keep] * -np.expm1(eps - loss[keep])))

    lo, hi = 0.0, float(loss[-1])
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if delta_at(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("sigma,gamma,steps", [(1.0, 0.02, 30), (1.5, 0.05, 40)])
def test_fixed_against_independent_pld(sigma, gamma, steps):
    """The certificate lies inside the bracket [optimistic, pessimistic] of a PLD composition that
    shares nothing with the library but the theorem (grid 5e-4: the bracket is at most 0.3% wide
    here).  The PLD route lies inside it; the certificate (the larger of the two routes) at most the
    PRV route's allowance (1e-3 x epsilon, docs/privacy.md section 6) above it."""
    delta, h = 1e-5, 5e-4
    upper = _composed_epsilon(_gaussian_symmetric_pmf(sigma, 2 * C, gamma, h, 12.0, True), h, steps, delta)
    lower = _composed_epsilon(_gaussian_symmetric_pmf(sigma, 2 * C, gamma, h, 12.0, False), h, steps, delta)
    assert upper - lower <= 3e-3 * upper
    cert = certify(Mechanism(Gaussian(sigma), 2 * C, "l2", gamma, steps, sampling="fixed"), delta)
    assert lower <= cert.routes["pld"]["upper"] <= upper, (lower, cert.routes["pld"], upper)
    assert lower <= cert.epsilon <= upper * (1 + 1.5e-3), (lower, cert.epsilon, upper)


def test_mechanism_records_sampling_and_relation():
    m = Mechanism(Laplace(1.0), 2.0, "scalar", 0.1, 3, sampling="fixed")
    assert m.relation == "substitution"
    assert m.describe()["sampling"] == "fixed" and m.describe()["relation"] == "substitution"
    assert m.with_steps(7).sampling == "fixed"
    assert isinstance(step_pair(m), FixedPair)
    assert "sampling" not in Mechanism(Laplace(1.0)).describe()      # Poisson records unchanged
    with pytest.raises(UnsupportedMechanism):
        Mechanism(Laplace(1.0), 2.0, "scalar", 0.1, 3, sampling="fixed", relation="add/remove")
    cert = certify(m, 1e-6)
    assert cert.mechanisms[0]["relation"] == "substitution"


def test_fixed_pair_is_symmetric_and_matches_the_remove_pair_above_zero():
    pair = step_pair(Mechanism(Laplace(1.5), 2.0, "scalar", 0.2, 1, sampling="fixed"))
    eps = np.array([0.0, 0.05, 0.3, 1.0])
    up, low, _ = pair.tails("remove", eps)
    base_up, base_low, _ = pair.base.tails("remove", eps)
    np.testing.assert_array_equal(up, base_up)
    np.testing.assert_array_equal(low, base_low)
    # delta(-eps) = 1 - e^-eps + e^-eps delta(eps): the profile of a symmetric trade-off function
    hs = lambda e: pair.tails("add", e)[0] - np.exp(e) * pair.tails("add", e)[1]   # noqa: E731
    np.testing.assert_allclose(hs(-eps), 1 - np.exp(-eps) + np.exp(-eps) * hs(eps), rtol=1e-12, atol=1e-15)
