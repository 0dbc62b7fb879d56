"""The LMO-DP Laplace scale mixture (Yang et al., arXiv 2405.18776)."""
from __future__ import annotations

import math

import numba
import numpy as np
from scipy import integrate, special

from accountant import randomness
from accountant.laws.base import Noise, NoiseParameterError, _positive


#: E[u^2] of an LMO mixing variable above this overflows the accountant's float64 arithmetic
#: (u^2 times squared distances): the supported range of the LMO parameters
LMO_MAX_MOMENT = 1e150


class LMO(Noise):
    """The LMO-DP Laplace scale mixture (Yang et al., arXiv 2405.18776).

    ``u = a1*Gamma(shape k, scale theta) + a3*Exponential(rate lam) + a4*Uniform[ua, ub]`` (independent
    terms) and ``Z | u ~ Laplace(0, 1/u)``, so ``p(z) = (1/2) M_u'(-|z|)`` with ``M_u`` the moment
    generating function of ``u``; ``P(Z > g) = M_u(-g)/2``; ``E|Z| = E[1/u] = int_0^inf M_u(-s) ds``;
    ``|d/dz log p| <= E[u^2]/E[u]`` (docs/soundness.md section 1).  ``lam`` is a RATE; the published sampler
    drew numpy's ``exponential(lam)``, i.e. used it as a scale (``LMO.from_published``).
    """

    family = "lmo"

    def __init__(self, a1, a3, a4, k, theta, lam, ua, ub):
        vals = dict(a1=a1, a3=a3, a4=a4, k=k, theta=theta, lam=lam, ua=ua, ub=ub)
        for name, v in vals.items():
            if not math.isfinite(float(v)):
                raise NoiseParameterError(f"LMO parameter {name} must be finite, got {v}")
        self.a1, self.a3, self.a4 = float(a1), float(a3), float(a4)
        self.k, self.theta, self.lam = float(k), float(theta), float(lam)
        self.ua, self.ub = float(ua), float(ub)
        if min(self.a1, self.a3, self.a4) < 0 or self.a1 + self.a3 + self.a4 <= 0:
            raise NoiseParameterError("LMO weights a1, a3, a4 must be >= 0 and not all zero")
        if self.a1 > 0 and (self.k <= 0 or self.theta <= 0):
            raise NoiseParameterError("LMO Gamma term needs shape k > 0 and scale theta > 0")
        if self.a3 > 0 and self.lam <= 0:
            raise NoiseParameterError("LMO Exponential term needs rate lam > 0")
        if self.a4 > 0 and not (0 <= self.ua <= self.ub):   # U_a == U_b: the constant a4 * U_a
            raise NoiseParameterError("LMO Uniform term needs 0 <= U_a <= U_b")
        try:
            self._mean_u, self._mean_u2 = self.moment_u(1), self.moment_u(2)
        except OverflowError:
            self._mean_u2 = math.inf
        if not (0 < self._mean_u2 < LMO_MAX_MOMENT and self._mean_u > 0):
            raise NoiseParameterError(
                f"LMO parameters outside the supported range: E[u^2] of the mixing variable must be a "
                f"positive number below {LMO_MAX_MOMENT:g} (float64 accounting), got a1={self.a1:g}, "
                f"a3={self.a3:g}, a4={self.a4:g}, k={self.k:g}, theta={self.theta:g}, lam={self.lam:g}, "
                f"ua={self.ua:g}, ub={self.ub:g}")

    @classmethod
    def from_published(cls, cfg: dict, exp_lambda_as_scale: bool = False) -> "LMO":
        """Build from the LMO-DP parameter JSON (a1, a3, a4, G_k, G_theta, E_lambda, U_a, U_b)."""
        required = ["a1", "a3", "a4", "G_k", "G_theta", "E_lambda", "U_a", "U_b"]
        missing = [key for key in required if key not in cfg]
        if missing:
            raise NoiseParameterError(f"LMO parameter file lacks {', '.join(missing)}")
        lam = float(cfg["E_lambda"])
        if exp_lambda_as_scale:
            lam = 1.0 / _positive("E_lambda", lam)
        return cls(cfg["a1"], cfg["a3"], cfg["a4"], cfg["G_k"], cfg["G_theta"], lam, cfg["U_a"], cfg["U_b"])

    @property
    def params(self):
        return dict(a1=self.a1, a3=self.a3, a4=self.a4, k=self.k, theta=self.theta, lam=self.lam,
                    ua=self.ua, ub=self.ub)

    def moment_u(self, order: int) -> float:
        m1 = [0.0, 0.0, 0.0]
        var = [0.0, 0.0, 0.0]
        if self.a1 > 0:
            m1[0], var[0] = self.a1 * self.k * self.theta, self.a1 ** 2 * self.k * self.theta ** 2
        if self.a3 > 0:
            m1[1], var[1] = self.a3 / self.lam, (self.a3 / self.lam) ** 2
        if self.a4 > 0:
            m1[2], var[2] = self.a4 * (self.ua + self.ub) / 2, (self.a4 * (self.ub - self.ua)) ** 2 / 12
        mean = sum(m1)
        return mean if order == 1 else sum(var) + mean ** 2

    def log_mgf(self, s):
        """log M_u(s) for s <= 0 (always finite there)."""
        s = np.asarray(s, dtype=np.float64)
        out = np.zeros_like(s)
        if self.a1 > 0:
            out = out - self.k * np.log1p(-self.theta * self.a1 * s)
        if self.a3 > 0:
            out = out - np.log1p(-self.a3 * s / self.lam)
        if self.a4 > 0:
            t = self.a4 * s
            w = t * (self.ub - self.ua) if self.ub > self.ua else np.zeros_like(t)   # inf * 0 at s = -inf
            safe = np.where(np.abs(w) < 1e-8, -1.0, w)
            ratio = np.where(np.abs(w) < 1e-8, 1 + w / 2, np.expm1(safe) / safe)
            with np.errstate(invalid="ignore", divide="ignore"):
                out = out + t * self.ua + np.log(ratio)
        # M_u(-inf) = P(u = 0) = 0 for every law of this family (u > 0 almost surely); the uniform
        # term's t * U_a is 0 * inf there when U_a = 0
        return np.where(s == -np.inf, -np.inf, out)

    def dlog_mgf(self, s):
        """d/ds log M_u(s) = E_s[u] (the mean of u under exponential tilting), s <= 0."""
        s = np.asarray(s, dtype=np.float64)
        out = np.zeros_like(s)
        if self.a1 > 0:
            out = out + self.a1 * self.k * self.theta / (1 - self.theta * self.a1 * s)
        if self.a3 > 0:
            out = out + self.a3 / (self.lam - self.a3 * s)
        if self.a4 > 0:
            t = self.a4 * s
            w = t * (self.ub - self.ua) if self.ub > self.ua else np.zeros_like(t)
            small = np.abs(w) < 1e-6
            safe = np.where(small, -1.0, w)
            # d/dt log((e^{w}-1)/w) with w = t (ub-ua): (ub-ua) * (1/(1-e^{-w}) - 1/w)
            big = (self.ub - self.ua) * (-1.0 / np.expm1(-safe) - 1.0 / safe)
            series = (self.ub - self.ua) * (0.5 + w / 12)
            out = out + self.a4 * (self.ua + np.where(small, series, big))
        return out

    def logpdf(self, x):
        g = -np.abs(np.asarray(x, dtype=np.float64))
        return math.log(0.5) + self.log_mgf(g) + np.log(self.dlog_mgf(g))

    def sf(self, x):
        x = np.asarray(x, dtype=np.float64)
        tail = 0.5 * np.exp(self.log_mgf(-np.abs(x)))
        return np.where(x >= 0, tail, 1 - tail)

    def expected_abs(self):
        val, _ = integrate.quad(lambda s: float(np.exp(self.log_mgf(-s))), 0, np.inf, limit=500)
        return val

    def variance(self):
        val, _ = integrate.quad(lambda s: s * float(np.exp(self.log_mgf(-s))), 0, np.inf, limit=500)
        return 2 * val  # E[Z^2] = E[2/u^2] and 1/u^2 = int_0^inf s exp(-s u) ds

    def log_lipschitz(self):
        return self._mean_u2 / self._mean_u

    def compiled_logpdf(self):
        return logp_compiled, (self.a1, self.a3, self.a4, self.k, self.theta, self.lam, self.ua, self.ub)

    def scaled(self, factor):
        f = _positive("scale factor", factor)
        return LMO(self.a1 / f, self.a3 / f, self.a4 / f, self.k, self.theta, self.lam, self.ua, self.ub)

    def sample_u(self, n, rng):
        u = np.zeros(n)
        if self.a1 > 0:
            u += self.a1 * rng.gamma(self.k, self.theta, n)
        if self.a3 > 0:
            u += self.a3 * rng.exponential(1.0 / self.lam, n)   # numpy takes the SCALE 1/rate
        if self.a4 > 0:
            u += self.a4 * rng.uniform(self.ua, self.ub, n)
        return u

    def _sample_numpy(self, n, rng):
        return rng.laplace(0.0, 1.0, n) / self.sample_u(n, rng)

    def sample(self, n, rng):
        """Numpy generators use numpy's samplers; a secure source feeds inverse CDFs of each term
        (Gamma by ``gammaincinv``, about 1 us per draw) with 106-bit uniforms."""
        n = int(n)
        if isinstance(rng, np.random.Generator):
            return self._sample_numpy(n, rng)
        u = np.zeros(n)
        if self.a1 > 0:
            u += self.a1 * self.theta * special.gammaincinv(self.k, randomness.uniform_open(rng, n))
        if self.a3 > 0:
            u += self.a3 * -np.log(randomness.uniform_open(rng, n)) / self.lam
        if self.a4 > 0:
            u += self.a4 * (self.ua + (self.ub - self.ua) * randomness.uniform_open(rng, n))
        magnitude = -np.log(randomness.uniform_open(rng, n)) / u
        return np.where(randomness.sign_bits(rng, n), magnitude, -magnitude)


