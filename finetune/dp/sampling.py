"""Poisson subsampling for DP-SGD, packed into fixed-shape micro-batches.

Privacy amplification by subsampling (Abadi et al. 2016; Zhu & Wang 2019, "Poisson subsampled Renyi
differential privacy") assumes *Poisson* sampling: every example joins a step independently with
probability ``q``, so the batch size is Binomial(N, q) and may even be zero.  The accountant certifies
exactly that mechanism (docs/soundness.md rule 7), so this module never drops, duplicates or resamples an
example to fit a shape.

MindSpore recompiles for every new input shape, so a logical batch of variable size ``n`` is split
into ``ceil(n / micro_batch_size)`` micro-batches of one fixed shape; the last one is padded with
copies of row 0 whose ``mask`` is 0.  Callers multiply per-example losses by the mask, which makes a
padded row's gradient exactly zero.  An empty logical batch still yields one all-padding micro-batch,
so a step (noise only) is taken and accounted like every other step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from accountant.randomness import make_rng, raw_words

__all__ = ["PoissonSampler", "FixedSizeSampler", "MicroBatch", "micro_batches", "pack"]


@dataclass(frozen=True)
class MicroBatch:
    """Row indices into the dataset (length = micro-batch size) and a 0/1 mask of real rows."""

    indices: np.ndarray
    mask: np.ndarray

    @property
    def n_real(self) -> int:
        return int(self.mask.sum())


class PoissonSampler:
    """Yields, for each step, the sorted indices of the examples sampled with probability ``q``.

    ``rng`` may be a seeded numpy Generator or the secure generator from
    ``accountant.randomness.make_rng(secure=True)``; ``seed`` / ``secure`` build one for you.  Without
    ``rng`` and ``seed`` the coins come from ChaCha20 keyed by the OS (``secure`` defaults to ``seed
    is None``): batch membership must be unpredictable to the adversary, and a known seed makes it
    public (docs/privacy.md, section 8).
    Inclusion uses 53-bit uniform integers: example ``i`` is in the batch iff ``U_i < round(q 2^53)``,
    so the inclusion probability is ``q`` up to 2^-53 (exact whenever ``q`` is a dyadic rational).
    """

    def __init__(self, dataset_size: int, sampling_rate: float, steps: int, *, rng=None,
                 seed: int | None = None, secure: bool | None = None):
        if int(dataset_size) < 1:
            raise ValueError(f"dataset_size must be >= 1, got {dataset_size}")
        if not 0.0 < float(sampling_rate) <= 1.0:
            raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
        if int(steps) < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self.dataset_size = int(dataset_size)
        self.sampling_rate = float(sampling_rate)
        self.steps = int(steps)
        if rng is None:
            rng = make_rng(seed=seed, secure=seed is None if secure is None else bool(secure))
        self.rng = rng
        self._threshold = np.uint64(round(self.sampling_rate * 2.0 ** 53))
        self.position = 0  # batches drawn so far

    def state_dict(self) -> dict:
        """JSON-serialisable state: the configuration, the number of batches drawn and, for a
        seeded numpy generator, its bit-generator state.  A secure generator's key is never
        saved (whoever holds it could recompute every batch and noise draw); a restored secure
        sampler continues with a fresh OS key."""
        rng = (self.rng.bit_generator.state if isinstance(self.rng, np.random.Generator)
               else {"secure": True})
        return {"dataset_size": self.dataset_size, "sampling_rate": self.sampling_rate,
                "steps": self.steps, "position": self.position, "rng": rng}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`; refuses another dataset size or rate."""
        if (int(state["dataset_size"]) != self.dataset_size
                or float(state["sampling_rate"]) != self.sampling_rate):
            raise ValueError("the saved sampler state is for another dataset size or sampling rate")
        _restore_position(self, state)

    @property
    def expected_batch_size(self) -> float:
        return self.sampling_rate * self.dataset_size

    def sample(self) -> np.ndarray:
        """One Poisson batch: indices of the examples whose coin came up heads."""
        words = raw_words(self.rng, self.dataset_size) >> np.uint64(11)
        self.position += 1
        return np.flatnonzero(words < self._threshold)

    def __iter__(self) -> Iterator[np.ndarray]:
        for _ in range(self.steps):
            yield self.sample()

    def __len__(self) -> int:
        return self.steps


def uniform_below(rng, bounds: np.ndarray) -> np.ndarray:
    """One exactly uniform integer in ``[0, m)`` for every ``m`` in ``bounds`` (``1 <= m < 2^63``), from
    raw 64-bit words by rejection: a word is used only below the largest multiple of ``m`` under
    2^64, so every residue is equally likely (no modulo bias)."""
    bounds = np.asarray(bounds, dtype=np.uint64)
    out = np.empty(bounds.size, dtype=np.uint64)
    todo = np.arange(bounds.size)
    while todo.size:
        words = raw_words(rng, todo.size)
        m = bounds[todo]
        limit = np.uint64(2 ** 64 - 1) - (np.uint64(2 ** 64 - 1) % m + np.uint64(1)) % m   # last usable word
        ok = words <= limit
        out[todo[ok]] = words[ok] % m[ok]
        todo = todo[~ok]
    return out.astype(np.int64)


