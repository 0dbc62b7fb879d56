"""The secure Gaussian sampler (accountant.randomness.standard_normal, the ziggurat): its tables,
its law against N(0, 1) (whole law, tail, moments), its resumable slow path, and that it is what
``Gaussian.sample`` uses with a secure source."""
import math

import numpy as np
from scipy import special, stats

from accountant import randomness as R
from accountant.noise import Gaussian


class _Words:
    """A non-Generator source of raw words (the secure path) that can be replayed: PCG64 words."""

    def __init__(self, seed):
        self._bits = np.random.PCG64(seed)

    def random_raw(self, n):
        return self._bits.random_raw(int(n)).astype(np.uint64)


def test_every_layer_has_the_same_area_and_r_is_marsaglia_tsangs():
    x, f, r = R.ziggurat_tables()
    v = r * math.exp(-r * r / 2) + math.sqrt(math.pi / 2) * math.erfc(r / math.sqrt(2))  # base + tail
    areas = np.array([x[0] * f[1]] + [x[i] * (f[i + 1] - f[i]) for i in range(1, R.ZIGGURAT_LAYERS)])
    assert np.max(np.abs(areas / v - 1)) < 1e-11
    assert abs(r - 3.6541528853610088) < 1e-12      # Marsaglia & Tsang (2000), 256 layers
    assert x[R.ZIGGURAT_LAYERS] == 0 and f[R.ZIGGURAT_LAYERS] == 1
    assert np.all(np.diff(x[1:]) < 0)


def test_law_matches_the_standard_normal():
    z = R.standard_normal(np.random.Generator(np.random.PCG64(20240601)), 2_000_000)
    assert z.dtype == np.float64 and np.isfinite(z).all()
    assert stats.kstest(z, "norm").pvalue > 1e-3
    n = z.size
    for k, moment, var in ((1, 0.0, 1.0), (2, 1.0, 2.0), (4, 3.0, 96.0)):   # E Z^k, Var Z^k
        assert abs(np.mean(z ** k) - moment) < 5 * math.sqrt(var / n)
    # the tail beyond r comes only from the slow path: its frequency is the normal's
    r = R.ziggurat_tables()[2]
    p = 2 * special.ndtr(-r)
    assert abs(np.mean(np.abs(z) > r) - p) < 5 * math.sqrt(p / n)


def test_the_tail_draws_are_the_normal_beyond_r():
    x, f, r = R.ziggurat_tables()
    m = 200_000
    g = np.random.Generator(np.random.PCG64(7))
    words = g.bit_generator.random_raw(m).astype(np.uint64)
    kinds = np.full(m, 2, np.int64)                       # every draw starts in the tail
    out = np.empty(m)
    fresh = g.bit_generator.random_raw(8 * m).astype(np.uint64)
    assert R._ziggurat_finish(kinds, words, out, 0, fresh, x, f, r)[0] == m
    t = np.abs(out)
    assert t.min() >= r
    assert stats.kstest(t, lambda v: 1 - special.ndtr(-v) / special.ndtr(-r)).pvalue > 1e-3   # |Z| given |Z|>r


def test_a_short_word_buffer_resumes_where_it_stopped():
    """The slow path saves its state when the words run out; feeding them five at a time gives
    the same draws as feeding them at once (restarting a draw instead would bias the law)."""
    x, f, r = R.ziggurat_tables()
    g = np.random.Generator(np.random.PCG64(3))
    m = 2000
    words = g.bit_generator.random_raw(m).astype(np.uint64)
    kinds = np.where(words & np.uint64(255) == 0, 2, 1).astype(np.int64)
    fresh = g.bit_generator.random_raw(10 * m).astype(np.uint64)
    once = np.empty(m)
    assert R._ziggurat_finish(kinds.copy(), words.copy(), once, 0, fresh, x, f, r)[0] == m
    bit, j, p, calls = np.empty(m), 0, 0, 0
    while j < m:
        j, used = R._ziggurat_finish(kinds, words, bit, j, fresh[p:p + 5], x, f, r)
        p, calls = p + used, calls + 1
    assert calls > m // 5                   # the state was saved and resumed
    np.testing.assert_array_equal(once, bit)


def test_secure_gaussian_uses_the_ziggurat_and_fresh_sources_differ():
    a = Gaussian(2.5).sample(10_000, _Words(11))
    np.testing.assert_array_equal(a, 2.5 * R.standard_normal(_Words(11), 10_000))
    one, two = Gaussian(1.0).sample(1000, R.SecureRandom()), Gaussian(1.0).sample(1000, R.SecureRandom())
    assert not np.any(one == two)           # fresh OS keys: nothing in common
    seeded = np.random.Generator(np.random.PCG64(5))
    np.testing.assert_array_equal(Gaussian(2.0).sample(100, seeded),
                                  2.0 * np.random.Generator(np.random.PCG64(5)).standard_normal(100))
