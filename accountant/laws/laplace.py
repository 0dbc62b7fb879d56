"""The Laplace law Laplace(0, b)."""
from __future__ import annotations

import math

import numba
import numpy as np

from accountant.laws.base import Noise, _positive


class Laplace(Noise):
    """Laplace(0, b): density exp(-|x|/b) / (2b)."""

    family = "laplace"
    log_concave = True
    cli_params = {"scale": "laplace: scale b"}
    scale_param = "scale"

    def __init__(self, scale: float):
        self.scale = _positive("scale", scale)

    def logpdf(self, x):
        return -np.abs(np.asarray(x, dtype=np.float64)) / self.scale - math.log(2 * self.scale)

    def sf(self, x):
        x = np.asarray(x, dtype=np.float64) / self.scale
        return np.where(x >= 0, 0.5 * np.exp(-np.abs(x)), 1 - 0.5 * np.exp(-np.abs(x)))

    def isf(self, p):
        p = np.asarray(p, dtype=np.float64)
        return np.where(p <= 0.5, -self.scale * np.log(2 * p), self.scale * np.log(2 * (1 - p)))

    def expected_abs(self):
        return self.scale

    def variance(self):
        return 2 * self.scale ** 2

    def fisher_information(self):
        return 1 / self.scale ** 2

    def compiled_logpdf(self):
        return _logp, (self.scale,)

    def log_lipschitz(self):
        return 1 / self.scale

    def scaled(self, factor):
        return Laplace(self.scale * factor)

    def _sample_numpy(self, n, rng):
        return rng.laplace(0.0, self.scale, n)


@numba.njit(cache=True)
def _logp(x, scale):  # pragma: no cover - compiled
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = -abs(x[i]) / scale
    return out
