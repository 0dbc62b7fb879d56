"""Shuffled fixed-size batches: every example exactly once per epoch.

Each epoch draws a permutation of the ``N`` examples (independent of the data) and cuts it into
``ceil(N / B)`` batches of ``B``; the last batch holds the ``N mod B`` remaining examples (it is padded
with masked rows by ``finetune.dp.sampling.micro_batches``, nothing is dropped).  What this costs in
privacy is certified by ``accountant.shuffle`` (docs/privacy.md Section 7: no amplification, one
release per epoch, under zero-out or substitution; add/remove is not covered).

The certificate holds for *any* data-independent order, so the permutation's quality is not a privacy
matter; it is drawn from the same seeded or secure generator as everything else (``secure=True``).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from accountant.randomness import make_rng, raw_words
from accountant.shuffle import steps_per_epoch

__all__ = ["ShuffleSampler"]


class ShuffleSampler:
    """Yields, for ``epochs`` epochs, the index batches of a fresh permutation per epoch."""

    sampling = "shuffle"

    def __init__(self, dataset_size: int, batch_size: int, epochs: int, *, rng=None,
                 seed: int | None = None, secure: bool = False):
        if int(dataset_size) < 1:
            raise ValueError(f"dataset_size must be >= 1, got {dataset_size}")
        if not 1 <= int(batch_size) <= int(dataset_size):
            raise ValueError(f"batch_size must be in [1, dataset_size={dataset_size}], got {batch_size}")
        if int(epochs) < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        self.dataset_size = int(dataset_size)
        self.batch_size = int(batch_size)
        self.epochs = int(epochs)
        self.steps_per_epoch = steps_per_epoch(self.dataset_size, self.batch_size)
        self.steps = self.epochs * self.steps_per_epoch
        self.rng = rng if rng is not None else make_rng(seed=seed, secure=secure)
        self.epoch = -1                     # epoch whose permutation is ``order``
        self.order: np.ndarray | None = None

    def permutation(self) -> np.ndarray:
        """A uniformly random permutation from raw 64-bit keys (works for either generator kind)."""
        keys = raw_words(self.rng, self.dataset_size)
        return np.argsort(keys, kind="stable")

    def batch(self, step: int) -> np.ndarray:
        """Indices of batch ``step`` (0-based over the whole run); steps must come in order."""
        epoch, pos = divmod(int(step), self.steps_per_epoch)
        if epoch != self.epoch:
            if epoch != self.epoch + 1 and self.order is not None:
                raise ValueError(f"step {step} skips an epoch (the sampler is at epoch {self.epoch})")
            self.order, self.epoch = self.permutation(), epoch
        return np.sort(self.order[pos * self.batch_size:(pos + 1) * self.batch_size])

    def __iter__(self) -> Iterator[np.ndarray]:
        for step in range(self.steps):
            yield self.batch(step)

    def __len__(self) -> int:
        return self.steps

    # ---- checkpoints (JSON-able; the permutation is data-independent) ---------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "order": None if self.order is None else self.order.tolist()}

    def load_state_dict(self, state: dict) -> None:
        order = state.get("order")
        if order is not None:
            order = np.asarray(order, dtype=np.int64)
            if order.shape != (self.dataset_size,) or not np.array_equal(np.sort(order),
                                                                          np.arange(self.dataset_size)):
                raise ValueError("the saved epoch order is not a permutation of this data set")
        self.epoch, self.order = int(state.get("epoch", -1)), order
