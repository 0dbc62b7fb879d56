"""Finite scale mixtures of Laplace laws."""
from __future__ import annotations


import numpy as np

from accountant import randomness
from accountant.laws.base import Noise, NoiseParameterError, _positive


class LaplaceMixture(Noise):
    """Finite scale mixture of Laplace laws, sum_i w_i Laplace(0, b_i) (an LMO law with discrete u)."""

    family = "laplace_mixture"

    def __init__(self, weights, scales):
        w = np.asarray(weights, dtype=np.float64).ravel()
        b = np.asarray(scales, dtype=np.float64).ravel()
        if len(w) != len(b) or len(w) == 0:
            raise NoiseParameterError("laplace_mixture needs equally many weights and scales")
        if np.any(~np.isfinite(w)) or np.any(w < 0) or abs(w.sum() - 1) > 1e-12:
            raise NoiseParameterError("laplace_mixture weights must be non-negative and sum to 1")
        if np.any(~np.isfinite(b)) or np.any(b <= 0):
            raise NoiseParameterError("laplace_mixture scales must be positive")
        self.weights, self.scales = w, b

    @property
    def params(self):
        return {"weights": self.weights.tolist(), "scales": self.scales.tolist()}

    def __repr__(self):
        return f"LaplaceMixture(weights={self.weights.tolist()}, scales={self.scales.tolist()})"

    def logpdf(self, x):
        ax = np.abs(np.asarray(x, dtype=np.float64))[..., None]
        terms = np.log(self.weights / (2 * self.scales)) - ax / self.scales
        top = terms.max(axis=-1)
        return top + np.log(np.exp(terms - top[..., None]).sum(axis=-1))

    def sf(self, x):
        x = np.asarray(x, dtype=np.float64)
        tail = 0.5 * np.sum(self.weights * np.exp(-np.abs(x)[..., None] / self.scales), axis=-1)
        return np.where(x >= 0, tail, 1 - tail)

    def expected_abs(self):
        return float(np.dot(self.weights, self.scales))

    def variance(self):
        return float(np.dot(self.weights, 2 * self.scales ** 2))

    def log_lipschitz(self):
        u = 1 / self.scales
        return float(np.dot(self.weights, u * u) / np.dot(self.weights, u))

    def scaled(self, factor):
        return LaplaceMixture(self.weights, self.scales * _positive("scale factor", factor))

    def _sample_numpy(self, n, rng):
        component = rng.choice(len(self.weights), size=n, p=self.weights)
        return rng.laplace(0.0, 1.0, n) * self.scales[component]

    def sample(self, n, rng):
        n = int(n)
        if isinstance(rng, np.random.Generator):
            return self._sample_numpy(n, rng)
        cum = np.cumsum(self.weights)
        component = np.minimum(np.searchsorted(cum, randomness.uniform_open(rng, n) * cum[-1]),
                               len(self.weights) - 1)
        magnitude = -np.log(randomness.uniform_open(rng, n)) * self.scales[component]
        return np.where(randomness.sign_bits(rng, n), magnitude, -magnitude)
