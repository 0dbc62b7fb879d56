"""The ``mindspore.train.Model`` path: a ``mindspore.dataset`` of fixed-shape micro-batches with masks.

``DPOptimizer`` is not a MindSpore optimizer (the clipping and the certified noise run on the host),
so it cannot go into ``Model(net, loss_fn, optimizer)``.  Instead ``Model`` trains a network that *is*
the DP step, on a dataset whose rows are the micro-batches of the accounted sampler:

* :class:`MicroBatchRows` is a random-access source for ``mindspore.dataset.GeneratorDataset``.  Its
  plan (the index batches of every remaining step, drawn up front from the engine's Poisson or
  shuffle sampler; sampling is data-independent, so drawing early changes nothing) is cut into
  micro-batches of one fixed shape.  Each row holds the data columns of one micro-batch, its 0/1
  ``mask`` (padding rows are 0), the ``step`` it belongs to, whether it is the ``last`` micro-batch of
  that step, and a ``ticket`` naming the sampler that drew it.
* :class:`DPTrainStep` (the ``Model`` network) adds each row's clipped per-example gradients to the
  running sum and, on the last row of a step, releases the noisy sum and updates the parameters.  It
  refuses rows of another sampler or out of order (docs/soundness.md rule 7: sampling matches
  accounting), so a ``dataset.shuffle().batch(64)`` pipeline cannot be trained by mistake.
* ``finetune.dp.guard.PrivacyBudgetCallback`` (over the engine's ``ReleaseGuard``) ends ``Model.train`` before a step the certificate does
  not cover.

Use ``dataset_sink_mode=False`` (the step runs on the host).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from mindspore import Tensor, nn

from .release_guard import SamplingMismatch
from .sampling import micro_batches

__all__ = ["MicroBatchRows", "DPTrainStep", "make_dataset", "EXTRA_COLUMNS"]

#: columns appended to the data columns of every row
EXTRA_COLUMNS = ("mask", "step", "last", "ticket")


class MicroBatchRows:
    """Random-access rows (one per micro-batch) for ``GeneratorDataset``; see the module docstring."""

    def __init__(self, take, plan: Sequence[tuple[int, np.ndarray]], micro_batch_size: int,
                 ticket: int):
        """``take(indices)`` returns the data columns of those rows (``finetune.engine``'s gatherer;
        a sequence of arrays is accepted too)."""
        if not callable(take):
            arrays = [np.asarray(a) for a in take]
            take = lambda idx: [a[idx] for a in arrays]  # noqa: E731
        self._take = take
        self.ticket = np.int64(ticket)
        self._rows = []                                  # (step, MicroBatch, is_last)
        for step, idx in plan:
            parts = micro_batches(idx, micro_batch_size)
            for j, micro in enumerate(parts):
                self._rows.append((int(step), micro, j == len(parts) - 1))

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int):
        step, micro, last = self._rows[int(i)]
        data = tuple(self._take(micro.indices))
        return data + (micro.mask, np.int64(step), np.int32(last), self.ticket)


def make_dataset(rows: MicroBatchRows, column_names: Sequence[str]):
    """``GeneratorDataset`` over ``rows`` in order (no shuffling, one worker: the order is the plan)."""
    import mindspore.dataset as mds

    names = list(column_names) + list(EXTRA_COLUMNS)
    return mds.GeneratorDataset(rows, column_names=names, shuffle=False, num_parallel_workers=1,
                                python_multiprocessing=False)


def _host(value) -> np.ndarray:
    return value.asnumpy() if isinstance(value, Tensor) else np.asarray(value)


class DPTrainStep(nn.Cell):
    """The DP step as the network of ``mindspore.train.Model`` (rows of :class:`MicroBatchRows`).

    Runs on the host, so ``__call__`` bypasses graph compilation; the per-example gradients inside
    are compiled in either execution mode.  Returns the mean loss of the step's real examples on its
    last row, 0 on the others.
    """

    def __init__(self, dp_optimizer, guard, ticket: int):
        super().__init__(auto_prefix=False)
        self.dp = dp_optimizer
        self.guard = guard
        self.ticket = int(ticket)
        self.last_stats = None
        self._open_step = None

    def __call__(self, *columns):
        if len(columns) < len(EXTRA_COLUMNS) + 1:
            raise SamplingMismatch(
                f"DPTrainStep got {len(columns)} columns; it trains on the rows of engine.dataset(...) "
                f"(data columns followed by {', '.join(EXTRA_COLUMNS)}), not on another pipeline")
        *data, mask, step, last, ticket = columns
        if int(_host(ticket)) != self.ticket:
            raise SamplingMismatch(
                "this row was not drawn by the sampler this engine accounts for (its ticket differs); "
                "train on engine.dataset(...) of the same engine")
        step = int(_host(step))
        if step != self.guard.steps_taken:
            raise SamplingMismatch(f"row of step {step} arrived while the engine is at step "
                                   f"{self.guard.steps_taken}; rows must come in the sampler's order")
        if self._open_step is None:
            self.guard.check_next()
            self._open_step = step
        self.dp.accumulate([_host(d) for d in data], _host(mask))
        if not int(_host(last)):
            return Tensor(np.float32(0.0))
        self._open_step = None
        self.last_stats = self.dp.apply()
        return Tensor(np.float32(self.last_stats.loss if self.last_stats.batch_size else 0.0))

    def construct(self, *columns):  # pragma: no cover - __call__ is used
        raise RuntimeError("DPTrainStep runs on the host; call it, do not compile it")