@numba.njit(cache=True)
def _lmo_terms(s, a1, a3, a4, k, theta, lam, ua, ub):  # pragma: no cover - compiled
    """(log M_u(s), d/ds log M_u(s)) for s <= 0 (independent Gamma + Exp(rate) + Uniform terms)."""
    logm = 0.0
    dlog = 0.0
    if a1 > 0:
        logm -= k * math.log1p(-theta * a1 * s)
        dlog += a1 * k * theta / (1.0 - theta * a1 * s)
    if a3 > 0:
        logm -= math.log1p(-a3 * s / lam)
        dlog += a3 / (lam - a3 * s)
    if a4 > 0:
        t = a4 * s
        d = ub - ua
        w = t * d
        if abs(w) < 1e-6:
            logm += t * ua + w / 2
            dlog += a4 * (ua + d * (0.5 + w / 12))
        else:
            logm += t * ua + math.log(math.expm1(w) / w)
            dlog += a4 * (ua + d * (-1.0 / math.expm1(-w) - 1.0 / w))
    return logm, dlog


@numba.njit(cache=True)
def logp_compiled(x, a1, a3, a4, k, theta, lam, ua, ub):  # pragma: no cover - compiled
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        logm, dlog = _lmo_terms(-abs(x[i]), a1, a3, a4, k, theta, lam, ua, ub)
        out[i] = math.log(0.5) + logm + math.log(dlog)
    return out
