"""Privacy ledger wiring: the run must be the mechanism the table certifies, and stops before it isn't.

A noise table certifies ``T`` steps of the Poisson-subsampled mechanism with rate ``q``, noise law
``table.noise`` and clipping geometry ``table.geometry``, at ``(epsilon, delta)``.  A training run
is covered by that certificate only if it

* samples with the same rate ``q`` (Poisson, ``finetune.dp.sampling``; docs/soundness.md rule 7),
* takes at most ``T`` steps (composition: fewer steps never cost more), and
* clips in the table's geometry (``finetune.dp.optimizer.clip_geometry``).

:func:`check_table` refuses anything else with :class:`TableMismatchError`.  :class:`PrivacyGuard`
charges every step to an ``accountant.ledger.PrivacyLedger`` whose budget is the table's certified
epsilon and raises :class:`PrivacyBudgetExceeded` *before* a step that the certificate (or the
ledger) does not cover; :class:`PrivacyBudgetCallback` ends a ``mindspore.train.Model`` run at the
same point.
"""
from __future__ import annotations

__all__ = ["TableMismatchError", "PrivacyBudgetExceeded", "check_table", "PrivacyGuard",
           "PrivacyBudgetCallback", "certified_epsilon"]

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


class PrivacyGuard:
    """Charges each step to a ``PrivacyLedger`` and stops before the certified budget is exceeded.

    The per-step mechanism is the table's noise at sensitivity 1 (noise and clipping share the unit
    ``C``), geometry ``table.geometry``, rate ``q``, one step.  The number of steps allowed
    (``limit``) is the smaller of the run's steps (at most the table's ``T``) and what the ledger
    certifies within its budget (by default the table's certified epsilon; pass your own ledger for a
    smaller budget or one that already holds earlier releases).
    """

    def __init__(self, table, *, dataset_size: int, sampling_rate: float | None = None,
                 steps: int | None = None, ledger=None):
        from accountant.ledger import PrivacyLedger
        from accountant.mechanism import Mechanism

        self.table = table
        self.sampling_rate, self.steps = check_table(table, dataset_size=dataset_size,
                                                     sampling_rate=sampling_rate, steps=steps)
        self.dataset_size = int(dataset_size)
        self.delta = float(table.delta)
        self.budget = certified_epsilon(table)
        self.mechanism = Mechanism(table.noise, sensitivity=1.0, geometry=table.geometry,
                                   sampling_rate=self.sampling_rate, steps=1)
        self.ledger = ledger if ledger is not None else PrivacyLedger(self.delta, self.budget)
        if self.ledger.epsilon_budget is None:
            raise ValueError("the guard's ledger needs an epsilon budget")
        self.steps_taken = 0
        self._eps_cache = (-1, 0.0)
        # One certification up front: does the whole run fit the ledger's budget?  If not (a ledger
        # with earlier entries or a smaller budget), find how many steps do (bisection, slower).
        self.limit = self.steps
        self.epsilon_at_limit = float(self.ledger.epsilon_after(self.steps, self.mechanism))
        if self.epsilon_at_limit > float(self.ledger.epsilon_budget):
            self.limit = min(self.steps, int(self.ledger.steps_remaining(self.mechanism)))
            self.epsilon_at_limit = (float(self.ledger.epsilon_after(self.limit, self.mechanism))
                                     if self.limit else float(self.ledger.epsilon()))

    @property
    def expected_batch_size(self) -> float:
        return self.sampling_rate * self.dataset_size

    def remaining(self) -> int:
        """Steps that may still be taken within the certificate and the ledger's budget."""
        return max(0, self.limit - self.steps_taken)

    def stop_reason(self) -> str | None:
        """Why no further step is allowed although the run planned more (``None`` otherwise)."""
        if self.steps_taken < self.limit or self.limit >= self.steps:
            return None
        return (f"the budget epsilon {float(self.ledger.epsilon_budget):.4g} would be exceeded by "
                "the next step")

    def check_next(self) -> None:
        """Raise :class:`PrivacyBudgetExceeded` if one more step is not covered."""
        if self.steps_taken >= self.limit:
            raise PrivacyBudgetExceeded(
                f"privacy budget reached: {self.steps_taken} steps taken; the budget (epsilon "
                f"{float(self.ledger.epsilon_budget):.4g}, delta {self.delta:g}, table certified for "
                f"{self.steps} steps at rate {self.sampling_rate:g}) covers {self.limit}; "
                f"stopping before step {self.steps_taken + 1}")

    def record_step(self) -> None:
        self.check_next()
        self.ledger.record(self.mechanism)
        self.steps_taken += 1

    def epsilon_spent(self) -> float:
        """Certified epsilon of everything the ledger holds (earlier releases, steps restored from a
        checkpoint and the steps taken here), cached per ledger length."""
        steps = self.ledger.steps
        if self._eps_cache[0] != steps:
            self._eps_cache = (steps, float(self.ledger.epsilon()))
        return self._eps_cache[1]

    def restore(self, ledger) -> None:
        """Continue this run from its own saved ledger (a checkpoint): every entry must be this
        guard's per-step mechanism at its delta and budget; the steps it holds count as taken, so
        ``remaining()`` and ``epsilon_spent()`` continue where the run stopped."""
        from accountant.ledger import PrivacyLedger

        if (ledger.delta != self.delta or ledger.epsilon_budget is None
                or float(ledger.epsilon_budget) != float(self.ledger.epsilon_budget)):
            raise ValueError("the saved ledger has another delta or budget than this run")
        if self.ledger.steps:
            raise ValueError("this guard's ledger already holds steps; restore into a new guard")
        if any(not PrivacyLedger._same(m.with_steps(1), self.mechanism) for m in ledger.mechanisms()):
            raise ValueError("the saved ledger holds another mechanism than this run's table")
        if ledger.steps > self.limit:
            raise PrivacyBudgetExceeded(f"the saved ledger holds {ledger.steps} steps, more than the "
                                        f"{self.limit} this run's budget covers")
        self.ledger = ledger
        self.steps_taken = ledger.steps


try:  # the callback is only defined when mindspore is importable
    from mindspore.train import Callback as _Callback
except Exception:  # pragma: no cover - mindspore missing
    _Callback = object


class PrivacyBudgetCallback(_Callback):
    """``mindspore.train.Model`` callback: ends training when no further step is covered.

    Checked at the end of every step, so the step that would exceed the certificate never starts.
    A ``Model.train`` that begins with no step left (the budget was spent by an earlier call) raises
    :class:`PrivacyBudgetExceeded` at once.  Keep the guard on the optimizer too: it raises if a
    step is tried anyway.
    """

    def __init__(self, guard: PrivacyGuard):
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
