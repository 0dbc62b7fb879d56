"""Table checks and the budget stop: the run must be the mechanism the table certifies.

A noise table certifies ``T`` steps of the Poisson-subsampled mechanism with rate ``q``, noise law
``table.noise`` and clipping geometry ``table.geometry``, at ``(epsilon, delta)``.  A training run
is covered by that certificate only if it

* samples with the same rate ``q`` (Poisson, ``finetune.dp.sampling``; docs/soundness.md rule 7),
* takes at most ``T`` steps (composition: fewer steps never cost more), and
* clips in the table's geometry (``finetune.dp.optimizer.clip_geometry``).

:func:`check_table` refuses anything else with :class:`TableMismatchError`.  The one guard of every
training path is ``finetune.dp.release_guard.ReleaseGuard`` (built by ``finetune.make_private``): it
charges every release to an ``accountant.ledger.PrivacyLedger`` and raises
:class:`PrivacyBudgetExceeded` *before* a step that the certificate does not cover;
:class:`PrivacyBudgetCallback` ends a ``mindspore.train.Model`` run at the same point.
"""
from __future__ import annotations

__all__ = ["TableMismatchError", "PrivacyBudgetExceeded", "check_table", "PrivacyBudgetCallback",
           "certified_epsilon"]

_RATE_RTOL = 1e-12


class TableMismatchError(ValueError):
    """The run is not the mechanism the table certifies."""


class PrivacyBudgetExceeded(RuntimeError):
    """The next step would exceed what the certificate covers."""


def certified_epsilon(table) -> float:
    """The table's final certified epsilon (the larger upper bound of the two accountants)."""
    eps = table.certified_epsilon
    if isinstance(eps, dict):
        eps = eps["final"]
    return float(eps)


def check_table(table, *, dataset_size: int, sampling_rate: float | None = None,
                steps: int | None = None) -> tuple[float, int]:
    """Return the run's ``(q, steps)``, taken from the table unless given; refuse a mismatch."""
    q_table, t_table = float(table.sampling_rate), int(table.steps)
    if table.geometry not in ("l1", "l2", "scalar"):
        raise TableMismatchError(f"table geometry {table.geometry!r} is not one of l1, l2, scalar")
    if int(dataset_size) < 1:
        raise TableMismatchError("the dataset is empty")
    q = q_table if sampling_rate is None else float(sampling_rate)
    if abs(q - q_table) > _RATE_RTOL * q_table:
        raise TableMismatchError(
            f"sampling rate {q:g} does not match the table's certified rate {q_table:g}; "
            "omit the rate to use the table's, or search/certify a table for this rate")
    t = t_table if steps is None else int(steps)
    if t < 1:
        raise TableMismatchError(f"steps must be >= 1, got {t}")
    if t > t_table:
        raise TableMismatchError(
            f"{t} steps requested but the table certifies only {t_table} steps at rate {q_table:g}; "
            "use at most that many steps or a table certified for more")
    if q * int(dataset_size) < 1.0:
        raise TableMismatchError(
            f"expected batch size q*N = {q:g}*{int(dataset_size)} = {q * int(dataset_size):.3g} "
            "is below one example; use more data or a table with a larger sampling rate")
    return q, t


try:  # the callback is only defined when mindspore is importable
    from mindspore.train import Callback as _Callback
except Exception:  # pragma: no cover - mindspore missing
    _Callback = object


class PrivacyBudgetCallback(_Callback):
    """``mindspore.train.Model`` callback: ends training when no further step is covered.

    ``guard`` is the engine's ``ReleaseGuard`` (``engine.callback()`` builds this callback).
    Checked at the end of every step, so the step that would exceed the certificate never starts.
    A ``Model.train`` that begins with no step left (the budget was spent by an earlier call) raises
    :class:`PrivacyBudgetExceeded` at once.  Keep the guard on the optimizer too: it raises if a
    step is tried anyway.
    """

    def __init__(self, guard):
        super().__init__()
        self.guard = guard
        self.stopped = False

    def _maybe_stop(self, run_context):
        if self.guard.remaining() == 0:
            self.stopped = True
            run_context.request_stop()

    def on_train_begin(self, run_context):
        if self.guard.remaining() == 0:
            self.stopped = True
            self.guard.check_next()         # raises PrivacyBudgetExceeded: nothing left to train

    def on_train_step_end(self, run_context):
        self._maybe_stop(run_context)