class FixedSizeSampler:
    """Yields, for each step, exactly ``batch_size`` distinct examples drawn uniformly without
    replacement from ``dataset_size``, independently across steps: the sampling that
    ``Mechanism(..., sampling="fixed")`` certifies under substitution (docs/privacy.md, section 10).

    The draw is a partial Fisher-Yates shuffle whose swap positions are exactly uniform integers
    (:func:`uniform_below`), so every B-subset has probability exactly 1 / C(N, B).  Randomness as in
    :class:`PoissonSampler`: secret by default (ChaCha20 keyed by the OS), a seed only on request.
    """

    def __init__(self, dataset_size: int, batch_size: int, steps: int, *, rng=None,
                 seed: int | None = None, secure: bool | None = None):
        if int(dataset_size) < 1:
            raise ValueError(f"dataset_size must be >= 1, got {dataset_size}")
        if not 1 <= int(batch_size) <= int(dataset_size):
            raise ValueError(f"batch_size must lie in [1, dataset_size = {dataset_size}], got {batch_size}")
        if int(steps) < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self.dataset_size, self.batch_size, self.steps = int(dataset_size), int(batch_size), int(steps)
        if rng is None:
            rng = make_rng(seed=seed, secure=seed is None if secure is None else bool(secure))
        self.rng = rng
        self.position = 0  # batches drawn so far

    @property
    def sampling_rate(self) -> float:
        return self.batch_size / self.dataset_size

    expected_batch_size = property(lambda self: float(self.batch_size))

    def sample(self) -> np.ndarray:
        """One batch: the sorted indices of ``batch_size`` distinct examples."""
        n, b = self.dataset_size, self.batch_size
        picks = uniform_below(self.rng, np.arange(n, n - b, -1)) + np.arange(b)   # j_i uniform in [i, n)
        moved: dict = {}
        out = np.empty(b, dtype=np.int64)
        for i, j in enumerate(picks.tolist()):
            out[i] = moved.get(j, j)
            moved[j] = moved.get(i, i)
        self.position += 1
        return np.sort(out)

    def state_dict(self) -> dict:
        """As :meth:`PoissonSampler.state_dict`: configuration, position and, for a seeded numpy
        generator, its state; a secure generator's key is never saved."""
        rng = (self.rng.bit_generator.state if isinstance(self.rng, np.random.Generator)
               else {"secure": True})
        return {"dataset_size": self.dataset_size, "batch_size": self.batch_size, "steps": self.steps,
                "position": self.position, "rng": rng}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`; refuses another dataset size or batch size."""
        if (int(state["dataset_size"]) != self.dataset_size or int(state["batch_size"]) != self.batch_size):
            raise ValueError("the saved sampler state is for another dataset size or batch size")
        _restore_position(self, state)

    def __iter__(self) -> Iterator[np.ndarray]:
        for _ in range(self.steps):
            yield self.sample()

    def __len__(self) -> int:
        return self.steps


def micro_batches(indices: Sequence[int], micro_batch_size: int) -> list[MicroBatch]:
    """Split a logical batch into fixed-size micro-batches; pad the last one (mask 0).

    Every sampled index appears exactly once with mask 1.  An empty batch gives one all-padding
    micro-batch so the (noise-only) step is still taken.  A unit-level step (``[units, m]`` layout,
    ``finetune.dp.units``) is cut into micro-batches of whole units, ``micro_batch_size // m`` each.
    """
    b = int(micro_batch_size)
    if b < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if np.ndim(indices) == 2:
        from .units import unit_micro_batches

        m = np.shape(indices)[1]
        if b % m:
            raise ValueError(f"micro_batch_size {b} is not a multiple of the {m} rows per unit")
        return unit_micro_batches(indices, b // m)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    n_chunks = max(1, -(-idx.size // b))
    out = []
    for c in range(n_chunks):
        part = idx[c * b:(c + 1) * b]
        rows = np.zeros(b, dtype=np.int64)
        mask = np.zeros(b, dtype=np.float32)
        rows[:part.size] = part
        mask[:part.size] = 1.0
        out.append(MicroBatch(rows, mask))
    return out


def pack(arrays: Sequence[np.ndarray], micro: MicroBatch) -> list[np.ndarray]:
    """Gather the rows of each dataset array for one micro-batch (padding rows repeat row 0)."""
    return [np.asarray(a)[micro.indices] for a in arrays]


def _restore_position(sampler, state: dict) -> None:
    """Continue ``sampler`` (its ``rng`` and ``position``) from a saved state: a seeded generator's
    state is restored, a secure one stays freshly keyed (its key is never stored)."""
    seeded = isinstance(sampler.rng, np.random.Generator)
    if seeded != ("secure" not in state["rng"]):
        raise ValueError("the saved sampler used another kind of generator (seeded vs secure)")
    if seeded:
        sampler.rng.bit_generator.state = state["rng"]
    sampler.position = int(state["position"])
