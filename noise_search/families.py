"""Candidate noise families for the search, each parametrised by a *shape* and a *scale*.

Every family describes a symmetric unimodal density on the real line (units of the sensitivity C).
The search never certifies the continuous law directly: :func:`binned` turns ``(shape, scale)`` into a
piecewise-uniform law on bins of width ``h = 1/n`` (``n`` an integer, so a shift by the sensitivity is
exactly ``n`` bins) with exponential tails -- the table format v1 (docs/table-format.md).  That binned
law is what the fast accountant ranks and, after rounding onto the 2^-53 lattice
(``accountant.noise.Tabulated.quantised``), what the real accountant certifies and the sampler draws.

Binning never costs privacy for a shift of exactly the sensitivity: with bins aligned to the shift,
the binned mechanism is the continuous one followed by "round to the bin, add a fresh uniform", a
post-processing (Dwork & Roth 2014, Prop. 2.1); both laws are symmetric unimodal, so the largest
shift is the worst one for both (docs/privacy.md, Lemma 1).

Families (``scale`` always grows with the noise):

* ``gaussian``  -- ``exp(-x^2 / (2 s^2))``; no shape.
* ``laplace``   -- ``exp(-|x| / s)``; no shape.
* ``gengauss``  -- generalised Gaussian ``exp(-|x/s|^beta)`` (Subbotin 1923); shape ``beta``.
* ``lmo``       -- the LMO-DP Laplace scale mixture (Yang et al., arXiv 2405.18776): ``Z | u ~
  Laplace(1/u)`` with ``u = a1 Gamma(k, theta) + a3 Exp(rate lam) + a4 U[ua, ub]``; density
  ``p(z) = M_u'(-|z|)/2`` (docs/soundness.md section 1).  Shape: the split of ``E[u]`` between the three terms,
  the Gamma shape ``k`` and the relative width ``w`` of the uniform; ``E[u] = 1/scale``.
* ``staircase`` -- free-form pure-DP family generalising the staircase mechanism of Geng & Viswanath
  ("The optimal noise-adding mechanism in differential privacy", IEEE Trans. IT 62(2), 2016):
  ``log p(x) = -eps0 (floor|x| + g(frac|x|))`` with ``g`` a ramp from 0 to 1 centred at ``gamma`` of
  width ``w`` (``w = 0``: the staircase, optimal for one pure-DP release; ``w = 1, gamma = 1/2``:
  Laplace).  Every member is exactly ``eps0``-DP for one release; ``scale = 1/eps0``.
* ``spline``    -- free-form smooth log-density ``-phi(|x|/s)``: the slope ``phi'`` is piecewise linear
  through free non-negative values at fixed knots (.5, 1, 1.5, 2, 2.5, 3, 4 in units of ``s``),
  ``phi'(0) = 0`` (no kink at the top, which would cost Fisher information), constant after the last
  knot (exponential tail).  Contains the Gaussian exactly and close approximations of the
  generalised Gaussians with beta > 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numba
import numpy as np

from accountant.laws import gengauss as gengauss_law, laplace as laplace_law, lmo as lmo_law

#: one-sided tail mass (in units of the total) beyond the core of a binned table
TAIL_TARGET = 1e-13
#: hard cap on the number of bins on each side of a binned table
MAX_BINS = 1 << 18
#: log-density drop (nats) beyond which the density is treated as negligible
LOG_DROP = 80.0


# --------------------------------------------------------------------------------------------------
# Compiled log-densities (unnormalised, x >= 0, in units of C)
# --------------------------------------------------------------------------------------------------
# the laws' own compiled log-densities (accountant.laws, ``Noise.compiled_logpdf``)
_logp_gengauss = gengauss_law.logp_compiled
_logp_laplace = laplace_law._logp
_logp_lmo = lmo_law.logp_compiled
_lmo_terms = lmo_law._lmo_terms


@numba.njit(cache=True)
def _logp_staircase(x, eps0, gamma, width):  # pragma: no cover - compiled
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        ax = abs(x[i])
        whole = math.floor(ax)
        frac = ax - whole
        if width <= 1e-9:
            g = 1.0 if frac >= gamma else 0.0
        else:
            g = min(1.0, max(0.0, (frac - gamma) / width + 0.5))
        out[i] = -eps0 * (whole + g)
    return out


@numba.njit(cache=True)
def _logp_spline(x, scale, knots, slopes):  # pragma: no cover - compiled
    """-phi(|x|/scale), phi' piecewise linear through (knots[j], slopes[j]), constant after the last."""
    out = np.empty_like(x)
    nk = knots.shape[0]
    for i in range(x.shape[0]):
        t = abs(x[i]) / scale
        acc = 0.0
        for j in range(nk):
            if j + 1 < nk:
                lo, hi = knots[j], knots[j + 1]
                if t <= lo:
                    break
                u = min(t, hi) - lo
                acc += slopes[j] * u + (slopes[j + 1] - slopes[j]) * u * u / (2.0 * (hi - lo))
            else:
                if t > knots[j]:
                    acc += slopes[j] * (t - knots[j])
        out[i] = -acc
    return out


