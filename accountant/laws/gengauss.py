"""The generalised Gaussian law exp(-|x/a|^beta) (Subbotin 1923)."""
from __future__ import annotations

import math

import numba
import numpy as np
from scipy import special

from accountant.laws.base import Noise, NoiseParameterError, _positive


class GeneralizedGaussian(Noise):
    """Density beta / (2 a Gamma(1/beta)) exp(-|x/a|^beta); beta=2 is N(0, a^2/2), beta=1 Laplace(a)."""

    family = "gengauss"
    cli_params = {"scale": "gengauss: scale A in exp(-|x/A|^beta)", "beta": "gengauss: exponent beta"}
    scale_param = "scale"

    def __init__(self, scale: float, beta: float):
        self.scale = _positive("scale", scale)
        self.beta = _positive("beta", beta)
        if not 0.2 <= self.beta <= 20:
            raise NoiseParameterError(f"beta must lie in [0.2, 20], got {self.beta}")
        self.log_concave = self.beta >= 1
        self._lognorm = math.log(self.beta / (2 * self.scale)) - special.gammaln(1 / self.beta)

    def logpdf(self, x):
        return self._lognorm - np.abs(np.asarray(x, dtype=np.float64) / self.scale) ** self.beta

    def sf(self, x):
        x = np.asarray(x, dtype=np.float64)
        tail = 0.5 * special.gammaincc(1 / self.beta, np.abs(x / self.scale) ** self.beta)
        return np.where(x >= 0, tail, 1 - tail)

    def isf(self, p):
        p = np.asarray(p, dtype=np.float64)
        mag = self.scale * special.gammainccinv(1 / self.beta, 2 * np.minimum(p, 1 - p)) ** (1 / self.beta)
        return np.where(p <= 0.5, mag, -mag)

    def expected_abs(self):
        return self.scale * math.exp(special.gammaln(2 / self.beta) - special.gammaln(1 / self.beta))

    def variance(self):
        return self.scale ** 2 * math.exp(special.gammaln(3 / self.beta) - special.gammaln(1 / self.beta))

    def fisher_information(self):
        """beta^2 Gamma(2 - 1/beta) / (Gamma(1/beta) a^2); infinite for beta <= 1/2."""
        b, a = self.beta, self.scale
        if b <= 0.5:
            return math.inf
        return b * b * math.exp(math.lgamma(2 - 1 / b) - math.lgamma(1 / b)) / (a * a)

    def compiled_logpdf(self):
        return logp_compiled, (self.scale, self.beta)

    def log_lipschitz(self):
        return 1 / self.scale if self.beta == 1 else math.inf

    def scaled(self, factor):
        return GeneralizedGaussian(self.scale * factor, self.beta)

    def _sample_numpy(self, n, rng):
        mag = self.scale * rng.standard_gamma(1 / self.beta, n) ** (1 / self.beta)
        return np.where(rng.random(n) < 0.5, -mag, mag)


@numba.njit(cache=True)
def logp_compiled(x, scale, beta):  # pragma: no cover - compiled
    """-|x/scale|^beta (the log-density up to its constant) of every element of ``x``."""
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = -(abs(x[i]) / scale) ** beta
    return out
