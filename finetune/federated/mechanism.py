"""The DP-FedAvg release, in numpy: Poisson client sampling, clipping, one noisy sum per round.

McMahan et al. (ICLR 2018), Algorithm 1 with the fixed-denominator estimator: organisation ``i``
joins a round with probability ``q`` independently of the others; its update ``d_i`` is clipped to
``||d_i|| <= C`` in the table's norm; the server releases

    mean = ( sum_{i sampled} clip(d_i) + C * Z ) / (q * K),     Z ~ table noise, one draw per round

Adding or removing one organisation changes the sum by at most ``C`` in that norm, so the release
is one step of the Poisson-subsampled mechanism the table certifies with sensitivity 1 in units of
``C`` (docs/privacy.md).  The divisor ``q * K`` is a constant (the *expected* count), never the
realised count, which would depend on who took part.  An organisation that was sampled but whose
update never arrived (crash, time-out) contributes zero: whether a process fails does not depend on
anyone's data, so the release is still the certified mechanism evaluated on a data set without that
organisation's contribution this round (docs/federated.md).
"""
from __future__ import annotations

import numpy as np

from finetune.dp.sampling import PoissonSampler

__all__ = ["poisson_select", "clip_update", "noisy_mean", "GeometryError", "norm"]


class GeometryError(ValueError):
    """The table's certificate does not cover a vector-valued update."""


def poisson_select(n_clients: int, sampling_rate: float, rng) -> np.ndarray:
    """Positions (0..n-1) of the clients sampled this round; each with probability ``q``.

    The project's Poisson sampler (53-bit uniform words, inclusion probability ``q`` to 2^-53)."""
    return PoissonSampler(int(n_clients), float(sampling_rate), 1, rng=rng).sample()


def norm(vector: np.ndarray, geometry: str) -> float:
    if geometry == "l2":
        return float(np.sqrt(np.dot(vector, vector)))
    if geometry == "l1":
        return float(np.abs(vector).sum())
    raise GeometryError(
        f"the noise table certifies geometry {geometry!r}; a federated update is a vector, which "
        "only an 'l2' (Gaussian) or 'l1' (Laplace-type, LMO) table covers")


def clip_update(update: np.ndarray, clip_norm: float, geometry: str) -> tuple[np.ndarray, float]:
    """(update scaled to norm <= ``clip_norm`` in ``geometry``, its norm before clipping).  float64."""
    update = np.asarray(update, dtype=np.float64).reshape(-1)
    size = norm(update, geometry)
    if not np.isfinite(size):
        # a non-finite update would propagate through the sum; replace it by zero (a data-independent
        # rule: the same clipped contribution as a client that sent nothing)
        return np.zeros_like(update), size
    scale = min(1.0, clip_norm / size) if size > 0 else 1.0
    return update * scale, size


def noisy_mean(clipped_sum: np.ndarray, noise, clip_norm: float, expected_count: float, rng,
               add_noise: bool = True) -> np.ndarray:
    """``(sum + C * Z) / expected_count`` with ``Z = noise.sample(len(sum), rng)`` in float64.

    ``noise`` is the certified table's law (``NoiseTable.noise``): its own sampler, float64, tails
    included (docs/soundness.md rule 1).  Called once per round on the *sum*; the noise is never
    added per client and then averaged (that would divide its variance by the client count)."""
    if not expected_count > 0:
        raise ValueError(f"expected_count must be positive, got {expected_count}")
    total = np.asarray(clipped_sum, dtype=np.float64).reshape(-1)
    if add_noise:
        z = np.asarray(noise.sample(total.size, rng), dtype=np.float64)
        total = total + float(clip_norm) * z
    return total / float(expected_count)
