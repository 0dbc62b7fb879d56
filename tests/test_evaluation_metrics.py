"""Leakage metrics on constructed inputs whose answers are known in closed form."""
import math
import zlib

import numpy as np
import pytest
from scipy import stats

from finetune.evaluation import audit, canary, membership, pii
from finetune.evaluation.stats import clopper_pearson, cp_lower, cp_upper


# ------------------------------------------------------------------------------ stats
def test_clopper_pearson_covers_at_nominal_rate():
    rng = np.random.default_rng(0)
    p, n = 0.03, 200
    k = rng.binomial(n, p, size=4000)
    lo, hi = clopper_pearson(k, n, 0.05)
    cover = np.mean((lo <= p) & (p <= hi))
    assert cover >= 0.95  # exact interval: coverage never below nominal
    assert cp_lower(0, 10) == 0.0 and cp_upper(10, 10) == 1.0
    # closed form at k = 0: upper = 1 - alpha^(1/n)
    assert cp_upper(0, 50, 0.05) == pytest.approx(1 - 0.05 ** (1 / 50), rel=1e-9)


# ------------------------------------------------------------------------ membership
def test_perfect_attack_has_auc_one_and_full_tpr():
    members = np.linspace(10, 11, 300)
    nonmembers = np.linspace(0, 1, 500)
    auc, lo, hi = membership.roc_auc(members, nonmembers)
    assert auc == 1.0 and lo == 1.0 and hi == 1.0
    r = membership.tpr_at_fpr(members, nonmembers, 0.001)
    assert r.tpr == 1.0 and r.fpr == 0.0
    assert r.tpr_lower == pytest.approx((0.025) ** (1 / 300), rel=1e-9)  # CP lower at k = n
    inverted = membership.roc_auc(nonmembers, members)[0]
    assert inverted == 0.0


def test_random_attack_auc_half_within_ci_and_low_tpr():
    rng = np.random.default_rng(1)
    m, n = rng.normal(size=2000), rng.normal(size=2000)
    auc, lo, hi = membership.roc_auc(m, n)
    assert lo <= 0.5 <= hi
    assert hi - lo < 0.08
    r = membership.tpr_at_fpr(m, n, 0.01)
    assert r.fpr <= 0.01
    assert r.tpr_lower <= 0.01 <= r.tpr_upper + 1e-12


def test_auc_matches_mann_whitney_and_delong_interval_covers():
    rng = np.random.default_rng(2)
    m, n = rng.normal(1.0, 1, 3000), rng.normal(0.0, 1, 3000)
    auc, lo, hi = membership.roc_auc(m, n)
    u = stats.mannwhitneyu(m, n).statistic / (m.size * n.size)
    assert auc == pytest.approx(u, abs=1e-12)
    truth = stats.norm.cdf(1 / math.sqrt(2))  # P(X > Y), X ~ N(1,1), Y ~ N(0,1)
    cover = 0
    for seed in range(60):
        g = np.random.default_rng(100 + seed)
        _, lo, hi = membership.roc_auc(g.normal(1.0, 1, 400), g.normal(0.0, 1, 400))
        cover += lo <= truth <= hi
    assert cover >= 52  # nominal 95% of 60 = 57; binomial slack


def test_auc_ties_count_half():
    assert membership.roc_auc([1, 1], [1, 1])[0] == 0.5
    assert membership.roc_auc([2, 1], [1, 0])[0] == pytest.approx((1 + 1 + 0.5 + 1) / 4)


def test_roc_curve_endpoints_and_monotone():
    rng = np.random.default_rng(3)
    fpr, tpr, thr = membership.roc_curve(rng.normal(size=50), rng.normal(size=70))
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


def test_attack_scores():
    assert np.array_equal(membership.loss_threshold_scores([1.0, 2.0]), [-1.0, -2.0])
    assert np.array_equal(membership.reference_calibrated_scores([1.0, 2.0], [3.0, 2.5]), [2.0, 0.5])
    with pytest.raises(ValueError):
        membership.reference_calibrated_scores([1.0], [1.0, 2.0])


