"""Tabulated laws: a piecewise-uniform core with exponential tails (table format v1)."""
from __future__ import annotations

import math

import numpy as np
from fractions import Fraction

from accountant import randomness
from accountant.laws.base import Noise, NoiseParameterError, _positive


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

    def to_json(self) -> dict:
        """The table itself (its ``params`` are only a summary)."""
        return {"family": "tabulated", "edges": self.edges.tolist(), "mass": self.mass.tolist(),
                "tail_mass": self.tail_mass, "tail_rate": self.tail_rate}

    @classmethod
    def from_json(cls, data: dict) -> "Tabulated":
        return cls(data["edges"], data["mass"], data["tail_mass"], data["tail_rate"])

    def fisher_information(self):
        return math.inf     # the density jumps at the bin edges

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
