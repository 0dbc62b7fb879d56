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
    # reference value (measured with both libraries): Gaussian sigma for eps 0.3, delta 1e-10, q 0.01, T 1000 is 6.0516
    g = FAMILIES["gaussian"]
    scale, _ = fa.calibrate_scale(lambda s: g.binned((), s, 8), 0.3, 1e-10, 0.01, 1000, start=3.0)
    assert abs(scale / 6.0516 - 1) < 2e-3


def test_fast_epsilon_is_monotone_in_scale():
    g = FAMILIES["gengauss"]
    e = [fa.epsilon_for(g.binned((1.7,), s, 8), 1e-10, 0.01, 100) for s in (3.0, 4.0, 6.0)]
    assert e[0] > e[1] > e[2] > 0


# ------------------------------------------------------------------------- search, table and CLI
import json
import os
import subprocess
import sys

from scipy import stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS, DELTA = 1.0, 1e-10


def run_module(*args, timeout=600):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def single_release(tmp_path_factory):
    """One release (q=1, T=1) at eps 1, delta 1e-10: cheap to certify, a tabulated winner."""
    from noise_search import search

    path = tmp_path_factory.mktemp("single") / "table.npz"
    result = search(EPS, DELTA, sampling_rate=1.0, steps=1, out=str(path), parallel=False)
    return result, path


def test_search_result_is_certified_and_beats_the_gaussian(single_release):
    result, path = single_release
    assert result.law == "tabulated"
    assert result.certified_epsilon["final"] <= EPS
    assert set(result.certified_epsilon) >= {"prv", "pld", "final"}
    assert result.certified_epsilon["final"] == max(v for k, v in result.certified_epsilon.items() if k != "final")
    assert result.expected_abs < result.gaussian_expected_abs
    assert result.ratio_to_gaussian == pytest.approx(result.expected_abs / result.gaussian_expected_abs)
    # one pure-DP release: Laplace has E|Z| = 1/eps; the staircase family must do at least as well
    assert result.expected_abs <= 1 / EPS * (1 + 1e-3)


