"""The Gaussian law N(0, sigma^2)."""
from __future__ import annotations

import math

import numba
import numpy as np
from scipy import special

from accountant import randomness
from accountant.laws.base import Noise, _positive


class Gaussian(Noise):
    """N(0, sigma^2)."""

    family = "gaussian"
    log_concave = True
    cli_params = {"sigma": "gaussian: standard deviation"}
    scale_param = "sigma"

    def __init__(self, sigma: float):
        self.sigma = _positive("sigma", sigma)

    def logpdf(self, x):
        x = np.asarray(x, dtype=np.float64) / self.sigma
        return -0.5 * x * x - math.log(self.sigma * math.sqrt(2 * math.pi))

    def sf(self, x):
        return special.ndtr(-np.asarray(x, dtype=np.float64) / self.sigma)

    def isf(self, p):
        return -self.sigma * special.ndtri(np.asarray(p, dtype=np.float64))

    def expected_abs(self):
        return self.sigma * math.sqrt(2 / math.pi)

    def variance(self):
        return self.sigma ** 2

    def fisher_information(self):
        return 1 / self.sigma ** 2

    def compiled_logpdf(self):
        return _logp, (self.sigma,)

    def scaled(self, factor):
        return Gaussian(self.sigma * factor)

    def sample(self, n, rng):
        """Seeded: numpy's ziggurat.  Secure: the ziggurat on ChaCha20 words
        (``randomness.standard_normal``), about 4x faster than the inverse CDF of the base class."""
        if isinstance(rng, np.random.Generator):
            return self._sample_numpy(int(n), rng)
        return randomness.standard_normal(rng, n) * self.sigma

    def _sample_numpy(self, n, rng):
        return rng.standard_normal(n) * self.sigma


@numba.njit(cache=True)
def _logp(x, sigma):  # pragma: no cover - compiled
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = -0.5 * (x[i] / sigma) ** 2
    return out