# --------------------------------------------------------------------------------------------------
# Binned laws
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Binned:
    """Symmetric piecewise-uniform law: ``mass[k]`` on ``[k h, (k+1) h]`` and on its mirror image,
    ``tail_mass`` on each side beyond ``K h`` with density ``tail_mass * rate * exp(-rate (|x| - K h))``.
    ``2 sum(mass) + 2 tail_mass == 1`` (up to rounding; the lattice rounding happens in the accountant).
    """

    n: int                       # bins per unit of sensitivity, h = 1/n
    mass: np.ndarray             # one-sided masses, non-increasing
    tail_mass: float
    tail_rate: float

    @property
    def h(self) -> float:
        return 1.0 / self.n

    @property
    def reach(self) -> float:
        return len(self.mass) / self.n

    def expected_abs(self) -> float:
        k = np.arange(len(self.mass))
        core = 2 * float(np.dot(self.mass, (k + 0.5) * self.h))
        tail = 2 * self.tail_mass * (self.reach + 1 / self.tail_rate) if self.tail_mass > 0 else 0.0
        return core + tail

    def variance(self) -> float:
        k = np.arange(len(self.mass), dtype=np.float64)
        core = 2 * float(np.dot(self.mass, ((k + 1) ** 3 - k ** 3) * self.h ** 2 / 3))
        tail = 0.0
        if self.tail_mass > 0:
            e, r = self.reach, self.tail_rate
            tail = 2 * self.tail_mass * (e * e + 2 * e / r + 2 / r ** 2)
        return core + tail

    def objective(self, kind: str) -> float:
        return self.expected_abs() if kind == "abs" else self.variance()

    def table_arrays(self):
        """(edges, mass, tail_mass, tail_rate) in table format v1 (before lattice rounding)."""
        K = len(self.mass)
        edges = np.arange(-K, K + 1, dtype=np.float64) / self.n
        return edges, np.concatenate([self.mass[::-1], self.mass]), self.tail_mass, self.tail_rate


def bin_logpdf(logp, n: int, far: float, midpoint: bool = False,
               tail_target: float = TAIL_TARGET) -> Binned:
    """Bin an unnormalised log-density ``logp(x_array)`` (x >= 0, non-increasing) into a :class:`Binned`.

    Masses are Simpson's rule on each bin (midpoint rule for piecewise-constant densities); the core
    stops where the remaining one-sided mass falls below ``tail_target`` (relative to the total); the
    remainder becomes an exponential tail whose rate is the hazard ``p(E)/P(|Z| > E)`` at the core end
    ``E``, lowered if needed so the tail starts no higher than the last bin (unimodality).
    """
    h = 1.0 / n
    nb = int(min(MAX_BINS, max(4, math.ceil(far * n))))
    if midpoint:
        x = (np.arange(nb, dtype=np.float64) + 0.5) * h
        lp = logp(x)
        peak = lp[0]
        mass = np.exp(lp - peak) * h
        end_density = float(np.exp(logp(np.array([nb * h]))[0] - peak))
    else:
        x = np.arange(2 * nb + 1, dtype=np.float64) * (h / 2)
        lp = logp(x)
        peak = lp[0]
        p = np.exp(lp - peak)
        mass = (p[0:-1:2] + 4 * p[1::2] + p[2::2]) * (h / 6)
        end_density = float(p[-1])
    mass = np.minimum.accumulate(np.maximum(mass, 0.0))   # guard against rounding non-monotonicity
    # mass beyond the last computed bin: exponential extrapolation with the local log-slope
    beyond = 0.0
    if end_density > 0 and nb >= 2 and mass[-1] > 0 and mass[-2] > 0:
        ratio = mass[-1] / mass[-2]
        if ratio < 1:
            beyond = mass[-1] * ratio / (1 - ratio)
        else:
            beyond = mass[-1] * nb  # flat density at the cap: a crude but conservative estimate
    total = 2 * (math.fsum(mass) + beyond)
    remaining = (np.cumsum(mass[::-1])[::-1] + beyond) / total   # remaining[k] = P(Z >= k h) / 1
    # core size K: first k with remaining mass beyond k*h below target
    below = np.nonzero(remaining <= tail_target)[0]
    K = int(below[0]) if len(below) else nb
    K = max(K, n)   # the core always covers at least one sensitivity
    K = min(K, nb)
    tail = float(remaining[K]) if K < nb else beyond / total
    core = mass[:K] / total
    if tail > 0:
        dens_at_end = (mass[K] if K < nb else mass[-1]) / total / h
        rate = dens_at_end / tail
        rate = min(rate, core[-1] / h / tail)
    else:
        rate = 0.0
    return Binned(n=int(n), mass=core, tail_mass=tail, tail_rate=float(rate))