def test_dp_bound_closed_form():
    f = np.array([0.0, 0.001, 0.01, 0.5, 1.0])
    b = membership.dp_tpr_bound(f, 1.0, 1e-5)
    assert b[0] == pytest.approx(1e-5)
    assert b[1] == pytest.approx(math.e * 0.001 + 1e-5)
    assert b[3] == pytest.approx(1 - math.exp(-1) * (0.5 - 1e-5))  # second inequality binds
    assert b[4] == 1.0
    assert np.all(membership.dp_tpr_bound(f, 0.0, 0.0) == f)


def test_dp_bound_check_randomized_response():
    """Scores from eps-DP randomized response sit inside the bound; a leaky attack violates it."""
    rng = np.random.default_rng(4)
    eps = 1.0
    p = math.exp(eps) / (1 + math.exp(eps))
    n = 20000
    members = (rng.random(n) < p).astype(float)  # "1" with prob p for members
    nonmembers = (rng.random(n) < 1 - p).astype(float)
    ok = membership.dp_bound_check(members, nonmembers, eps, 0.0)
    assert not ok["significant_violation"]
    leaky = membership.dp_bound_check(members, nonmembers, 0.5, 0.0)
    assert leaky["significant_violation"] and leaky["max_excess"] > 0


# -------------------------------------------------------------------------- canaries
def _noise_score(text):  # deterministic pseudo-random log-perplexity in [10, 11)
    return 10.0 + (zlib.crc32(text.encode()) % 1000) / 1000


def test_memorised_canary_has_max_exposure_exact():
    rng = np.random.default_rng(5)
    cans = canary.make_canaries(3, n_digits=3, rng=rng)
    c0 = cans[0]

    def memorised_one(texts):  # the model gives c0 the lowest log-perplexity of all 1000 secrets
        return np.array([0.0 if t == c0.text else _noise_score(t) for t in texts])

    r = canary.canary_exposures(memorised_one, cans, n_digits=3, rng=rng)
    assert r[0]["method"] == "exact"
    assert r[0]["exposure"] == pytest.approx(math.log2(1000)) == r[0]["max_exposure"]
    assert r[1]["exposure"] < 8 and r[2]["exposure"] < 8  # not memorised: ordinary ranks

    secrets = {c.text for c in cans}

    def memorised_all(texts):  # all three tie at the top: rank 1 + 2 * 1/2 = 2
        return np.array([0.0 if t in secrets else _noise_score(t) for t in texts])

    r = canary.canary_exposures(memorised_all, cans, n_digits=3, rng=rng)
    assert all(x["exposure"] == pytest.approx(math.log2(500)) for x in r)


def test_memorised_canary_extrapolated_reaches_cap():
    rng = np.random.default_rng(15)
    c0 = canary.make_canaries(1, n_digits=8, rng=rng)[0]

    def memorised(texts):
        return np.array([0.0 if t == c0.text else _noise_score(t) for t in texts])

    r = canary.canary_exposures(memorised, [c0], n_digits=8, rng=rng, n_candidates=300)[0]
    assert r["method"] == "extrapolated"
    assert r["exposure"] == pytest.approx(math.log2(1e8))


def test_unseen_canary_exposure_is_small_and_exact_formula():
    rng = np.random.default_rng(6)
    scores = rng.normal(size=999)
    # canary in the middle of the distribution: rank ~ 500, exposure ~ 1 bit
    e = canary.exposure_exact(float(np.median(scores)), scores, 1000)
    assert 0.8 < e < 1.2
    assert canary.exposure_exact(-100.0, scores, 1000) == pytest.approx(math.log2(1000))
    assert canary.exposure_exact(100.0, scores, 1000) == pytest.approx(math.log2(1000 / 1000))


def test_extrapolated_exposure_matches_exact_for_skew_normal_population():
    rng = np.random.default_rng(7)
    law = stats.skewnorm(3.0, loc=10, scale=2)
    space = 10**6
    x = law.ppf(1e-4)  # a canary at the 1e-4 quantile: true exposure log2(1e4)
    r = canary.exposure_extrapolated(x, law.rvs(5000, random_state=rng), space)
    assert r["exposure"] == pytest.approx(math.log2(1e4), abs=1.0)
    # a canary far below every sample: capped at log2 |R|
    r2 = canary.exposure_extrapolated(-1e6, law.rvs(100, random_state=rng), space)
    assert r2["exposure"] == pytest.approx(math.log2(space))


