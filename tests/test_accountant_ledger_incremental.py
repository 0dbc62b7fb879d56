"""Epsilon after every step (accountant.ledger.IncrementalEpsilon): a valid upper bound, exact at its
checkpoints, at O(1) amortised certificates."""
import math

import pytest

from accountant.certify import gaussian_epsilon
from accountant.ledger import IncrementalEpsilon, PrivacyLedger
from accountant.mechanism import Mechanism
from accountant.noise import Gaussian

SIGMA, DELTA = 4.0, 1e-5


def _closed_form(steps: int) -> float:
    """T Gaussian releases without subsampling compose to one Gaussian with mu = sqrt(T) / sigma
    (Dong, Roth & Su 2022, Cor. 3.3); its epsilon is exact (Balle & Wang 2018)."""
    return gaussian_epsilon(math.sqrt(steps) / SIGMA, DELTA)


def test_bound_holds_after_every_step_and_is_exact_at_the_checkpoints():
    ledger = PrivacyLedger(DELTA)
    inc = IncrementalEpsilon(ledger, growth=2.0, horizon=50)
    mech = Mechanism(Gaussian(SIGMA))
    seen = []
    for t in range(1, 51):
        ledger.record(mech)
        bound = inc.epsilon()
        c = inc.checkpoint(t)
        assert c >= t and (c == 50 or c & (c - 1) == 0)        # powers of two, then the horizon
        assert bound >= _closed_form(t) * (1 - 1e-6)           # never below the exact epsilon
        assert bound == pytest.approx(_closed_form(c), rel=1e-3)
        seen.append(bound)
    assert seen == sorted(seen)
    assert inc.checkpoint(40) == 50 and seen[-1] == pytest.approx(_closed_form(50), rel=1e-3)
    # 1, 2, 4, 8, 16, 32 and the horizon 50: 7 certificates for 50 steps
    assert inc.certificates == 7


def test_certificates_grow_logarithmically():
    inc = IncrementalEpsilon(PrivacyLedger(DELTA))
    points = {inc.checkpoint(t) for t in range(1, 10 ** 5 + 1)}
    assert len(points) <= math.log(10 ** 5) / math.log(2 ** 0.25) + 10
    assert all(inc.checkpoint(t) <= max(t + 1, 1.19 * t + 1) for t in (1, 10, 1000, 99_999))


def test_a_prefix_is_kept_and_a_new_mechanism_restarts_the_checkpoints():
    ledger = PrivacyLedger(DELTA)
    ledger.record(Mechanism(Gaussian(SIGMA)), 3)
    ledger.record(Mechanism(Gaussian(SIGMA / 2)), 5)
    # 3 steps at sigma and 5 at sigma/2: mu^2 = 3/sigma^2 + 5 * 4/sigma^2; checkpoint of 5 is 8
    bound = IncrementalEpsilon(ledger, growth=2.0).epsilon()
    exact = gaussian_epsilon(math.sqrt(3 + 5 * 4) / SIGMA, DELTA)
    assert bound >= exact * (1 - 1e-6)
    assert bound == pytest.approx(gaussian_epsilon(math.sqrt(3 + 8 * 4) / SIGMA, DELTA), rel=1e-3)
    assert ledger.epsilon_bound() == pytest.approx(exact, rel=1e-3)     # 2^(1/4) growth: 5 is a checkpoint
    assert ledger.epsilon() == pytest.approx(exact, rel=1e-3)


def test_growth_must_exceed_one():
    with pytest.raises(ValueError):
        IncrementalEpsilon(PrivacyLedger(DELTA), growth=1.0)