def _far_point(logp, start: float, drop: float = LOG_DROP) -> float:
    """Smallest x = start * 2^j at which logp(x) <= logp(0) - drop (capped)."""
    peak = float(logp(np.zeros(1))[0])
    x = max(start, 1e-3)
    for _ in range(40):
        if float(logp(np.array([x]))[0]) <= peak - drop:
            return x
        x *= 2
    return x


# --------------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """A candidate family: shape vector in optimiser coordinates, bounds, a start point."""

    name: str
    bounds: tuple = ()
    x0: tuple = ()
    min_n: int = 1
    midpoint: bool = False
    shape_names: tuple = field(default=())

    @property
    def dim(self) -> int:
        return len(self.bounds)

    # subclasses implement these three
    def logp(self, shape, scale):
        raise NotImplementedError

    def params(self, shape, scale) -> dict:
        raise NotImplementedError

    def far(self, shape, scale) -> float:
        return _far_point(self.logp(shape, scale), scale)

    def binned(self, shape, scale, n: int, tail_target: float = TAIL_TARGET) -> Binned:
        n = max(int(n), self.min_n)
        return bin_logpdf(self.logp(shape, scale), n, self.far(shape, scale), self.midpoint, tail_target)

    def parametric(self, shape, scale):
        """The exact accountant law (``law`` other than ``tabulated``), or None."""
        return None

    def snap(self, shape, n: int):
        """The shape actually binned on a grid of ``n`` bins per sensitivity."""
        return tuple(float(v) for v in shape)

    def start_scale(self, eps: float) -> float:
        return 1.0 / eps


class GaussianFamily(Family):
    def logp(self, shape, scale):
        return lambda x: _logp_gengauss(x, scale * math.sqrt(2.0), 2.0)

    def far(self, shape, scale):
        return scale * math.sqrt(2 * LOG_DROP)

    def params(self, shape, scale):
        return {"sigma": float(scale)}

    def parametric(self, shape, scale):
        from accountant.noise import Gaussian
        return Gaussian(scale)


class LaplaceFamily(Family):
    def logp(self, shape, scale):
        return lambda x: _logp_laplace(x, scale)

    def far(self, shape, scale):
        return scale * LOG_DROP

    def params(self, shape, scale):
        return {"scale": float(scale)}

    def parametric(self, shape, scale):
        from accountant.noise import Laplace
        return Laplace(scale)


class GenGaussFamily(Family):
    def logp(self, shape, scale):
        beta = float(shape[0])
        return lambda x: _logp_gengauss(x, scale, beta)

    def far(self, shape, scale):
        return scale * LOG_DROP ** (1 / float(shape[0]))

    def params(self, shape, scale):
        return {"scale": float(scale), "beta": float(shape[0])}

    def parametric(self, shape, scale):
        from accountant.noise import GeneralizedGaussian
        return GeneralizedGaussian(scale, float(shape[0]))


def lmo_params(shape, scale) -> dict:
    """Accountant LMO parameters for optimiser coordinates ``(z1, z3, log k, w)``.

    The three terms of ``u`` get the shares ``softmax(z1, z3, 0)`` of ``E[u] = 1/scale``; each term has
    mean one before weighting: Gamma(k, theta=1/k), Exp(rate 1), Uniform[1-w, 1+w].
    """
    z1, z3, logk, w = (float(v) for v in shape)
    e = np.exp(np.array([z1, z3, 0.0]) - max(z1, z3, 0.0))
    f = e / e.sum()
    k = math.exp(logk)
    return {"a1": float(f[0] / scale), "a3": float(f[1] / scale), "a4": float(f[2] / scale),
            "k": k, "theta": 1.0 / k, "lam": 1.0, "ua": 1.0 - w, "ub": 1.0 + w}


