"""Fixed-size batches drawn without replacement, certified under substitution (docs/privacy.md, Section 10).

Each step draws a batch of exactly ``B`` of the ``N`` examples uniformly without replacement
(``gamma = B / N``) and releases the noisy sum of the batch's clipped contributions; the neighbouring
relation is *substitution* (one example replaced by another, ``N`` unchanged).  Let ``(P_s, P)`` be the
dominating pair of the unsampled step under substitution (``s``: the largest change of the sum, ``2C``
for contributions clipped to norm ``C``), and ``A = gamma P_s + (1 - gamma) P``.

Theorem (Balle, Barthe & Gaboardi 2018, Thm. 10 with the coupling of their Sec. 5; Zhu, Dong & Wang
2022, Thm. 11).  For every pair of substitution neighbours ``D ~ D'`` and ``alpha >= 1``,
``H_alpha(M(D) || M(D')) <= H_alpha(A || P)``; since the relation is symmetric, for ``alpha < 1``
``H_alpha(M(D) || M(D')) <= H_alpha(P || A)``.

Neither ``(A, P)`` nor ``(P, A)`` alone dominates for every ``alpha``, which composition needs.  The pair
used here is the symmetric privacy-loss distribution ``w~`` that agrees with ``(A, P)`` on losses
``> 0`` and mirrors them on losses ``< 0`` (``w~(dl) = e^l w~(d(-l))``, the law of a symmetric trade-off
function; Dong, Roth & Su 2022, Thm. 4.2 give the same envelope ``min{f_p, f_p^-1}**``):

* ``L > 0``: the loss of ``(A, P)`` (upper measure ``A``, lower ``P``);
* ``L < 0``: ``-M`` for the loss ``M > 0`` of ``(A, P)``, upper mass ``P(M)``, lower mass ``A(M)``;
* ``L = 0``: the remaining mass ``1 - A(M > 0) - P(M > 0)`` (non-negative: ``M > 0`` forces
  ``x > s/2`` for a symmetric unimodal law, so ``P(M > 0) <= 1/2``).

Its hockey-stick divergence is ``H_{e^eps}(A || P)`` for ``eps >= 0`` and the symmetric
``1 - e^eps + e^eps H_{e^-eps}(A || P)`` for ``eps < 0``, so it dominates the step for every
``alpha``; the same pair serves both orders of the neighbours (the relation is symmetric), so
``tails`` ignores ``direction``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from accountant.privacy_loss import TAIL_NEGLIGIBLE, _edge

#: quadrature points for the mean of the loss on [log(1 - gamma), 0] (a range of width about gamma)
_MEAN_POINTS = 2 ** 15 + 1


@dataclass(frozen=True)
class FixedPair:
    """Dominating pair of one fixed-size step under substitution, built from the remove pair
    ``base`` = (A, P) of the unsampled step's shift (or randomized response) at rate gamma."""

    base: object

    @property
    def q(self) -> float:
        return self.base.q

    def _base(self, t):
        """(A(M > t), P(M > t), A(M <= t)) of the base pair's remove loss M."""
        return self.base.tails("remove", t)

    def tails(self, direction: str, t):
        """(U(t), W(t), V(t)) of the symmetric loss (see the module docstring); ``direction`` is
        accepted for the routes' interface and ignored (substitution is symmetric)."""
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))
        up, low, up_le = (np.asarray(v, dtype=np.float64) for v in self._base(np.abs(t)))
        neg = t < 0
        # t < 0: upper mass of {L <= t} = P(M >= -t), lower mass of {L > t} = 1 - A(M >= -t); an atom
        # of M at -t falls on the same side in both, which leaves delta unchanged
        return (np.where(neg, 1.0 - low, up), np.where(neg, 1.0 - up, low), np.where(neg, low, up_le))

    def infinite_mass(self, direction: str) -> float:
        return self.base.infinite_mass("remove")

    def loss_range(self, direction: str) -> tuple[float, float]:
        return _cached_range(self)

    def mean_loss(self, direction: str) -> float:
        return _cached_mean(self)

    def check(self) -> "FixedPair":
        """Refuse a base pair for which the mirrored law would need negative mass at 0."""
        up, low, _ = self._base(np.array([0.0]))
        if up[0] + low[0] > 1 + 1e-12:
            raise ValueError("the base pair is not symmetric unimodal: no substitution pair for it")
        return self


@functools.lru_cache(maxsize=256)
def _cached_range(pair: FixedPair) -> tuple[float, float]:
    hi = pair.base.loss_range("remove")[1]
    # L < -x has upper mass P(M > x): the lower tail ends where that is negligible
    lo = -_edge(lambda x: pair._base(x)[1])
    return min(lo, -1e-9), max(hi, 1e-9)


@functools.lru_cache(maxsize=256)
def _cached_mean(pair: FixedPair) -> float:
    """E[L; L finite] = E_A[M+] - E_P[M+] = (E_A[M] - E_P[M]) - (E_A[M-] - E_P[M-]).

    The first difference is the base pair's two mean losses (its add loss is -M under P); the
    second, with ``M- = min(M, 0)`` supported on [log(1 - gamma), 0], is
    ``-int_{log(1-gamma)}^0 (A(M <= t) - P(M <= t)) dt``, by the trapezoid rule on a fine grid
    (the range is about gamma wide, so the rule's error is about gamma^2 / 2^15)."""
    base, q = pair.base, pair.q
    total = base.mean_loss("remove") + base.mean_loss("add")
    if q >= 1:
        return total     # never reached: the certificate uses the unsampled pair itself at gamma 1
    t = np.linspace(math.log1p(-q), 0.0, _MEAN_POINTS)
    _, low, up_le = pair._base(t)
    gap = np.asarray(up_le) - (1.0 - np.asarray(low))
    negative_part = -float(np.sum(0.5 * (gap[1:] + gap[:-1]) * np.diff(t)))
    return total - negative_part


def fixed_pair(base) -> FixedPair:
    """The substitution pair of a fixed-size step from the remove pair ``base`` at rate gamma < 1."""
    return FixedPair(base).check()


__all__ = ["FixedPair", "fixed_pair", "TAIL_NEGLIGIBLE"]
