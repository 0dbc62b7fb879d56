"""make_private(..., sampling="fixed"): the FixedSizeSampler and the certificate it is accounted with."""
import collections
import math

import numpy as np
import pytest
from scipy import stats

import mindspore as ms
from mindspore import nn  # noqa: E402

from accountant.certify import certify  # noqa: E402
from accountant.mechanism import Mechanism  # noqa: E402
from accountant.noise import Gaussian  # noqa: E402
from accountant.randomness import SecureRandom  # noqa: E402
from accountant.shuffle import run_mechanism  # noqa: E402
from finetune import make_private  # noqa: E402
from finetune.dp.sampling import FixedSizeSampler, uniform_below  # noqa: E402
from finetune.engine import EngineConfigError  # noqa: E402
from helpers import Clf  # noqa: E402

N, DELTA = 200, 1e-5


def test_fixed_size_sampler_draws_every_subset_equally_often():
    n, b, draws = 6, 3, 40000
    sampler = FixedSizeSampler(n, b, draws, seed=7)
    counts = collections.Counter(tuple(batch) for batch in sampler)
    assert all(len(set(s)) == b for s in counts)
    assert len(counts) == math.comb(n, b)
    observed = np.array(list(counts.values()))
    _, p = stats.chisquare(observed)
    assert p > 1e-4                     # uniform over the C(6, 3) subsets
    # the exact integers behind the swaps are uniform too (no modulo bias): 3 is not a power of two
    ints = uniform_below(np.random.default_rng(1), np.full(30000, 3))
    assert stats.chisquare(np.bincount(ints, minlength=3)).pvalue > 1e-4


def test_fixed_size_sampler_is_secret_by_default_and_resumes():
    assert isinstance(FixedSizeSampler(10, 3, 1).rng, SecureRandom)
    a = FixedSizeSampler(1000, 64, 5, seed=3)
    a.sample()
    state = a.state_dict()
    expected = a.sample()
    b = FixedSizeSampler(1000, 64, 5, seed=99)
    b.load_state_dict(state)
    np.testing.assert_array_equal(b.sample(), expected)
    assert b.position == 2 and len(set(expected)) == 64
    with pytest.raises(ValueError):
        FixedSizeSampler(1000, 32, 5, seed=3).load_state_dict(state)
    with pytest.raises(ValueError):
        FixedSizeSampler(10, 11, 1, seed=1)


def test_make_private_fixed_certifies_substitution_and_compares(capsys):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    net = Clf()
    engine = make_private(net, nn.SGD(net.trainable_params(), learning_rate=0.5), dataset_size=N, batch_size=50,
                          steps=4, noise_multiplier=1.0, target_delta=DELTA, sampling="fixed", seed=0,
                          micro_batch_size=16, verbose=True, compare_poisson=True)
    out = capsys.readouterr().out
    assert engine.relation == "substitution" and engine.sampling == "fixed"
    expected = certify(Mechanism(Gaussian(1.0), 2.0, "l2", 0.25, 4, sampling="fixed"), DELTA).epsilon
    assert engine.certificate.epsilon == expected
    assert engine.certificate.mechanisms[0]["relation"] == "substitution"
    poisson = certify(Mechanism(Gaussian(1.0), 1.0, "l2", 0.25, 4), DELTA).epsilon
    shuffled = certify(run_mechanism(Gaussian(1.0), "l2", "shuffle", "substitution", 4, 0.25, 4), DELTA).epsilon
    assert engine.poisson_epsilon == poisson and engine.shuffle_epsilon == shuffled
    assert f"{expected:.4f}" in out and f"{poisson:.4f}" in out and f"{shuffled:.4f}" in out
    assert "substitution" in out
    x = np.random.RandomState(0).randn(N, 4).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    sizes = []
    for batch in engine.batches(x, y):
        sizes.append(batch.size)
        engine.step(batch)
    assert sizes == [50, 50, 50, 50]
    with pytest.raises(EngineConfigError, match="batch_size"):
        make_private(net, nn.SGD(net.trainable_params(), learning_rate=0.5), dataset_size=N, steps=2,
                     noise_multiplier=1.0, target_delta=DELTA, sampling="fixed", seed=0, verbose=False)
