"""Tests of the noise search: families, the fast ranking accountant, the search and its CLI."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special

from noise_search import fast_accountant as fa
from noise_search.families import FAMILIES, lmo_params


def gaussian_delta(sigma: float, eps: float) -> float:
    """Exact delta(eps) of one Gaussian release with sensitivity 1 (Balle & Wang 2018, Thm. 8)."""
    return float(special.ndtr(-eps * sigma + 0.5 / sigma) - math.exp(eps) * special.ndtr(-eps * sigma - 0.5 / sigma))


# ----------------------------------------------------------------------------------------- families
@pytest.mark.parametrize("name,shape,scale", [
    ("gaussian", (), 3.0), ("laplace", (), 2.0), ("gengauss", (1.6,), 4.0), ("gengauss", (0.8,), 1.5),
    ("lmo", (0.3, -1.0, math.log(3.0), 0.4), 2.0)])
def test_binned_law_matches_the_parametric_law(name, shape, scale):
    fam = FAMILIES[name]
    binned = fam.binned(shape, scale, 16)
    law = fam.parametric(shape, scale)
    total = 2 * (math.fsum(binned.mass) + binned.tail_mass)
    assert abs(total - 1) < 1e-12
    assert np.all(np.diff(binned.mass) <= 0), "binned density must be non-increasing in |x|"
    assert binned.tail_mass * binned.tail_rate <= binned.mass[-1] * binned.n * (1 + 1e-12)
    # bin masses against the law's own CDF (its docstring cites the closed forms)
    edges = np.arange(len(binned.mass) + 1) / binned.n
    exact = law.sf(edges[:-1]) - law.sf(edges[1:])
    big = exact > 1e-6
    assert np.allclose(binned.mass[big], exact[big], rtol=2e-3)
    assert abs(binned.expected_abs() / law.expected_abs() - 1) < 2e-3
    assert abs(binned.variance() / law.variance() - 1) < 5e-3


def test_lmo_kernel_matches_accountant_density():
    from accountant.noise import LMO

    shape = (0.5, -0.7, math.log(2.5), 0.6)
    p = lmo_params(shape, 1.7)
    law = LMO(**p)
    x = np.linspace(0, 60, 301)
    mine = FAMILIES["lmo"].logp(shape, 1.7)(x)
    assert np.allclose(mine, law.logpdf(x), rtol=1e-10, atol=1e-10)
    # E[u] = 1/scale by construction of the parametrisation
    assert abs(law.moment_u(1) * 1.7 - 1) < 1e-12


def test_staircase_is_pure_dp_for_one_release():
    fam = FAMILIES["staircase"]
    eps0 = 0.3
    b = fam.binned((0.45, 0.0), 1 / eps0, 32)
    # masses one sensitivity apart have ratio exactly e^-eps0 (periodic structure)
    ratio = b.mass[32:1000] / b.mass[:968]
    assert np.allclose(ratio, math.exp(-eps0), rtol=1e-9)
    assert fa.delta_for(b, eps0 * (1 + 1e-6), 1.0, 1) < 1e-12      # only the tail representation leaks
    assert fa.delta_for(b, eps0 * 0.99, 1.0, 1) > 1e-4


# -------------------------------------------------------------------------------- fast accountant
@pytest.mark.parametrize("sigma,eps", [(18.731, 0.3), (2.0, 1.0), (5.0, 0.2)])
def test_fast_single_release_against_exact_gaussian(sigma, eps):
    b = FAMILIES["gaussian"].binned((), sigma, 16)
    exact = gaussian_delta(sigma, eps)
    got = fa.delta_for(b, eps, 1.0, 1)
    # binning is post-processing for a shift of whole bins: never above the continuous law, and close
    assert got <= exact * (1 + 1e-9) + 1e-15
    assert got >= exact * 0.97


def test_fast_composition_against_dp_accounting():
    from dp_accounting.pld import privacy_loss_distribution as pldlib

    sigma, q, T, eps = 2.0, 0.05, 200, 1.0
    pld = pldlib.from_gaussian_mechanism(sigma, sampling_prob=q, value_discretization_interval=1e-4,
                                         use_connect_dots=True)
    reference = pld.self_compose(T).get_delta_for_epsilon(eps)
    got = fa.delta_for(FAMILIES["gaussian"].binned((), sigma, 32), eps, q, T)
    assert abs(got / reference - 1) < 0.03, (got, reference)


def test_fast_calibration_reproduces_reference_sigma():
    # REFERENCE.md: Gaussian sigma for eps 0.3, delta 1e-10, q 0.01, T 1000 is 6.0516
    g = FAMILIES["gaussian"]
    scale, _ = fa.calibrate_scale(lambda s: g.binned((), s, 8), 0.3, 1e-10, 0.01, 1000, start=3.0)
    assert abs(scale / 6.0516 - 1) < 2e-3


def test_fast_epsilon_is_monotone_in_scale():
    g = FAMILIES["gengauss"]
    e = [fa.epsilon_for(g.binned((1.7,), s, 8), 1e-10, 0.01, 100) for s in (3.0, 4.0, 6.0)]
    assert e[0] > e[1] > e[2] > 0
