"""One-dimensional noise laws: exact densities, tails, moments and exact samplers.

Every law here is symmetric about 0 and unimodal (non-increasing in |x|).  The accountant relies on
this: for such laws the largest shift is the worst one (docs/privacy.md, Lemma 1), so a mechanism with
sensitivity C is certified by the pair (law shifted by C, law).

Each law also exposes the piece structure of its log-likelihood ratio
``l(x) = log p(x - s) - log p(x)`` through :meth:`Noise.loss_pieces`; the accountant inverts ``l`` on
each monotone piece (``accountant.privacy_loss``).  This is the one extension point: a new law needs
density, tails, moments, a sampler and its monotone pieces.

All functions are vectorised over float64 arrays and computed in the tails from survival functions or
log-densities, never as ``1 - cdf``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from scipy import integrate, special

from accountant import randomness


class NoiseParameterError(ValueError):
    """Parameters outside a noise family (a user mistake, reported in one line)."""


@dataclass(frozen=True)
class Piece:
    """An interval ``[lo, hi]`` on which the log-likelihood ratio is monotone.

    ``direction`` is +1 (non-decreasing), -1 (non-increasing) or 0 (constant).
    """

    lo: float
    hi: float
    direction: int


class Noise:
    """Abstract symmetric unimodal noise law on the real line."""

    family: str = "abstract"
    #: True when log p is concave: then the log-likelihood ratio is monotone in x (one piece).
    log_concave: bool = False

    @property
    def params(self) -> dict:
        raise NotImplementedError

    # --- density and tails -------------------------------------------------------------------
    def logpdf(self, x):
        raise NotImplementedError

    def pdf(self, x):
        return np.exp(self.logpdf(x))

    def sf(self, x):
        """P(Z > x), accurate for large x."""
        raise NotImplementedError

    def cdf(self, x):
        """P(Z <= x), accurate for very negative x (symmetry: cdf(x) = sf(-x))."""
        return self.sf(-np.asarray(x, dtype=np.float64))

    def interval_mass(self, a, b):
        """P(a < Z <= b) computed from the side of 0 where it is accurate."""
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        sf_a, sf_b, cdf_a, cdf_b = self.sf(a), self.sf(b), self.cdf(a), self.cdf(b)
        right = sf_a - sf_b                   # accurate when a >= 0
        left = cdf_b - cdf_a                  # accurate when b <= 0
        middle = 1.0 - cdf_a - sf_b
        out = np.where(a >= 0, right, np.where(b <= 0, left, middle))
        return np.maximum(np.where(b > a, out, 0.0), 0.0)

    def isf(self, p):
        """Inverse survival function by bisection (families override with closed forms)."""
        p = np.asarray(p, dtype=np.float64)
        lo = np.zeros_like(p)
        hi = np.ones_like(p)
        while np.any(self.sf(hi) > p):
            hi = np.where(self.sf(hi) > p, 2 * hi, hi)
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            too_low = self.sf(mid) > p
            lo = np.where(too_low, mid, lo)
            hi = np.where(too_low, hi, mid)
            if np.all(hi - lo <= 4 * np.spacing(hi)):
                break
        return hi

    # --- moments -----------------------------------------------------------------------------
    def expected_abs(self) -> float:
        raise NotImplementedError

    def variance(self) -> float:
        raise NotImplementedError

    # --- geometry ----------------------------------------------------------------------------
    def log_lipschitz(self) -> float:
        """sup |d/dx log p(x)|; ``inf`` when unbounded (then no l1 certificate exists)."""
        return math.inf

    def loss_pieces(self, shift: float, reach: float) -> list[Piece]:
        """Monotone pieces of ``log p(x - shift) - log p(x)`` covering ``[-reach, reach + shift]``."""
        if self.log_concave:
            return [Piece(-reach, reach + shift, +1)]
        # log p convex on (0, inf) (Laplace scale mixtures, gen. Gaussian beta < 1): the ratio
        # decreases on (-inf, 0], increases on [0, s], decreases on [s, inf) (docs/privacy.md).
        return [Piece(-reach, 0.0, -1), Piece(0.0, shift, +1), Piece(shift, reach + shift, -1)]

    def scaled(self, factor: float) -> "Noise":
        raise NotImplementedError

    # --- sampling ----------------------------------------------------------------------------
    def sample(self, n: int, rng) -> np.ndarray:
        """Draw ``n`` float64 values.  ``rng``: numpy Generator or ``randomness.SecureRandom``."""
        n = int(n)
        if isinstance(rng, np.random.Generator):
            return self._sample_numpy(n, rng)
        # Secure path: inverse survival function of |Z| fed with 106-bit uniforms, sign from a bit.
        u = randomness.uniform_open(rng, n)
        sign = np.where(randomness.sign_bits(rng, n), 1.0, -1.0)
        return sign * self.isf(0.5 * u)

    def _sample_numpy(self, n: int, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v:.6g}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise NoiseParameterError(f"{name} must be a positive finite number, got {value}")
    return value


class Gaussian(Noise):
    """N(0, sigma^2)."""

    family = "gaussian"
    log_concave = True

    def __init__(self, sigma: float):
        self.sigma = _positive("sigma", sigma)

    @property
    def params(self):
        return {"sigma": self.sigma}

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


class Laplace(Noise):
    """Laplace(0, b): density exp(-|x|/b) / (2b)."""

    family = "laplace"
    log_concave = True

    def __init__(self, scale: float):
        self.scale = _positive("scale", scale)

    @property
    def params(self):
        return {"scale": self.scale}

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

    def log_lipschitz(self):
        return 1 / self.scale

    def scaled(self, factor):
        return Laplace(self.scale * factor)

    def _sample_numpy(self, n, rng):
        return rng.laplace(0.0, self.scale, n)


class GeneralizedGaussian(Noise):
    """Density beta / (2 a Gamma(1/beta)) exp(-|x/a|^beta); beta=2 is N(0, a^2/2), beta=1 Laplace(a)."""

    family = "gengauss"

    def __init__(self, scale: float, beta: float):
        self.scale = _positive("scale", scale)
        self.beta = _positive("beta", beta)
        if not 0.2 <= self.beta <= 20:
            raise NoiseParameterError(f"beta must lie in [0.2, 20], got {self.beta}")
        self.log_concave = self.beta >= 1
        self._lognorm = math.log(self.beta / (2 * self.scale)) - special.gammaln(1 / self.beta)

    @property
    def params(self):
        return {"scale": self.scale, "beta": self.beta}

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

    def log_lipschitz(self):
        return 1 / self.scale if self.beta == 1 else math.inf

    def scaled(self, factor):
        return GeneralizedGaussian(self.scale * factor, self.beta)

    def _sample_numpy(self, n, rng):
        mag = self.scale * rng.standard_gamma(1 / self.beta, n) ** (1 / self.beta)
        return np.where(rng.random(n) < 0.5, -mag, mag)


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


LATTICE = 2.0 ** 53  # masses are integer multiples of 1/LATTICE (docs/table-format.md)


def _exact_width(edges: np.ndarray, j: int) -> tuple[int, int]:
    """Width of bin ``j`` as an exact ratio of integers ``(num, den)``, ``den`` a power of two (a
    float difference is not exact in general)."""
    n1, d1 = float(edges[j]).as_integer_ratio()
    n2, d2 = float(edges[j + 1]).as_integer_ratio()
    den = max(d1, d2)
    return n2 * (den // d2) - n1 * (den // d1), den


def _exactly_denser(m_out: float, w_out: tuple, m_in: float, w_in: tuple) -> bool:
    """Exactly whether ``m_out / w_out > m_in / w_in`` (masses floats, widths exact ratios)."""
    a, b = float(m_out).as_integer_ratio()
    c, d = float(m_in).as_integer_ratio()
    return a * w_in[0] * d * w_out[1] > c * w_out[0] * b * w_in[1]


def unimodality_violation(edges, mass, tail_mass: float, tail_rate: float) -> str | None:
    """Why the table ``(edges, mass, tail_mass, tail_rate)`` is not an exactly symmetric law whose
    density is non-increasing in |x|, or ``None`` if it is one.

    Exactly what Lemma 1 of docs/privacy.md needs, with no tolerance: the masses (on the 2^-53
    lattice when written by this library) are compared as exact rationals against the exact bin
    widths, ``mass[j+1] * width[j] <= mass[j] * width[j+1]`` outward from the bin at 0, and the tail
    starts no higher than the last bin (``tail_mass * tail_rate * width[-1] <= mass[-1]``).  A float
    screen decides the clear cases, where both products are normal floats (relative error at most
    2^-53 each); near-ties and products that underflow (tiny masses or widths) are settled in exact
    integer arithmetic, so the answer is exact for every float input.
    """
    edges = np.asarray(edges, dtype=np.float64)
    mass = np.asarray(mass, dtype=np.float64)
    if not np.array_equal(mass, mass[::-1]):
        i = int(np.argmax(mass != mass[::-1]))
        return (f"bin {i} holds mass {mass[i]!r} but its mirror bin {len(mass) - 1 - i} holds "
                f"{mass[len(mass) - 1 - i]!r}")
    n = len(mass)
    start = n // 2                        # first bin right of 0 (the centre bin when n is odd)
    m = mass[start:]
    widths = np.diff(edges)[start:]
    lhs, rhs = m[1:] * widths[:-1], m[:-1] * widths[1:]     # density[j+1] <= density[j] <=> lhs <= rhs
    tiny = np.finfo(np.float64).tiny
    unsure = (lhs > rhs * (1 - 1e-12)) | ((lhs > 0) & (rhs < tiny)) | ((lhs < tiny) & (m[1:] > 0))
    for j in np.nonzero(unsure)[0]:
        if _exactly_denser(m[j + 1], _exact_width(edges, start + j + 1), m[j], _exact_width(edges, start + j)):
            with np.errstate(over="ignore", divide="ignore"):
                dens = m / widths
            return (f"the density rises from {dens[j]:.6g} to {dens[j + 1]:.6g} away from 0 at "
                    f"x = {edges[start + j + 1]:.6g}")
    if tail_mass > 0:
        w_num, w_den = _exact_width(edges, n - 1)
        if Fraction(tail_mass) * Fraction(tail_rate) * Fraction(w_num, w_den) > Fraction(float(m[-1])):
            return (f"the tail starts at density {tail_mass * tail_rate:.6g}, above the last bin's "
                    f"{m[-1] / widths[-1]:.6g}")
    return None


class Tabulated(Noise):
    """Piecewise-uniform core on ``edges`` with exponential tails (table format v1).

    The log-likelihood ratio of a piecewise log-linear density is linear on every cell of the partition
    by ``edges`` and ``edges + s``; :func:`accountant.privacy_loss.tabulated_cells` builds that partition exactly.
    """

    family = "tabulated"

    def __init__(self, edges, mass, tail_mass, tail_rate, check_lattice: bool = False):
        edges = np.asarray(edges, dtype=np.float64)
        mass = np.asarray(mass, dtype=np.float64)
        tail_mass, tail_rate = float(tail_mass), float(tail_rate)
        if edges.ndim != 1 or mass.ndim != 1 or len(edges) != len(mass) + 1 or len(mass) < 1:
            raise NoiseParameterError("table needs edges of length n+1 and mass of length n >= 1")
        if not (np.all(np.isfinite(edges)) and np.all(np.diff(edges) > 0)):
            raise NoiseParameterError("table edges must be finite and strictly increasing")
        narrow = np.diff(edges) < np.finfo(np.float64).tiny
        if np.any(narrow):
            j = int(np.argmax(narrow))
            raise NoiseParameterError(
                f"table bin {j} is {edges[j + 1] - edges[j]!r} wide, below the smallest normal float "
                f"{np.finfo(np.float64).tiny:.4g}: its density would overflow float64; widen the bin")
        if not np.array_equal(edges, -edges[::-1]):
            i = int(np.argmax(edges != -edges[::-1]))
            raise NoiseParameterError(
                f"table edges must be exactly symmetric about 0 (edges[{i}] = {edges[i]!r} but "
                f"-edges[{len(edges) - 1 - i}] = {-edges[len(edges) - 1 - i]!r}); docs/privacy.md, Lemma 1")
        if not (np.all(np.isfinite(mass)) and np.all(mass >= 0)):
            raise NoiseParameterError("table masses must be finite and non-negative")
        if not (tail_mass >= 0 and math.isfinite(tail_rate) and tail_rate >= 0):
            raise NoiseParameterError("tail_mass and tail_rate must be non-negative")
        if tail_mass > 0 and tail_rate <= 0:
            raise NoiseParameterError("a tail with positive mass needs tail_rate > 0")
        total = math.fsum(mass) + 2 * tail_mass
        if abs(total - 1) > 1e-12:
            raise NoiseParameterError(f"table probabilities sum to {total!r}, not 1")
        if check_lattice:
            scaled = np.append(mass, tail_mass) * LATTICE
            if np.any(scaled != np.round(scaled)) or int(np.round(mass * LATTICE).sum()) + 2 * int(
                    round(tail_mass * LATTICE)) != int(LATTICE):
                raise NoiseParameterError("table masses are not on the 2^-53 lattice the sampler needs")
        problem = unimodality_violation(edges, mass, tail_mass, tail_rate)
        if problem:
            raise NoiseParameterError(
                f"table density is not symmetric unimodal: {problem}; the accountant certifies only "
                "exactly symmetric laws whose density does not increase away from 0 (docs/privacy.md, Lemma 1)")
        density = mass / np.diff(edges)
        self.edges, self.mass, self.tail_mass, self.tail_rate = edges, mass, tail_mass, tail_rate
        self.density = density
        self.reach = float(edges[-1])
        self._cum_left = np.concatenate([[0.0], np.cumsum(mass)]) + tail_mass  # P(Z <= edges[i])

    @classmethod
    def quantised(cls, edges, mass, tail_mass, tail_rate) -> "Tabulated":
        """Round a symmetric unimodal table onto the 2^-53 lattice, keeping it exactly symmetric
        unimodal (what the constructor requires, docs/privacy.md Lemma 1).

        The edges are made exactly symmetric by mirroring the right half (the centre edge becomes 0
        when the bin count is even); they may move by rounding only.  Each right-half mass is rounded
        down and capped, in exact rational arithmetic, so the density stays non-increasing; the left
        half mirrors it, and the remainder goes to the central bin(s), which hold the largest density.
        Certify the returned table, not its input.
        """
        edges = np.asarray(edges, dtype=np.float64)
        mass = np.asarray(mass, dtype=np.float64)
        n = len(mass)
        if edges.ndim != 1 or mass.ndim != 1 or len(edges) != n + 1 or n < 1:
            raise NoiseParameterError("table needs edges of length n+1 and mass of length n >= 1")
        if not (math.isfinite(float(tail_rate)) and float(tail_rate) >= 0
                and math.isfinite(float(tail_mass)) and float(tail_mass) >= 0):
            raise NoiseParameterError("tail_mass and tail_rate must be finite and non-negative")
        scale = max(abs(float(edges[0])), abs(float(edges[-1])))
        if np.max(np.abs(edges + edges[::-1])) > 1e-9 * scale:
            raise NoiseParameterError("table edges must be symmetric about 0 to be quantised")
        if np.max(np.abs(mass - mass[::-1])) > 1e-9 * max(float(np.max(mass)), 1e-300):
            raise NoiseParameterError("table masses must be symmetric about 0 to be quantised")
        half = n // 2
        first = half if n % 2 == 0 else half + 1       # right-half bins (excluding a centre bin)
        right = edges[first:].copy()
        if n % 2 == 0:
            right[0] = 0.0
        edges = np.concatenate([-right[:0:-1] if n % 2 == 0 else -right[::-1], right])
        widths = np.diff(edges)
        total = math.fsum(mass) + 2 * float(tail_mass)
        mass, tail_mass = mass / total, float(tail_mass) / total
        ints = [int(v) for v in np.floor(mass[first:] * LATTICE)]
        tail_int = int(math.floor(tail_mass * LATTICE))

        def cap(m_in: int, j_in: int, j_out: int) -> int:
            """Largest lattice mass of bin ``j_out`` whose density does not exceed that of bin
            ``j_in`` holding ``m_in`` lattice units (exact rational arithmetic)."""
            (out_num, out_den), (in_num, in_den) = _exact_width(edges, j_out), _exact_width(edges, j_in)
            return (m_in * out_num * in_den) // (out_den * in_num)

        if n % 2 == 1 and ints:    # the centre bin (a lower bound of its final mass) may not be outgrown
            ints[0] = min(ints[0], cap(int(LATTICE) - 2 * sum(ints) - 2 * tail_int, half, first))
        for j in range(1, len(ints)):                  # keep density non-increasing outward (exact)
            with np.errstate(over="ignore"):      # inf for a subnormal width: the exact cap decides
                rough = ints[j - 1] * (widths[first + j] / widths[first + j - 1])
            if ints[j] <= rough * (1 - 1e-12):         # clearly within the cap (rough is 1e-15 exact)
                continue
            ints[j] = min(ints[j], cap(ints[j - 1], first + j - 1, first + j))
        if tail_int > 0 and ints:   # the tail may not start above the last bin's density
            w_num, w_den = _exact_width(edges, n - 1)
            tail_int = min(tail_int, math.floor(Fraction(ints[-1] * w_den, w_num) / Fraction(float(tail_rate))))
        full = np.zeros(n, dtype=np.int64)
        full[first:] = ints
        full[:half] = ints[::-1]
        rest = int(LATTICE) - int(full.sum()) - 2 * tail_int   # even: every other term is doubled
        if rest < 0:
            raise NoiseParameterError("table masses sum to more than 1")
        if n % 2 == 1:
            full[half] += rest
        else:
            full[half - 1] += rest // 2
            full[half] += rest // 2
        tab_mass = full.astype(np.float64) / LATTICE
        rate = float(tail_rate) if tail_int > 0 else 0.0
        return cls(edges, tab_mass, tail_int / LATTICE, rate, check_lattice=True)

    @property
    def params(self):
        return {"bins": int(len(self.mass)), "reach": self.reach, "tail_mass": self.tail_mass,
                "tail_rate": self.tail_rate}

    def _bin(self, x):
        return np.clip(np.searchsorted(self.edges, x, side="right") - 1, 0, len(self.mass) - 1)

    def logpdf(self, x):
        x = np.asarray(x, dtype=np.float64)
        ax = np.abs(x)
        with np.errstate(divide="ignore"):
            core = np.log(self.density[self._bin(x)])
            if self.tail_mass > 0:
                tail = math.log(self.tail_mass * self.tail_rate) - self.tail_rate * (ax - self.reach)
            else:
                tail = np.full_like(ax, -np.inf)
        return np.where(ax <= self.reach, core, tail)

    def _lower(self, y):
        """P(Z <= y) for y <= reach: left tail below -reach, piecewise-linear CDF in the core."""
        j = self._bin(y)
        inside = self._cum_left[j] + self.density[j] * (np.clip(y, self.edges[0], self.edges[-1]) - self.edges[j])
        if self.tail_rate > 0:
            left = self.tail_mass * np.exp(-self.tail_rate * np.maximum(-y - self.reach, 0))
        else:
            left = np.zeros_like(y)
        return np.where(y < -self.reach, left, inside)

    def sf(self, x):
        """P(Z > x) = P(Z < -x) by symmetry; below -reach it is 1 - P(Z <= x) (no tail cut off)."""
        x = np.asarray(x, dtype=np.float64)
        return np.where(x >= -self.reach, self._lower(-x), 1 - self._lower(np.minimum(x, self.reach)))

    def expected_abs(self):
        lo, hi = self.edges[:-1], self.edges[1:]
        # E|Z| over a bin with uniform density: (|hi|*hi - |lo|*lo) / 2 / width, per unit mass
        per_bin = np.where(lo >= 0, (lo + hi) / 2, np.where(hi <= 0, -(lo + hi) / 2,
                                                             (lo * lo + hi * hi) / (2 * (hi - lo))))
        tail = 2 * self.tail_mass * (self.reach + (1 / self.tail_rate if self.tail_mass > 0 else 0))
        return float(np.dot(self.mass, per_bin) + tail)

    def variance(self):
        lo, hi = self.edges[:-1], self.edges[1:]
        per_bin = (lo * lo + lo * hi + hi * hi) / 3
        tail = 0.0
        if self.tail_mass > 0:
            r = self.tail_rate
            tail = 2 * self.tail_mass * (self.reach ** 2 + 2 * self.reach / r + 2 / r ** 2)
        return float(np.dot(self.mass, per_bin) + tail)

    def scaled(self, factor):
        """The table stretched by ``factor``.  Rounding the stretched edges can tilt a run of bins of
        equal density by one ulp; the masses are then re-quantised (they move by a few 2^-53 units)
        so that the result is exactly unimodal again.  Certify the returned table."""
        f = _positive("scale factor", factor)
        rate = self.tail_rate / f if self.tail_mass > 0 else 0.0
        try:
            return Tabulated(self.edges * f, self.mass, self.tail_mass, rate)
        except NoiseParameterError:
            return Tabulated.quantised(self.edges * f, self.mass, self.tail_mass, rate)

    def loss_pieces(self, shift, reach):
        raise NotImplementedError("tabulated laws use exact cells (privacy_loss.tabulated_cells)")

    def sample(self, n, rng):
        """Exact draw: a 53-bit integer picks a bin or tail with exactly its lattice probability, a
        second 53-bit uniform places the point uniformly in the bin, or exponentially in the tail."""
        counts = np.round(np.concatenate([[self.tail_mass], self.mass, [self.tail_mass]]) * LATTICE)
        if np.any(counts / LATTICE != np.concatenate([[self.tail_mass], self.mass, [self.tail_mass]])):
            raise NoiseParameterError("this table is not on the 2^-53 lattice; quantise it before sampling")
        cum = np.cumsum(counts.astype(np.int64))
        return randomness.tabulated_draw(cum, self.edges, self.tail_rate, int(n), rng)


def from_name(name: str, **params) -> Noise:
    """Build a parametric law from its family name and parameters (as stored in table metadata)."""
    builders = {"gaussian": Gaussian, "laplace": Laplace, "gengauss": GeneralizedGaussian, "lmo": LMO,
                "laplace_mixture": LaplaceMixture}
    if name not in builders:
        raise NoiseParameterError(f"unknown noise family {name!r}; known: {', '.join(builders)}")
    try:
        return builders[name](**params)
    except TypeError as exc:
        raise NoiseParameterError(f"bad parameters for {name}: {exc}") from None
