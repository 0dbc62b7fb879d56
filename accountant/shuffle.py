"""Accounting for the sampling a training run really does: Poisson or shuffled fixed-size batches.

``poisson``
    Every example joins each step independently with probability ``q``; ``T`` steps of the
    subsampled mechanism, certified under add/remove of one example (docs/privacy.md, Section 1).

``shuffle``
    Each epoch cuts a data-independent permutation of the ``N`` examples into batches of ``B``
    (the last one possibly smaller), so every example is in exactly one batch per epoch.  No
    amplification is claimed.  Theorem (docs/privacy.md, Section 7): under *zero-out* (one example
    replaced by one whose gradient is zero) the run is dominated by ``E`` compositions of the
    unsampled mechanism with sensitivity ``C``; under *substitution* (one example replaced by
    another) with sensitivity ``2C``.  Add/remove is not covered: adding an example changes ``N``
    and shifts every later batch.

``fixed``
    Each step draws exactly ``B`` of the ``N`` examples uniformly without replacement, independently
    across steps; ``T`` steps certified with amplification under *substitution* (sensitivity ``2C``;
    ``accountant.fixed_pair``, docs/privacy.md Section 10).

A release is what the ledger charges: one step under Poisson sampling, one epoch under shuffling
(charged when the epoch's first step runs, so a partial epoch counts in full).
"""
from __future__ import annotations

from accountant.mechanism import Mechanism
from accountant.noise import Noise

SAMPLINGS = ("poisson", "shuffle", "fixed")
RELATIONS = {"poisson": ("add/remove",), "shuffle": ("zero-out", "substitution"), "fixed": ("substitution",)}
DEFAULT_RELATION = {"poisson": "add/remove", "shuffle": "zero-out", "fixed": "substitution"}

#: what each relation means, printed next to the epsilon it qualifies
RELATION_TEXT = {
    "add/remove": "add/remove of one example",
    "zero-out": "zero-out: one example replaced by one with zero gradient (add/remove NOT covered)",
    "substitution": "substitution: one example replaced by another (add/remove NOT covered)",
}


class SamplingError(ValueError):
    """A sampling scheme or neighbouring relation that no certificate here covers."""


def check_sampling(sampling: str, relation: str | None = None) -> str:
    """The relation to certify for ``sampling`` (its default if ``None``); refuse what is not covered."""
    if sampling not in SAMPLINGS:
        raise SamplingError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    relation = DEFAULT_RELATION[sampling] if relation is None else relation
    if relation not in RELATIONS[sampling]:
        why = (" (adding an example to a shuffled data set shifts every later fixed-size batch, so "
               "no one-release-per-epoch bound holds)" if sampling == "shuffle" else "")
        raise SamplingError(f"sampling {sampling!r} is certified under {' or '.join(RELATIONS[sampling])}, "
                            f"not {relation!r}{why}")
    return relation


def sensitivity(relation: str) -> float:
    """Sensitivity of one release in units of the clipping norm ``C``: the sum of clipped gradients
    moves by ``g_i`` (norm <= C) under zero-out and add/remove, by ``g_i - g'_i`` (<= 2C) under
    substitution."""
    return 2.0 if relation == "substitution" else 1.0


def steps_per_epoch(dataset_size: int, batch_size: int) -> int:
    """Batches of a shuffled epoch: ``ceil(N / B)`` (the last one padded, nothing dropped)."""
    return -(-int(dataset_size) // int(batch_size))


def release_mechanism(noise: Noise, geometry: str, sampling: str, relation: str,
                      sampling_rate: float | None = None) -> Mechanism:
    """The mechanism of ONE release: a Poisson step at rate ``q``, a fixed-size step at ``B / N``, or one
    shuffled epoch (q = 1)."""
    relation = check_sampling(sampling, relation)
    if sampling in ("poisson", "fixed"):
        if sampling_rate is None:
            raise SamplingError(f"{sampling} sampling needs its sampling rate")
        return Mechanism(noise, sensitivity(relation), geometry, float(sampling_rate), 1, sampling=sampling)
    return Mechanism(noise, sensitivity(relation), geometry, 1.0, 1)


def releases(steps_taken: int, sampling: str, steps_in_epoch: int | None = None) -> int:
    """Releases charged after ``steps_taken`` steps: the steps (Poisson), or the epochs begun (shuffle)."""
    if sampling in ("poisson", "fixed"):
        return int(steps_taken)
    return -(-int(steps_taken) // int(steps_in_epoch))


def run_mechanism(noise: Noise, geometry: str, sampling: str, relation: str, steps: int,
                  sampling_rate: float | None = None, steps_in_epoch: int | None = None) -> Mechanism:
    """The whole run of ``steps`` steps as one composed mechanism (what the certificate is about)."""
    count = releases(steps, sampling, steps_in_epoch)
    return release_mechanism(noise, geometry, sampling, relation, sampling_rate).with_steps(max(1, count))