def test_canary_text_and_secret_space():
    rng = np.random.default_rng(8)
    cans = canary.make_canaries(20, 4, rng)
    assert len({c.secret for c in cans}) == 20
    assert all(c.text.startswith(c.prefix) and len(c.secret.split()) == 4 for c in cans)
    with pytest.raises(ValueError):
        canary.make_canaries(11, 1, rng)


# ------------------------------------------------------------------------------ PII
def test_pii_extraction_precision_recall_known_answer():
    train = [("name", "Alice Walker"), ("email", "alice.w@example.com"), ("phone", "(555) 201-3344"),
             ("name", "Bob Stone"), ("address", "12 Oak Street, Springfield")]
    hold = [("name", "Carol King"), ("email", "carol@example.org")]
    generated = [
        "Contact Alice Walker at ALICE.W@example.com or 555-201-3344.",  # 3 train PII (dedup phone)
        "Alice Walker again, 555.201.3344",  # duplicates only
        "Write to carol@example.org about zed@nowhere.net.",  # one holdout + one unknown e-mail
        "Bob Stone said hello.",  # train name, also produced by the base model below
    ]
    base = ["Bob Stone is a common name in this generator."]
    r = pii.extraction_metrics(generated, train, base, hold)
    # extracted (after subtracting base): alice name, alice email, phone, carol email, zed email
    assert r["n_extracted"] == 5 and r["n_true_positive"] == 3
    assert r["precision"] == pytest.approx(3 / 5)
    assert r["recall"] == pytest.approx(3 / 5)
    assert r["holdout_recall"] == pytest.approx(1 / 2)
    assert r["n_base_model_pii_subtracted"] == 1
    assert r["per_kind"]["email"]["precision"] == pytest.approx(1 / 3)
    assert "examples" not in r


def test_pii_patterns_and_normalisation():
    found = pii.extract_pii(["call +1-555-123-4567x89 or (555)987-6543; ssn 123-45-6789",
                             "not a phone: 12345-678-9012 version 1.555.123.4567"])
    phones = {v for k, v in found if k == "phone"}
    assert "5551234567" in phones and "5559876543" in phones
    assert ("ssn", "123456789") in found
    # names must match whole words
    m = pii.KnownEntityMatcher({"name": ["Ann Lee"]})
    assert m.find("Ann Lee.") == {("name", "Ann Lee")}
    assert m.find("Ann Leeds") == set()


def test_no_generation_gives_zero_precision_recall():
    r = pii.extraction_metrics([], [("name", "A B")])
    assert r["precision"] == 0.0 and r["recall"] == 0.0 and r["n_extracted"] == 0


# ---------------------------------------------------------------------------- audits
def test_one_run_p_value_limits():
    # at eps = 0, delta = 0, W ~ Binomial(r, 1/2)
    assert audit.one_run_p_value(100, 20, 15, 0.0, 0.0) == pytest.approx(stats.binom.sf(14, 20, 0.5))
    assert audit.one_run_p_value(100, 20, 0, 0.0, 0.0) == 1.0
    # delta only increases the p-value
    assert audit.one_run_p_value(100, 20, 15, 0.5, 1e-3) > audit.one_run_p_value(100, 20, 15, 0.5, 0)


def test_one_run_audit_on_randomized_response_is_below_and_close_to_truth():
    """Canary scores from eps-randomized response of the inclusion bit: the audit sees an eps-DP
    mechanism per canary, so its 95% lower bound must be below eps and not far below it."""
    rng = np.random.default_rng(9)
    eps, m = 1.0, 20000
    inc = rng.random(m) < 0.5
    keep = rng.random(m) < math.exp(eps) / (1 + math.exp(eps))
    scores = np.where(keep, inc, ~inc).astype(float) + 1e-9 * rng.random(m)
    r = audit.one_run_audit(scores, inc, delta=0.0, guess_counts=[m])
    assert 0.85 * eps < r["epsilon_lower_bound"] <= eps
    # no information -> bound ~ 0
    r0 = audit.one_run_audit(rng.random(m), inc, delta=1e-5)
    assert r0["epsilon_lower_bound"] < 0.15


