"""A DP mechanism: noise law + sensitivity + clipping geometry + Poisson rate + number of steps.

:func:`step_pair` turns a mechanism into the dominating pair of ONE step that the accountants
compose (docs/privacy.md states the theorem behind each case):

* ``scalar``: one real-valued query, |difference| <= C.  Any symmetric unimodal law; the pair is the
  law shifted by C versus the law (Lemma 1: the largest shift dominates).
* ``l2``: vector query, ||difference||_2 <= C.  Exact only for Gaussian noise (rotation invariance);
  any other law is refused, because the one-coordinate analysis understates epsilon (docs/soundness.md rule 2).
* ``l1``: vector query, ||difference||_1 <= C, i.i.d. noise per coordinate.  Gaussian: the l2 pair
  (||v||_2 <= ||v||_1).  A law whose log-density is L-Lipschitz: every step is pure (C L)-DP in every
  direction, dominated by randomized response (Lemma 2).  Anything else is refused.

``records_per_unit = k > 1`` accounts a *person* named in at most k records of a record-level Poisson
run (docs/privacy.md, "Person-level DP"): each record is sampled independently, so one step differs
by a Binomial(k, q) number of shifts.  Gaussian noise (any geometry): the Binomial mixture of shifts
(:class:`accountant.mixture_pair.MixtureShiftPair`; Lemma M).  Any other law is refused here, and
:mod:`accountant.person` falls back to labelled group privacy.

``sampling`` is how each step draws its batch: ``poisson`` (rate ``sampling_rate``, certified under
add/remove of one example) or ``fixed`` (exactly ``B = sampling_rate * N`` examples without replacement,
certified under substitution of one example; :mod:`accountant.fixed_pair`, docs/privacy.md Section 10).
``sensitivity`` is the largest change of the query between neighbours under that relation: ``C`` for
add/remove, ``2C`` for substitution when contributions are clipped to norm ``C``.
"""
from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass

from accountant.mixture_pair import binomial_pair
from accountant.fixed_pair import fixed_pair
from accountant.noise import Gaussian, Noise
from accountant.privacy_loss import RandomizedResponsePair, ShiftPair

GEOMETRIES = ("scalar", "l1", "l2")
#: sampling scheme -> the neighbouring relation its certificate covers
SAMPLING_RELATION = {"poisson": "add/remove", "fixed": "substitution"}


class UnsupportedMechanism(ValueError):
    """No theorem backs a certificate for this mechanism; we refuse rather than guess."""


@dataclass(frozen=True)
class Mechanism:
    noise: Noise
    sensitivity: float = 1.0
    geometry: str = "scalar"
    sampling_rate: float = 1.0
    steps: int = 1
    _: KW_ONLY
    #: records one protected person may be named in (1: record-level DP)
    records_per_unit: int = 1
    sampling: str = "poisson"
    relation: str | None = None

    def __post_init__(self):
        if self.sampling not in SAMPLING_RELATION:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLING_RELATION)}, got {self.sampling!r}")
        if self.relation is None:
            object.__setattr__(self, "relation", SAMPLING_RELATION[self.sampling])
        if self.relation != SAMPLING_RELATION[self.sampling]:
            raise UnsupportedMechanism(f"{self.sampling} sampling is certified under "
                                       f"{SAMPLING_RELATION[self.sampling]}, not {self.relation!r}")
        if not isinstance(self.noise, Noise):
            raise TypeError("noise must be an accountant.noise.Noise")
        if not (math.isfinite(self.sensitivity) and self.sensitivity > 0):
            raise ValueError(f"sensitivity must be positive, got {self.sensitivity}")
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {', '.join(GEOMETRIES)}, got {self.geometry!r}")
        if not (0 < self.sampling_rate <= 1):
            raise ValueError(f"sampling rate must lie in (0, 1], got {self.sampling_rate}")
        if int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps}")
        if int(self.records_per_unit) != self.records_per_unit or self.records_per_unit < 1:
            raise ValueError(f"records per unit must be a positive integer, got {self.records_per_unit}")
        if self.records_per_unit != 1 and self.sampling != "poisson":
            raise UnsupportedMechanism("person-level accounting (records_per_unit > 1) is certified for "
                                       "Poisson sampling only")

    def with_steps(self, steps: int) -> "Mechanism":
        return Mechanism(self.noise, self.sensitivity, self.geometry, self.sampling_rate, int(steps),
                         records_per_unit=self.records_per_unit, sampling=self.sampling,
                         relation=self.relation)

    def describe(self) -> dict:
        """JSON-ready description; ``records_per_unit`` appears only when it is not 1 and ``sampling``
        only when it is not Poisson, so record-level Poisson descriptions (and the certificates stored
        with tables) are unchanged."""
        out = {"noise": self.noise.family, "params": self.noise.params, "sensitivity": self.sensitivity,
               "geometry": self.geometry, "sampling_rate": self.sampling_rate, "steps": int(self.steps)}
        if self.records_per_unit != 1:
            out["records_per_unit"] = int(self.records_per_unit)
        if self.sampling != "poisson":      # Poisson records stay as they were (add/remove)
            out.update(sampling=self.sampling, relation=self.relation)
        return out


def step_pair(mechanism: Mechanism):
    """The dominating pair of one step of ``mechanism`` (see module docstring).  Fixed-size sampling:
    the substitution pair built from the Poisson remove pair at gamma = B / N (at gamma 1 the
    unsampled pair itself, which is symmetric)."""
    pair = _poisson_pair(mechanism)
    if mechanism.sampling == "fixed" and mechanism.sampling_rate < 1:
        return fixed_pair(pair)
    return pair


def _poisson_pair(mechanism: Mechanism):
    noise, c, q = mechanism.noise, mechanism.sensitivity, mechanism.sampling_rate
    k = int(mechanism.records_per_unit)
    if k > 1:
        if not isinstance(noise, Gaussian):
            raise UnsupportedMechanism(
                f"no tight person-level certificate for {noise.family} noise: the Binomial mixture of "
                "shifts dominates only where every shift can be taken aligned and positive (Gaussian "
                "noise; docs/privacy.md, Person-level DP); group privacy is the labelled fallback")
        if q == 1:      # every record is in every step: one shift of k C
            return ShiftPair(noise, k * c, 1.0)
        return binomial_pair(noise, c, k, q)
    if mechanism.geometry == "scalar" or isinstance(noise, Gaussian):
        return ShiftPair(noise, c, q)
    if mechanism.geometry == "l2":
        raise UnsupportedMechanism(
            f"{noise.family} noise under l2 clipping has no exact certificate: only Gaussian noise is "
            "rotation invariant, and a one-coordinate analysis understates epsilon for differences "
            "spread over many coordinates (docs/privacy.md). Use Gaussian noise, or l1 clipping with "
            "Laplace/LMO noise.")
    lipschitz = noise.log_lipschitz()
    if not math.isfinite(lipschitz):
        raise UnsupportedMechanism(
            f"{noise.family} noise has an unbounded log-density slope, so no per-step pure epsilon "
            "holds in every l1 direction (piecewise-constant tables jump; generalised Gaussians with "
            "beta != 1 are steep). Use Laplace or LMO noise under l1, or Gaussian noise.")
    return RandomizedResponsePair(c * lipschitz, q)
