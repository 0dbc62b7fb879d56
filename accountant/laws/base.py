"""The base of every noise law: a symmetric unimodal law on the real line, and the registry.

A law is one class in one file of this package.  Defining a subclass with its own ``family`` name
registers it (``accountant.laws.REGISTRY``): from then on the JSON round trip
(:func:`accountant.laws.to_json` / :func:`accountant.laws.from_json`), ``from_name`` and the command
line (``python -m accountant ... --noise NAME``, one ``--PARAM`` option per entry of ``cli_params``)
know it, with no other file touched (docs/accountant-api.md, "Adding a noise law").

Every law is symmetric about 0 and unimodal (non-increasing in |x|).  The accountant relies on
this: for such laws the largest shift is the worst one (docs/privacy.md, Lemma 1), so a mechanism with
sensitivity C is certified by the pair (law shifted by C, law).

Each law also exposes the piece structure of its log-likelihood ratio
``l(x) = log p(x - s) - log p(x)`` through :meth:`Noise.loss_pieces`; the accountant inverts ``l`` on
each monotone piece (``accountant.privacy_loss``): a new law needs density, tails, moments, a sampler
and its monotone pieces.

All functions are vectorised over float64 arrays and computed in the tails from survival functions or
log-densities, never as ``1 - cdf``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from accountant import randomness

#: family name -> law class, filled by subclassing :class:`Noise`
REGISTRY: dict = {}


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
    #: constructor parameters the command line reads, ``--NAME FLOAT``: {name: help text}
    cli_params: dict = {}
    #: the constructor parameter that grows with the noise (``calibrate`` scales the law by it)
    scale_param: str | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "family" in cls.__dict__:
            if cls.family in REGISTRY and REGISTRY[cls.family].__qualname__ != cls.__qualname__:
                raise ValueError(f"noise family {cls.family!r} is already registered by "
                                 f"{REGISTRY[cls.family].__module__}.{REGISTRY[cls.family].__qualname__}")
            REGISTRY[cls.family] = cls

    # --- JSON ----------------------------------------------------------------------------------
    def to_json(self) -> dict:
        """A JSON-able dict that :meth:`from_json` turns back into an equal law."""
        return {"family": self.family, "params": self.params}

    @classmethod
    def from_json(cls, data: dict) -> "Noise":
        try:
            return cls(**data["params"])
        except TypeError as exc:
            raise NoiseParameterError(f"bad parameters for {cls.family}: {exc}") from None

    # --- Fisher information and compiled density -----------------------------------------------
    def fisher_information(self) -> float:
        """I = E[(d/dx log p(X))^2] (infinite for densities with jumps).  Default: symmetric law,
        2 int_0^inf (log p)'(x)^2 p(x) dx with central differences of log p on an asinh-spaced grid
        reaching the 1e-16 quantile, trapezoid rule (heavy tails included); laws with a closed form
        override it."""
        reach = float(self.isf(1e-16))
        xs = np.sinh(np.linspace(math.asinh(1e-9), math.asinh(reach), 400001))
        hstep = 1e-6 * np.maximum(xs, 1e-3)
        with np.errstate(over="ignore", invalid="ignore"):
            lo = np.maximum(xs - hstep, 0.0)
            d = (self.logpdf(xs + hstep) - self.logpdf(lo)) / (xs + hstep - lo)
            return float(2 * np.trapz(d * d * self.pdf(xs), xs))

    def compiled_logpdf(self):
        """``(f, args)`` with ``f(x, *args)`` a numba-compiled log-density (up to a constant) on a
        float64 array, for loops that call it many times; ``None`` when the law has none."""
        return None

    @property
    def params(self) -> dict:
        """The constructor's keyword arguments (JSON round trip); by default the attributes named by
        ``cli_params``.  A law whose constructor takes other arguments overrides it."""
        if not self.cli_params:
            raise NotImplementedError(f"{type(self).__name__} must define params")
        return {name: getattr(self, name) for name in self.cli_params}

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