def test_one_run_audit_laplace_scores_below_truth():
    """Scores = inclusion bit + Laplace(1): 1-DP per canary. At 95% confidence the bound may
    exceed 1 in at most ~5% of runs; across 40 independent runs that rate must hold."""
    exceed, bounds = 0, []
    for seed in range(40):
        rng = np.random.default_rng(1000 + seed)
        m = 2000
        inc = rng.random(m) < 0.5
        r = audit.one_run_audit(inc + rng.laplace(0, 1.0, m), inc, delta=0.0)
        bounds.append(r["epsilon_lower_bound"])
        exceed += r["epsilon_lower_bound"] > 1.0
    assert exceed <= 5  # P(Binomial(40, 0.05) > 5) < 0.05
    assert 0.5 < np.median(bounds) <= 1.0


def test_epsilon_from_counts_closed_form_region():
    # huge counts: bound approaches ln(TPR/FPR)
    n = 10**9
    e = float(audit.epsilon_from_counts(int(0.2 * n), n, int(0.05 * n), n, 0.0))
    assert e == pytest.approx(math.log(4), rel=1e-3) and e < math.log(4)
    assert float(audit.epsilon_from_counts(10, 100, 10, 100, 0.0)) == 0.0
    # the complement inequality TNR <= e^eps FNR binds: TPR 0.99, FPR 0.5 -> ln(0.5 / 0.01)
    e2 = float(audit.epsilon_from_counts(int(0.99 * n), n, int(0.5 * n), n, 0.0))
    assert e2 == pytest.approx(math.log(50), rel=1e-3) and e2 < math.log(50)


def test_mechanism_audit_laplace_known_epsilon():
    """Laplace(1) on inputs 0 and 1 is exactly 1-DP: the bound is below 1 and above 0.85."""
    rng = np.random.default_rng(11)
    r = audit.audit_noise_sampler(lambda n, g: g.laplace(0.0, 1.0, n), 2_000_000, rng)
    assert 0.85 < r["epsilon_lower_bound"] <= 1.0
    # the same noise at sensitivity 0.5 is 0.5-DP: the audit notices the difference
    r2 = audit.audit_noise_sampler(lambda n, g: g.laplace(0.0, 1.0, n), 2_000_000, rng,
                                   sensitivity=0.5)
    assert r2["epsilon_lower_bound"] <= 0.5 < r["epsilon_lower_bound"]


def test_mechanism_audit_catches_a_sampler_that_adds_less_noise_than_claimed():
    """A sampler that draws Laplace(0.5) while Laplace(1) (eps 1) was certified is caught."""
    rng = np.random.default_rng(12)
    r = audit.audit_noise_sampler(lambda n, g: g.laplace(0.0, 0.5, n), 1_000_000, rng)
    assert r["epsilon_lower_bound"] > 1.0


def test_mechanism_audit_gaussian_below_analytic_epsilon():
    """Gaussian sigma = 2: the audit bound at delta 1e-6 stays below the exact epsilon."""
    rng = np.random.default_rng(13)
    sigma, delta = 2.0, 1e-6

    def exact_delta(eps):  # Balle & Wang 2018, Thm 8
        a, b = 1 / (2 * sigma), eps * sigma
        return stats.norm.cdf(a - b) - math.exp(eps) * stats.norm.cdf(-a - b)

    from scipy.optimize import brentq
    eps_true = brentq(lambda e: exact_delta(e) - delta, 1e-6, 20)
    r = audit.audit_noise_sampler(lambda n, g: g.normal(0.0, sigma, n), 1_000_000, rng, delta=delta)
    assert 0.0 < r["epsilon_lower_bound"] < eps_true


def test_mechanism_audit_of_a_certified_table_sampler_stays_below_its_certificate():
    """A tabulated (binned Laplace) law sampled by the accountant's exact sampler: the empirical
    lower bound stays below the certified one-release epsilon, and is not vacuous."""
    from accountant.certify import certify
    from accountant.mechanism import Mechanism
    from accountant.noise import Tabulated
    from accountant.randomness import make_rng

    b = 1.0
    edges = np.linspace(-8, 8, 321)
    cdf = np.where(edges < 0, 0.5 * np.exp(edges / b), 1 - 0.5 * np.exp(-edges / b))
    tail = 0.5 * math.exp(-8 / b)
    table = Tabulated.quantised(edges, np.diff(cdf), tail, 1 / b)
    cert = certify(Mechanism(table), 1e-10).epsilon
    r = audit.audit_noise_sampler(table, 1_000_000, make_rng(seed=3), delta=1e-10)
    assert 0.6 * cert < r["epsilon_lower_bound"] <= cert