def test_written_table_recertifies_with_the_accountant_cli(single_release):
    _, path = single_release
    proc = run_module("accountant", "epsilon", "--noise", "table", "--table", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["mechanism"]["sampling_rate"] == 1.0 and out["mechanism"]["steps"] == 1
    assert out["delta"] == DELTA
    assert out["epsilon"] <= EPS


def test_table_metadata_reports_the_search(single_release):
    from accountant.noise import from_name
    from noise_search import load_table

    result, path = single_release
    table = load_table(path)
    meta = table.metadata
    assert meta["family"] == result.family and meta["law"] == "tabulated"
    assert meta["eps_target"] == EPS and meta["delta"] == DELTA
    assert meta["certified_epsilon"]["final"] <= EPS
    assert meta["gaussian_sigma"] == pytest.approx(result.gaussian_sigma)
    assert meta["expected_abs"] == pytest.approx(table.noise.expected_abs())
    assert meta["ratio_to_gaussian"] == pytest.approx(result.ratio_to_gaussian)
    # the LMO family's optimum is reported with all its parameters, and they describe a real LMO law
    lmo = [c for c in meta["search_candidates"] if c["family"] == "lmo"]
    assert len(lmo) == 1
    params = lmo[0]["params"]
    assert set(params) == {"a1", "a3", "a4", "k", "theta", "lam", "ua", "ub"}
    law = from_name("lmo", **params)
    assert lmo[0]["ranking_objective"] == pytest.approx(law.expected_abs(), rel=5e-3)


def test_sampling_matches_the_table_cdf_and_tails(single_release):
    from accountant.randomness import make_rng
    from noise_search import load_table

    table = load_table(single_release[1])
    n = 400_000
    x = table.sample(n, make_rng(12345))
    assert x.dtype == np.float64
    assert stats.kstest(x, table.cdf).pvalue > 1e-4
    # tail frequencies beyond several quantiles: P(|Z| > t) = 2 sf(t)
    for p in (1e-1, 1e-2, 1e-3, 1e-4):
        t = float(table.noise.isf(p))
        expected = 2 * p * n
        count = int(np.sum(np.abs(x) > t))
        assert abs(count - expected) <= 5 * math.sqrt(expected) + 1, (p, count, expected)
    # the secure generator draws the same law
    y = table.sample(50_000, make_rng(secure=True))
    assert stats.kstest(y, table.cdf).pvalue > 1e-4


def test_tampered_table_is_refused(single_release, tmp_path):
    from accountant.table import TableError
    from noise_search import load_table

    _, path = single_release
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    # 1) move probability between two bins (still on the lattice, still summing to one)
    mass = arrays["mass"].copy()
    mid = len(mass) // 2
    mass[mid] += 2.0 ** -53
    mass[mid - 1] -= 2.0 ** -53
    bad = tmp_path / "mass.npz"
    np.savez(bad, **{**arrays, "mass": mass})
    with pytest.raises(TableError, match="checksum"):
        load_table(bad)
    # 2) claim a smaller certified epsilon in the metadata
    meta = json.loads(str(arrays["metadata"]))
    meta["certified_epsilon"]["final"] = 0.01
    bad = tmp_path / "meta.npz"
    np.savez(bad, **{**arrays, "metadata": np.array(json.dumps(meta))})
    with pytest.raises(TableError, match="checksum"):
        load_table(bad)
    # the untouched copy still loads
    good = tmp_path / "good.npz"
    np.savez(good, **arrays)
    assert load_table(good).certified_epsilon <= EPS


def test_cli_infeasible_and_absurd_targets_exit_2_without_a_table(tmp_path):
    out = tmp_path / "t.npz"
    for args in (["--eps", "1e-6", "--delta", "1e-10", "--sampling-rate", "1", "--steps", "1"],
                 ["--eps", "0.3", "--delta", "1"],
                 ["--eps", "-1", "--delta", "1e-10"],
                 ["--eps", "0.3", "--delta", "1e-10", "--family", "nonsense"]):
        proc = run_module("noise_search", *args, "--out", str(out), "--quiet")
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "infeasible" in run_module("noise_search", "--eps", "1e-6", "--delta", "1e-10", "--sampling-rate",
                                      "1", "--steps", "1", "--out", str(out)).stderr
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_leaves_no_partial_table(tmp_path, monkeypatch):
    import accountant.table
    from noise_search import search

    real = accountant.table.write_certified_table

    def interrupted(path, *args, **kwargs):
        real(path, *args, **kwargs)     # the temporary file exists ...
        raise KeyboardInterrupt         # ... and the user presses Ctrl-C before the rename

    monkeypatch.setattr(accountant.table, "write_certified_table", interrupted)
    with pytest.raises(KeyboardInterrupt):
        search(EPS, DELTA, sampling_rate=1.0, steps=1, geometry="l2", out=str(tmp_path / "t.npz"),
               parallel=False)
    assert list(tmp_path.iterdir()) == []


def test_l2_geometry_returns_the_calibrated_gaussian(tmp_path):
    from noise_search import load_table, search

    result = search(EPS, DELTA, sampling_rate=1.0, steps=1, geometry="l2", out=str(tmp_path / "g.npz"),
                    parallel=False)
    assert result.law == "gaussian" and result.family == "gaussian"
    assert result.ratio_to_gaussian == 1.0
    assert any("l2" in note for note in result.notes)
    table = load_table(tmp_path / "g.npz")
    assert table.metadata["law"] == "gaussian" and table.geometry == "l2"
    assert table.metadata["params"]["sigma"] == pytest.approx(result.gaussian_sigma)
    assert table.certified_epsilon <= EPS


def test_never_worse_than_gaussian(tmp_path):
    """Under composition Laplace noise loses to the Gaussian (docs/soundness.md section 4): restricted to Laplace,
    the search must answer with the Gaussian."""
    from noise_search import search

    result = search(1.0, 1e-6, sampling_rate=0.05, steps=200, families=["laplace"], parallel=False,
                    out=str(tmp_path / "t.npz"))
    lap = [c for c in result.candidates if c.family == "laplace"][0]
    assert lap.ranking_objective > result.gaussian_expected_abs
    assert result.family == "gaussian" and result.law == "gaussian"
    assert result.ratio_to_gaussian == 1.0
    assert result.certified_epsilon["final"] <= 1.0


def test_cli_json(tmp_path):
    out = tmp_path / "t.npz"
    proc = run_module("noise_search", "--eps", "2", "--delta", "1e-8", "--sampling-rate", "1", "--steps", "1",
                      "--geometry", "l2", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["family"] == "gaussian" and res["certified_epsilon"]["final"] <= 2
    assert res["path"] == str(out) and out.is_file()
    assert res["sampling_rate"] == 1.0 and res["steps"] == 1


def test_plot_is_a_png(single_release, tmp_path):
    from noise_search.__main__ import plot, summary

    result, path = single_release
    png = tmp_path / "t.png"
    plot(result, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = summary(result)
    for key in ("family", "E|Z|", "ratio to Gaussian", "certified epsilon", "file written", str(path)):
        assert key in text


@pytest.mark.slow
def test_default_target_beats_gaussian_by_the_issue_margin(tmp_path):
    """eps 0.3, delta 1e-10, q 0.01, T 1000: E|Z| <= 0.989 x the calibrated Gaussian."""
    from noise_search import search

    result = search(0.3, 1e-10, out=str(tmp_path / "t.npz"))
    assert result.certified_epsilon["final"] <= 0.3
    assert result.ratio_to_gaussian <= 0.989


def test_l1_geometry_searches_only_lipschitz_laws(tmp_path):
    from noise_search import load_table, search

    result = search(EPS, DELTA, sampling_rate=1.0, steps=1, geometry="l1", out=str(tmp_path / "t.npz"),
                    parallel=False)
    assert result.law in ("laplace", "lmo", "gaussian") and result.law == result.family
    assert {c.family for c in result.candidates} == {"laplace", "lmo", "gaussian"}
    assert result.certified_epsilon["final"] <= EPS
    assert result.ratio_to_gaussian <= 1.0
    table = load_table(tmp_path / "t.npz")
    assert table.metadata["law"] == result.law and table.geometry == "l1"
    lmo = [c for c in result.candidates if c.family == "lmo"][0]
    assert set(lmo.params) == {"a1", "a3", "a4", "k", "theta", "lam", "ua", "ub"}


def test_calibrated_gaussian_agrees_with_the_accountant_calibration():
    """The search's cheaper Gaussian calibration (PLD-guided, one full certificate) finds the same sigma
    as ``accountant.certify.calibrate``: the reported ratio is against the honestly calibrated Gaussian."""
    from accountant.certify import calibrate
    from accountant.noise import Gaussian
    from noise_search.search import calibrated_gaussian

    eps, delta = 0.5, 1e-9
    reference, _ = calibrate(Gaussian, eps, delta, 1.0, 1)
    sigma, cert = calibrated_gaussian(eps, delta, 1.0, 1, "scalar", start=reference * 1.01)
    assert cert.epsilon <= eps
    assert abs(sigma / reference - 1) < 3e-4, (sigma, reference)


def test_spline_family_contains_the_gaussian_and_is_smooth_at_zero():
    from noise_search.families import SPLINE_KNOTS, _logp_spline, _spline_slopes, spline_from_gengauss

    t = np.linspace(0, 6, 61)
    phi = -_logp_spline(t, 1.0, SPLINE_KNOTS, _spline_slopes(spline_from_gengauss(2.0)))
    inside = t <= SPLINE_KNOTS[-1]
    assert np.allclose(phi[inside], t[inside] ** 2, atol=1e-12)          # exactly t^2 up to the last knot
    assert np.allclose(np.diff(phi[~inside]), 8.0 * 0.1, atol=1e-12)     # then the tangent exponential
    # a generalised Gaussian's slope beta t^(beta-1) is interpolated at the knots, linear in between
    beta, h = 1.7, 1e-6
    knots = SPLINE_KNOTS[1:-1]
    slope = (_logp_spline(knots - h, 1.0, SPLINE_KNOTS, _spline_slopes(spline_from_gengauss(beta)))
             - _logp_spline(knots + h, 1.0, SPLINE_KNOTS, _spline_slopes(spline_from_gengauss(beta)))) / (2 * h)
    assert np.allclose(slope, beta * knots ** (beta - 1), rtol=1e-6)


def test_merging_equal_cells_keeps_the_law():
    from accountant.noise import Tabulated
    from noise_search.search import merge_equal_bins

    b = FAMILIES["staircase"].binned((0.5, 0.0), 1 / 0.5, 32)
    edges, mass, tm, tr = b.table_arrays()
    merged = merge_equal_bins(edges, mass, tm, tr)
    assert len(merged[1]) < len(mass) / 10                    # two cells per unit instead of 32
    assert merged[2:] == (tm, tr)                              # the tails are untouched

    def cdf(e, m, x):
        """P(Z <= x) of the core, from the arrays (piecewise-linear between cumulative masses)."""
        return np.interp(x, e, np.concatenate([[0.0], np.cumsum(m)]))

    x = np.linspace(-edges[-1] - 3, edges[-1] + 3, 2001)
    assert np.allclose(cdf(edges, mass, x), cdf(merged[0], merged[1], x), rtol=1e-12, atol=1e-15)
    # the arrays become a table only through quantisation, which settles exact density ties (a float
    # normalisation can leave the tail one ulp above the last bin, which the loader rightly refuses)
    small = Tabulated.quantised(*merged)
    assert len(small.mass) == len(merged[1]) and small.tail_rate == tr


def test_fast_ranking_is_reproducible_for_a_seed():
    from noise_search.search import rank_families

    runs = [rank_families(["gengauss", "staircase"], 1.0, 1e-8, 1.0, 1, 32, "abs", 2.0, seed=7) for _ in range(2)]
    assert [(c.family, c.shape, c.scale) for c in runs[0]] == [(c.family, c.shape, c.scale) for c in runs[1]]


def test_variance_objective(tmp_path):
    from noise_search import search

    result = search(EPS, DELTA, sampling_rate=1.0, steps=1, families=["gaussian", "laplace"], objective="var",
                    parallel=False, out=str(tmp_path / "v.npz"))
    assert result.objective == "var" and result.family == "laplace"
    assert result.ratio_to_gaussian == pytest.approx(result.variance / result.gaussian_sigma ** 2)
    assert result.variance == pytest.approx(2 / EPS ** 2, rel=5e-3)     # Laplace b = 1/eps, variance 2 b^2
