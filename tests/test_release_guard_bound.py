"""The engine's per-step epsilon (ReleaseGuard.epsilon_bound): never below the certificate of the
steps taken, and, once the background certificates of accountant.ledger.IncrementalEpsilon's
checkpoints are ready, well below the planned run's certificate early in a long run."""
import math

import pytest

from accountant.certify import certify, gaussian_epsilon
from accountant.mechanism import Mechanism
from accountant.noise import Gaussian
from accountant.shuffle import check_sampling
from finetune.dp.release_guard import ReleaseGuard

DELTA, STEPS = 1e-5, 2000


def _guard(release: Mechanism) -> ReleaseGuard:
    ceiling = certify(release.with_steps(STEPS), DELTA).epsilon
    return ReleaseGuard(release, sampling="poisson", relation=check_sampling("poisson"), steps=STEPS,
                        steps_in_epoch=None, delta=DELTA, budget=ceiling, expected_batch_size=1.0)


@pytest.mark.parametrize("sigma, q", [(30.0, 1.0), (1.0, 0.01)])
def test_bound_covers_the_steps_taken_and_drops_below_the_ceiling(sigma, q):
    release = Mechanism(Gaussian(sigma), 1.0, "l2", q, 1)
    guard = _guard(release)
    ceiling = guard.epsilon_at_limit
    assert guard.epsilon_bound() == 0.0
    try:
        for t in (1, 7, 40, 300):
            while guard.steps_taken < t:
                guard.record_step()
            first = guard.epsilon_bound()            # at once: the ceiling or an earlier checkpoint
            assert guard._bound.wait_idle(120) and guard._bound.error is None
            bound = guard.epsilon_bound()
            exact = certify(release.with_steps(t), DELTA).epsilon
            assert min(first, bound) >= exact * (1 - 1e-9) and first <= ceiling
            c = guard._bound.incremental.checkpoint(t)
            assert t <= c <= max(t + 1, 1.19 * t + 1)
            assert bound == pytest.approx(certify(release.with_steps(c), DELTA).epsilon, rel=1e-9)
            if q == 1.0:   # T Gaussian releases: one Gaussian with mu = sqrt(T) / sigma (Dong et al. 2022)
                assert bound >= gaussian_epsilon(math.sqrt(t) / sigma, DELTA) * (1 - 1e-6)
            assert bound < 0.8 * ceiling             # 300 of 2000 steps: far below the run's ceiling
        # the thread certified a few checkpoints ahead of the run, not every step
        assert guard._bound.incremental.certificates <= 16
    finally:
        guard.close()
    while guard.remaining():
        guard.record_step()
    assert guard.epsilon_bound() == ceiling