class LMOFamily(Family):
    def logp(self, shape, scale):
        p = lmo_params(shape, scale)
        args = (p["a1"], p["a3"], p["a4"], p["k"], p["theta"], p["lam"], p["ua"], p["ub"])
        return lambda x: _logp_lmo(x, *args)

    def far(self, shape, scale):
        # P(|Z| > g) = M_u(-g): walk out until it is below e^-LOG_DROP (or the bin cap stops us)
        p = lmo_params(shape, scale)
        args = (p["a1"], p["a3"], p["a4"], p["k"], p["theta"], p["lam"], p["ua"], p["ub"])
        g = scale
        for _ in range(60):
            if _lmo_terms(-g, *args)[0] <= -LOG_DROP:
                break
            g *= 2
        return g

    def params(self, shape, scale):
        return lmo_params(shape, scale)

    def parametric(self, shape, scale):
        from accountant.noise import LMO
        return LMO(**lmo_params(shape, scale))


class StaircaseFamily(Family):
    def logp(self, shape, scale):
        gamma, width = float(shape[0]), float(shape[1])
        eps0 = 1.0 / scale
        return lambda x: _logp_staircase(x, eps0, gamma, width)

    def far(self, shape, scale):
        return scale * LOG_DROP + 1

    def params(self, shape, scale):
        return {"eps0": 1.0 / float(scale), "gamma": float(shape[0]), "width": float(shape[1])}

    def snap(self, shape, n):
        # the step position sits on a bin edge, so the staircase is exact on the grid
        n = max(int(n), self.min_n)
        return (round(float(shape[0]) * n) / n, float(shape[1]))

    def binned(self, shape, scale, n, tail_target=TAIL_TARGET):
        return super().binned(self.snap(shape, n), scale, n, tail_target)


SPLINE_KNOTS = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0])


def _spline_slopes(shape) -> np.ndarray:
    """phi'(knots): 0 at the origin (a smooth top), exp(shape) at the other knots."""
    return np.concatenate([[0.0], np.exp(np.asarray(shape, dtype=np.float64))])


class SplineFamily(Family):
    def logp(self, shape, scale):
        slopes = _spline_slopes(shape)
        return lambda x: _logp_spline(x, scale, SPLINE_KNOTS, slopes)

    def far(self, shape, scale):
        t = np.linspace(0.0, SPLINE_KNOTS[-1], 161)
        phi = -_logp_spline(t, 1.0, SPLINE_KNOTS, _spline_slopes(shape))
        if phi[-1] >= LOG_DROP:
            return scale * float(np.interp(LOG_DROP, phi, t))
        return scale * (SPLINE_KNOTS[-1] + (LOG_DROP - phi[-1]) / _spline_slopes(shape)[-1])

    def params(self, shape, scale):
        return {"scale": float(scale), "knots": [float(k) for k in SPLINE_KNOTS],
                "slopes": [float(v) for v in _spline_slopes(shape)]}


def spline_from_gengauss(beta: float) -> np.ndarray:
    """Spline shape whose slope interpolates that of ``|t|^beta`` (``beta t^(beta-1)``) at the knots."""
    t = SPLINE_KNOTS[1:]
    return np.log(np.maximum(beta * t ** (beta - 1), 1e-3))


FAMILIES = {
    "gaussian": GaussianFamily("gaussian"),
    "laplace": LaplaceFamily("laplace"),
    "gengauss": GenGaussFamily("gengauss", bounds=((0.6, 4.0),), x0=(1.8,), shape_names=("beta",)),
    # w >= 1e-3: the accountant's LMO needs U_a < U_b (a point mass there is the Laplace limit anyway)
    "lmo": LMOFamily("lmo", bounds=((-6.0, 6.0), (-6.0, 6.0), (math.log(0.5), math.log(200.0)), (1e-3, 0.95)),
                     x0=(0.0, -3.0, math.log(4.0), 0.5), shape_names=("z1", "z3", "log_k", "w")),
    "staircase": StaircaseFamily("staircase", bounds=((0.02, 0.98), (0.0, 1.0)), x0=(0.46, 0.0),
                                 min_n=32, midpoint=True, shape_names=("gamma", "width")),
    "spline": SplineFamily("spline", bounds=tuple((-5.0, 4.0) for _ in SPLINE_KNOTS[1:]),
                           x0=tuple(spline_from_gengauss(2.0)),
                           shape_names=tuple(f"log_slope{i}" for i in range(1, len(SPLINE_KNOTS)))),
}

#: families whose log-density is Lipschitz (certifiable under l1 clipping, docs/soundness.md rule 2)
L1_FAMILIES = ("laplace", "lmo")
