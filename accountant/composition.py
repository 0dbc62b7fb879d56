"""One numerical core: composition of privacy-loss PMFs on a uniform grid and the epsilon read-out.

Used by both routes of :mod:`accountant.routes` (the PRV route composes with prv-accountant's own
code and reads out here), the audit's lower bound (:mod:`accountant.audit`), the ranking accountant
of :mod:`noise_search.fast_accountant` and, through :func:`accountant.certify.certify`, the ledger.

* Composition: the ``count``-fold self-convolution of a PMF by ONE real FFT and a power of its
  transform (repeated squaring), on the window outside of which a Chernoff bound puts at most
  ``tail`` of the result (Koskela, Jalko & Honkela 2020; the window as in dp-accounting's
  ``self_convolve``), so the grid is sized from the composed spread, not ``count`` times the range
  of one step.
* Precision and error allowance: the composition runs in float64 when its round-off allowance
  (:func:`roundoff_allowance`, about 1e-15 ``count``) fits the caller's budget, else in long double
  (about 1e-18 ``count``); pessimistic read-outs add the allowance, optimistic ones subtract it
  (docs/privacy.md, section 6).
* Read-out: the exact epsilon of a discrete privacy-loss measure at ``delta``
  (:func:`epsilon_for_delta`), with the sums of ``p e^-t`` in log space so that no loss overflows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.fft import irfft, next_fast_len, rfft

#: truncated tail mass per composition (moved to +inf in a pessimistic PMF, docs/privacy.md sec. 6)
TRUNCATION = 1e-16
#: safety factor on the round-off model u * count (measured sums stayed below 4 u count, docs/privacy.md)
ROUNDOFF_SAFETY = 10.0


def roundoff_allowance(kind, count: int) -> float:
    """Bound on the summed absolute FFT round-off of a ``count``-fold composition: the relative error
    of each Fourier coefficient grows like ``count`` times the unit roundoff u under the power, and
    the measured error summed over the whole output stayed below 4 u count for T = 10..1e5
    (docs/privacy.md, section 6); ROUNDOFF_SAFETY u count is used."""
    return ROUNDOFF_SAFETY * float(np.finfo(kind).eps) * max(count, 2)


def precision(count: int, budget: float):
    """float64 when the round-off allowance of a ``count``-fold composition fits ``budget``, else
    long double."""
    return np.float64 if roundoff_allowance(np.float64, count) <= budget else np.longdouble


def chernoff_range(probs: np.ndarray, count: int, tail: float) -> tuple[int, int]:
    """Index range [lo, hi] of the ``count``-fold sum of ``probs`` (a sub-probability vector on
    0..n-1) outside which at most ``tail`` of its mass lies: the Chernoff bound
    P(S >= a) <= E[e^{r S}] e^{-r a}, at orders r spread around the Gaussian optimum."""
    n = probs.size
    support = np.nonzero(probs > 0)[0]
    if support.size == 0:
        return 0, 0
    idx, p = support.astype(np.float64), probs[support]
    mean = float(np.dot(idx, p) / p.sum())
    sd = math.sqrt(max(float(np.dot((idx - mean) ** 2, p) / p.sum()), 1e-12))
    best = math.sqrt(2 * math.log(2 / tail) / count) / sd
    lo, hi = 0, (n - 1) * count
    for order in np.geomspace(1e-2 * best, 1e2 * best, 25):
        for r in (order, -order):
            x = r * (idx - mean)
            top = float(x.max())
            log_mgf = top + math.log(float(np.dot(p, np.exp(x - top)))) + r * mean
            bound = (count * log_mgf + math.log(2 / tail)) / r
            if not math.isfinite(bound):
                continue
            if r > 0:
                hi = min(hi, math.ceil(bound))
            else:
                lo = max(lo, math.floor(bound))
    lo = max(lo, 0)
    return lo, max(min(hi, (n - 1) * count), lo)


def power(z: np.ndarray, count: int) -> np.ndarray:
    """z ** count by repeated squaring (complex long double ``**`` is 10x slower)."""
    out, base = None, z
    while count:
        if count & 1:
            out = base.copy() if out is None else out * base
        count >>= 1
        if count:
            base = base * base
    return out


def cyclic_self_convolve(probs: np.ndarray, count: int, size: int, kind=np.float64) -> np.ndarray:
    """The ``count``-fold circular self-convolution of ``probs`` (zero-padded to ``size``) by one
    real FFT in precision ``kind``: entry j holds the mass of sums congruent to j modulo ``size``."""
    x = np.zeros(size, dtype=kind)
    x[:probs.size] = probs
    return irfft(power(rfft(x), count), size)


def self_convolve(probs: np.ndarray, count: int, tail: float, kind=np.float64, clip: bool = True,
                  window: tuple[int, int] | None = None):
    """Entries lo..hi of the ``count``-fold self-convolution of ``probs`` on the Chernoff window
    :func:`chernoff_range` (at most ``tail`` of the mass outside, which wraps onto the window).
    Returns (lo, entries as float64, clipped at 0 unless ``clip`` is False (the negative entries
    then show the round-off), round-off allowance of any sum of them).  ``window``: the
    :func:`chernoff_range` already computed for these arguments."""
    lo, hi = window if window is not None else chernoff_range(probs, count, tail)
    n_out = hi - lo + 1
    size = next_fast_len(max(n_out, probs.size), real=True)
    y = np.roll(cyclic_self_convolve(probs, count, size, kind), -lo)[:n_out]
    return lo, (np.maximum(y, 0) if clip else y).astype(np.float64), roundoff_allowance(kind, count)


def convolve(a: np.ndarray, b: np.ndarray, kind=np.longdouble):
    """Full linear convolution of two PMFs by one real FFT; (entries clipped at 0, allowance)."""
    n = a.size + b.size - 1
    size = next_fast_len(n, real=True)
    y = irfft(rfft(np.asarray(a, dtype=kind), size) * rfft(np.asarray(b, dtype=kind), size), size)[:n]
    return np.maximum(y, 0).astype(np.float64), roundoff_allowance(kind, 2)


# ----------------------------------------------------------------------------------------------
# Read-out
# ----------------------------------------------------------------------------------------------
def hockey_stick(losses: np.ndarray, probs: np.ndarray, inf_mass: float, epsilon: float) -> float:
    """delta(eps) = sum_t p_t (1 - e^(eps - t))_+ + P(loss = +inf) of a discrete privacy-loss
    measure (the hockey-stick divergence written with the privacy loss; Sommer, Meiser & Mohammadi
    2019)."""
    above = losses > epsilon
    return float(np.sum(probs[above] * -np.expm1(epsilon - losses[above]))) + inf_mass


def epsilon_for_delta(losses: np.ndarray, probs: np.ndarray, inf_mass: float, delta):
    """Smallest epsilon >= 0 with :func:`hockey_stick` <= ``delta`` for the measure ``probs`` at
    ascending ``losses`` plus ``inf_mass`` at +inf (inf if that mass alone reaches ``delta``).
    ``delta`` may be a sequence (one pass over the measure answers all): a list is returned.

    Exact for the discrete measure: on the interval between two losses delta(eps) = U - e^eps W with
    U, W the sums of p and p e^-t above it, so eps = log((U - delta) / W) there (the closed form of
    dp-accounting's ``get_epsilon_for_delta``), vectorised over losses >= 0; the sums of p e^-t are
    plain cumulative sums while e^-t cannot underflow (losses below 700), else accumulated in log
    space."""
    many = np.ndim(delta) > 0
    deltas = [float(d) for d in np.atleast_1d(delta)]
    losses, probs = np.asarray(losses, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    keep = (losses >= 0) & (probs > 0)
    t, p = losses[keep][::-1], probs[keep][::-1]               # descending losses
    if t.size:
        if t[0] < 700:
            with np.errstate(divide="ignore"):
                log_low = np.log(np.cumsum(p * np.exp(-t)))    # log of sum_{j<=k} p_j e^-t_j
        else:
            log_low = np.logaddexp.accumulate(np.log(p) - t)
        log_low_prev = np.concatenate([[-np.inf], log_low[:-1]])
        up_prev = inf_mass + np.cumsum(p) - p                  # mass at losses > t_k (and +inf)
    out = []
    for d in deltas:
        if inf_mass >= d:
            out.append(math.inf)
            continue
        if t.size == 0:
            out.append(0.0)
            continue
        first = int(np.searchsorted(up_prev, d, side="right"))   # up_prev is non-decreasing
        with np.errstate(divide="ignore", invalid="ignore"):
            cand = np.log(up_prev[first:] - d) - log_low_prev[first:]
        hit = np.nonzero(np.isfinite(log_low_prev[first:]) & (cand >= t[first:]))[0]
        if hit.size:
            out.append(max(0.0, float(cand[hit[0]])))
            continue
        up_all = inf_mass + p.sum()
        out.append(0.0 if up_all <= d else max(0.0, float(np.log(up_all - d) - log_low[-1])))
    return out if many else out[0]


@dataclass(frozen=True)
class ComposedPMF:
    """A composed privacy-loss PMF on the grid ``(lower + i) * step`` plus a mass at +inf.

    ``roundoff`` bounds the absolute error of any sum of ``probs`` (entries clipped at 0) caused by
    floating point in the FFT: the pessimistic delta adds it, the optimistic one subtracts it.
    """

    step: float
    lower: int
    probs: np.ndarray
    inf_mass: float
    roundoff: float
    pessimistic: bool

    def losses(self) -> np.ndarray:
        return (np.arange(self.probs.size) + self.lower) * self.step

    @property
    def _sign(self) -> float:
        return 1.0 if self.pessimistic else -1.0

    def delta(self, epsilon: float) -> float:
        value = hockey_stick(self.losses(), self.probs, self.inf_mass, epsilon) + self._sign * self.roundoff
        return min(1.0, max(0.0, value))

    def epsilon(self, delta: float) -> float:
        """Smallest epsilon >= 0 with delta(epsilon) <= ``delta`` (inf if the +inf mass exceeds it)."""
        return epsilon_for_delta(self.losses(), self.probs, self.inf_mass, delta - self._sign * self.roundoff)

    def finite_tail(self, x: float) -> float:
        return float(np.sum(self.probs[self.losses() > x]))

    def lower_tail(self, x: float) -> float:
        return float(np.sum(self.probs[self.losses() < x]))

    def self_compose(self, count: int, budget: float, window: tuple[int, int] | None = None) -> "ComposedPMF":
        """``count``-fold composition in the precision :func:`precision` picks for ``budget``; tails
        beyond the Chernoff window (at most TRUNCATION) are counted at +inf when pessimistic and as
        round-off when optimistic; ``window``: its :func:`chernoff_range` at TRUNCATION, if known."""
        if count == 1:
            return self
        lo, probs, roundoff = self_convolve(self.probs, count, TRUNCATION, precision(count, budget), window=window)
        inf_mass = -math.expm1(count * math.log1p(-self.inf_mass)) if self.inf_mass < 1 else 1.0
        if self.pessimistic:
            inf_mass += TRUNCATION
        extra = count * self.roundoff + (0.0 if self.pessimistic else TRUNCATION)
        return ComposedPMF(self.step, self.lower * count + lo, probs, inf_mass, roundoff + extra,
                           self.pessimistic)

    def compose(self, other: "ComposedPMF") -> "ComposedPMF":
        probs, roundoff = convolve(self.probs, other.probs)
        inf_mass = 1 - (1 - self.inf_mass) * (1 - other.inf_mass)
        return ComposedPMF(self.step, self.lower + other.lower, probs, inf_mass,
                           roundoff + self.roundoff + other.roundoff, self.pessimistic)


def connect_the_dots(step: float, k_lo: int, deltas: np.ndarray) -> ComposedPMF:
    """Pessimistic PMF on the losses ``(k_lo + i) * step`` from the exact hockey-stick curve
    ``deltas`` (non-increasing) at those losses: Connect-the-Dots, Doroshenko, Ghazi, Kamath, Kumar &
    Manurangsi 2022, Algorithm 1 (fixed gap d): p_1 = 1 - delta_1 + (delta_2 - delta_1)/(e^d - 1),
    p_i = ((delta_{i+1} - delta_i) - e^d (delta_i - delta_{i-1}))/(e^d - 1), p_n = (delta_n -
    delta_{n-1})/(e^-d - 1), and delta_n at +inf.  The same formulas as dp-accounting's
    ``create_pmf_pessimistic_connect_dots_fixed_gap`` (a test compares the two), vectorised."""
    deltas = np.minimum.accumulate(np.asarray(deltas, dtype=np.float64))
    if deltas.size == 1:
        return ComposedPMF(step, k_lo, np.array([1.0 - deltas[0]]), float(deltas[0]), 0.0, True)
    diffs = np.diff(deltas)
    probs = np.empty_like(deltas)
    probs[0] = 1 - deltas[0] + diffs[0] / math.expm1(step)
    probs[1:-1] = (diffs[1:] - diffs[:-1] * math.exp(step)) / math.expm1(step)
    probs[-1] = diffs[-1] / math.expm1(-step)
    return ComposedPMF(step, k_lo, np.maximum(probs, 0.0), float(deltas[-1]), 0.0, True)
