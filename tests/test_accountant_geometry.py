"""Clipping geometry: the l1 certificate must hold for every split of the difference over
coordinates (brute-force composition of per-coordinate privacy losses), and the l2 refusal for
non-Gaussian noise is justified by splits that beat the one-coordinate analysis."""
import math

import numpy as np
import pytest

from accountant.certify import certify, delta_for_epsilon
from accountant.mechanism import Mechanism
from accountant.noise import LMO, Gaussian, Laplace
from accountant.privacy_loss import RandomizedResponsePair, ShiftPair
from accountant import routes


def product_delta(noise, split, steps, eps, step=1e-4):
    """Exact (pessimistic PLD) delta of T steps of product noise shifted by ``split`` (q = 1):
    the per-coordinate losses are independent, so the mechanism is the composition of scalar
    mechanisms with sensitivities |split_i|."""
    groups = [(ShiftPair(noise, abs(s), 1.0), steps) for s in split if abs(s) > 1e-12]
    return routes.pld_route(groups, 0.5, step).delta_at(eps)


def random_splits(rng, dims, count, norm):
    for _ in range(count):
        d = int(rng.choice(dims))
        w = rng.dirichlet(np.ones(d) * rng.choice([0.3, 1.0, 5.0]))
        yield w * norm * np.where(rng.random(d) < 0.5, -1, 1)


@pytest.mark.parametrize("noise,splits", [(Laplace(2.0), 12), (LMO(0.5, 0.3, 0.2, 2.5, 1.0, 2.0, 0.1, 1.0).scaled(2.0), 4)])
def test_l1_certificate_dominates_every_split(noise, splits):
    rng = np.random.default_rng(11)
    steps, eps = 4, 0.8
    certified = delta_for_epsilon(Mechanism(noise, geometry="l1", steps=steps), eps)
    worst = 0.0
    for split in random_splits(rng, range(2, 9), splits, 1.0):
        worst = max(worst, product_delta(noise, split, steps, eps))
    worst = max(worst, product_delta(noise, [1.0], steps, eps))   # all on one coordinate
    assert worst <= certified + 1e-9
    # the bound is not vacuous: the one-coordinate case is within a factor of it
    assert certified < 20 * max(worst, 1e-12) or certified < 1e-3


def test_l1_certificate_with_subsampling_by_monte_carlo():
    """q < 1 couples the coordinates (one Bernoulli per step), so brute-force by sampling: the
    subsampled product mechanism's delta(eps) = E_A[(1 - e^(eps - L))_+] for splits in 2-8 coords."""
    noise, q, steps, eps = Laplace(1.5), 0.3, 3, 0.6
    certified = delta_for_epsilon(Mechanism(noise, geometry="l1", sampling_rate=q, steps=steps), eps)
    rng = np.random.default_rng(5)
    n = 200_000
    for split in random_splits(rng, range(2, 9), 4, 1.0):
        total = np.zeros(n)
        for _ in range(steps):
            shifted = rng.random(n) < q
            x = noise.sample(n * len(split), rng).reshape(n, len(split)) + np.where(shifted[:, None], split, 0.0)
            ell = np.sum(noise.logpdf(x - split) - noise.logpdf(x), axis=1)
            total += np.log((1 - q) + q * np.exp(ell))
        values = -np.expm1(np.minimum(eps - total, 0.0))
        mc, se = values.mean(), values.std() / math.sqrt(n)
        assert mc - 4 * se <= certified


def test_l1_randomized_response_matches_exact_binomial_route():
    cert = certify(Mechanism(Laplace(3.0), geometry="l1", sampling_rate=0.05, steps=300), 1e-6)
    assert set(cert.routes) == {"pld", "prv", "exact"}
    exact = cert.routes["exact"]["upper"]
    assert cert.routes["pld"]["lower"] <= exact <= cert.routes["pld"]["upper"] + 1e-9
    assert cert.routes["prv"]["lower"] <= exact <= cert.routes["prv"]["upper"]


def test_one_coordinate_analysis_understates_l2_for_laplace():
    """Why non-Gaussian l2 is refused: spreading an l2-unit difference over 8 coordinates costs
    more than the scalar analysis of a unit shift claims."""
    noise, steps, delta = Laplace(1.0), 1, 1e-5
    scalar_eps = certify(Mechanism(noise, steps=steps), delta).epsilon
    split = np.full(8, 1 / math.sqrt(8))
    groups = [(ShiftPair(noise, s, 1.0), steps) for s in split]
    spread_eps = routes.pld_route(groups, delta, 1e-4).upper
    assert spread_eps > scalar_eps * 1.5


def test_gaussian_l2_is_rotation_invariant():
    """For Gaussian noise every split of an l2-unit difference gives the same privacy loss law."""
    noise, steps, eps = Gaussian(2.0), 3, 0.5
    one = product_delta(noise, [1.0], steps, eps)
    rng = np.random.default_rng(2)
    for d in (2, 5, 8):
        v = rng.normal(size=d)
        v /= np.linalg.norm(v)
        assert product_delta(noise, v, steps, eps) == pytest.approx(one, rel=2e-3, abs=1e-9)
    assert delta_for_epsilon(Mechanism(noise, geometry="l2", steps=steps), eps) >= one * (1 - 1e-9)


def test_randomized_response_pair_is_pure_dp():
    pair = RandomizedResponsePair(0.7, 1.0)
    loss, mass = pair.atoms("remove")
    assert np.allclose(sorted(loss), [-0.7, 0.7])
    assert mass.sum() == pytest.approx(1.0)
