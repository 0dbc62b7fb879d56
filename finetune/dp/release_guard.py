"""The hard stop for a run whose whole certificate is already known, for either sampling.

``ReleaseGuard`` charges the ledger one *release* at a time (``accountant.shuffle``): one step under
Poisson sampling, one epoch under shuffling (charged when the epoch's first step runs, so a partial
epoch is counted in full).  The run's certificate covers ``steps`` steps; the guard raises
``PrivacyBudgetExceeded`` before step ``steps + 1`` and refuses batches from another sampling than
the one accounted (docs/soundness.md rule 7).  It has the interface ``DPOptimizer`` and
``PrivacyBudgetCallback`` use (``check_next``, ``record_step``, ``remaining``).  It is the one guard of
every training path (``make_private``, ``train()``, the CLI, the federated clients).

A table's *claim* (the epsilon written in it) may be given as ``cap``: the run then stops before the
first release that would take its certificate above the claim (a forged or stale claim shortens the
run instead of being exceeded), and a claim that not even one release fits is refused at once.

:class:`StepCounter` is the same interface without a ledger, for the non-private baseline.
"""
from __future__ import annotations

import logging
import threading

from accountant.ledger import IncrementalEpsilon, PrivacyLedger
from accountant.mechanism import Mechanism
from accountant.shuffle import releases

from .guard import PrivacyBudgetExceeded

__all__ = ["ReleaseGuard", "SamplingMismatch", "StepCounter"]

#: relative slack when a run's certificate is compared with a table's claim (float round-off)
_CLAIM_RTOL = 1e-9
#: checkpoint growth of the per-step bound: it is at most the certificate of 19% more releases
_GROWTH = 2 ** 0.25

log = logging.getLogger(__name__)


class SamplingMismatch(ValueError):
    """A batch does not come from the sampler the certificate accounts for."""


class ReleaseGuard:
    def __init__(self, release: Mechanism, *, sampling: str, relation: str, steps: int,
                 steps_in_epoch: int | None, delta: float, budget: float,
                 expected_batch_size: float, cap: float | None = None):
        """``budget`` is the certified epsilon of all ``steps`` (the run's certificate); ``cap`` an
        optional smaller ceiling (a table's claim, see the module docstring)."""
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.release = release.with_steps(1)
        self.sampling, self.relation = sampling, relation
        self.steps = self.limit = int(steps)
        self.steps_in_epoch = steps_in_epoch
        self.delta, self.budget = float(delta), float(budget)
        self.expected_batch_size = float(expected_batch_size)
        self.sampling_rate = release.sampling_rate
        self.ledger = PrivacyLedger(self.delta, self.budget, sampling=sampling, relation=relation)
        self.steps_taken = 0
        self._eps_cache = (0, 0.0)
        self._bound = None
        self.epsilon_at_limit = self.budget
        if cap is not None and self.budget > float(cap) * (1 + _CLAIM_RTOL):
            self._cap_limit(float(cap))

    def _cap_limit(self, cap: float) -> None:
        """Lower ``limit`` to the releases whose certificate stays within ``cap`` (bisection)."""
        fits = PrivacyLedger(self.delta, cap * (1 + _CLAIM_RTOL)).steps_remaining(self.release)
        fits = min(int(fits), self._releases(self.steps))
        if fits == 0:
            raise PrivacyBudgetExceeded(
                f"the table cannot afford a single step: one step costs more than its budget epsilon "
                f"{cap:.4g} (delta {self.delta:g}); nothing was trained")
        self.limit = fits if self.steps_in_epoch is None else min(self.steps, fits * self.steps_in_epoch)
        self.epsilon_at_limit = float(PrivacyLedger(self.delta).epsilon_after(
            self._releases(self.limit), self.release))
        self.budget = self.epsilon_at_limit

    @classmethod
    def for_table(cls, table, *, dataset_size: int, steps: int | None = None) -> "ReleaseGuard":
        """The guard of a Poisson run over a certified table, for ``DPOptimizer(guard=...)`` used
        directly: ``check_table`` (rate, at most the table's steps, geometry), the certificate of
        this run re-computed from the table's law (never copied from its metadata), and the
        table's claim as a ceiling.  ``make_private(noise=table)`` builds the same guard."""
        from accountant.certify import certify
        from accountant.shuffle import check_sampling

        from .guard import certified_epsilon, check_table

        q, t = check_table(table, dataset_size=dataset_size, steps=steps)
        release = Mechanism(table.noise, 1.0, table.geometry, q, 1)
        cert = certify(release.with_steps(t), table.delta)
        return cls(release, sampling="poisson", relation=check_sampling("poisson", None), steps=t,
                   steps_in_epoch=None, delta=table.delta, budget=cert.epsilon,
                   expected_batch_size=q * int(dataset_size), cap=certified_epsilon(table))

    def stop_reason(self) -> str | None:
        """Why no further step is allowed although the run planned more (``None`` otherwise)."""
        if self.steps_taken < self.limit or self.limit >= self.steps:
            return None
        return f"the budget epsilon {self.budget:.4g} would be exceeded by the next step"

    def check_sampling(self, sampling: str) -> None:
        """Refuse a batch drawn by another sampling scheme than the accounted one."""
        if sampling != self.sampling:
            raise SamplingMismatch(
                f"this batch was drawn by {sampling!r} sampling but the certificate accounts for "
                f"{self.sampling!r} sampling; use the batches of the same engine")

    def remaining(self) -> int:
        return max(0, self.limit - self.steps_taken)

    def check_next(self) -> None:
        if self.steps_taken >= self.limit:
            raise PrivacyBudgetExceeded(
                f"privacy budget reached: the certificate (epsilon {self.budget:.4g}, delta "
                f"{self.delta:g}, {self.relation}) covers {self.limit} steps; stopping before step "
                f"{self.steps_taken + 1}")

    def _releases(self, steps: int) -> int:
        return releases(steps, self.sampling, self.steps_in_epoch)

    def record_step(self) -> None:
        self.check_next()
        new = self._releases(self.steps_taken + 1) - self._releases(self.steps_taken)
        if new:
            self.ledger.record(self.release, new)
        self.steps_taken += 1

    def epsilon_spent(self) -> float:
        """Certified epsilon of the releases charged so far (both accountants; cached per step
        count; seconds when the run is neither at its start nor at its end)."""
        if self.steps_taken == 0:
            return 0.0
        if self._releases(self.steps_taken) == self._releases(self.limit):
            return self.epsilon_at_limit  # the whole run: its certificate (same mechanism)
        if self._eps_cache[0] != self.steps_taken:
            self._eps_cache = (self.steps_taken, float(self.ledger.epsilon()))
        return self._eps_cache[1]

    def epsilon_bound(self) -> float:
        """An upper bound on :meth:`epsilon_spent`, cheap enough for every step (no certificate
        is computed on the caller's thread).

        0 before the first release; the run's certificate once its last release is charged; in
        between the smallest certificate known of a run of at least the releases so far: the planned
        run's, or one at a checkpoint of ``accountant.ledger.IncrementalEpsilon`` (computed in a
        background thread started on the first call, one checkpoint ahead).  Composing more releases
        of the same mechanism never lowers epsilon (the first releases are a post-processing of all
        of them), so each bounds the epsilon spent; never below the certificate of the releases so
        far."""
        done = self._releases(self.steps_taken)
        if done == 0:
            return 0.0
        if done == self._releases(self.limit):
            return self.epsilon_at_limit
        if self._eps_cache[0] == self.steps_taken and self.steps_taken:
            return self._eps_cache[1]   # already certified exactly
        if self._bound is None:
            self._bound = _CheckpointBound(self, self._releases(self.limit), self.epsilon_at_limit)
        return self._bound.upper_bound(done)

    def close(self) -> None:
        """Stop the background certificates of :meth:`epsilon_bound` (if they were started)."""
        if self._bound is not None:
            self._bound.close()

    # ---- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"steps_taken": self.steps_taken, "ledger": self.ledger.to_json()}

    def load_state_dict(self, state: dict) -> None:
        ledger = PrivacyLedger.from_json(state["ledger"])
        steps = int(state["steps_taken"])
        if (ledger.sampling, ledger.relation) != (self.sampling, self.relation):
            raise SamplingMismatch(
                f"the saved ledger accounts for {ledger.sampling!r} sampling under {ledger.relation}, "
                f"this engine for {self.sampling!r} under {self.relation}")
        if ledger.delta != self.delta:
            raise ValueError(f"the saved ledger is at delta {ledger.delta:g}, this engine at {self.delta:g}")
        if not 0 <= steps <= self.limit:
            raise ValueError(f"the saved state has {steps} steps; this engine's certificate covers "
                             f"{self.limit}")
        expected = [self.release.with_steps(self._releases(steps))] if steps else []
        got = ledger.mechanisms()
        same = len(got) == len(expected) and all(
            a.steps == b.steps and PrivacyLedger._same(a.with_steps(1), b.with_steps(1))
            for a, b in zip(got, expected))
        if not same:
            raise ValueError("the saved ledger does not hold the releases of this engine's mechanism "
                             f"for {steps} steps; it belongs to another run")
        ledger.epsilon_budget = self.budget
        self.ledger, self.steps_taken = ledger, steps
        self._eps_cache = (0, 0.0)


class _CheckpointBound:
    """Certificates of prefixes of the run at the checkpoints of
    :class:`accountant.ledger.IncrementalEpsilon`, computed in a daemon thread on its own ledger
    (the guard's ledger always holds ``done`` releases of one mechanism; the thread never reads it).

    ``upper_bound(done)`` returns at once: the smallest certificate known for ``done`` or more
    releases (the planned run's until a checkpoint's is ready).  The thread certifies the
    checkpoint covering the releases so far, then the next one, and waits for the run to move on."""

    def __init__(self, guard: "ReleaseGuard", horizon: int, ceiling: float):
        self.ledger = PrivacyLedger(guard.delta, sampling=guard.sampling, relation=guard.relation,
                                    accuracy=guard.ledger.accuracy)
        self.incremental = IncrementalEpsilon(self.ledger, growth=_GROWTH, horizon=horizon)
        self.release, self.horizon = guard.release, horizon
        self.known = {horizon: float(ceiling)}   # replaced, never mutated: read without the lock
        self.error: Exception | None = None
        self._done, self._stopped, self._busy = 0, False, False
        self._cv = threading.Condition()
        threading.Thread(target=self._run, daemon=True, name="epsilon-bound").start()

    def upper_bound(self, done: int) -> float:
        if done > self._done:
            with self._cv:
                self._done = done
                self._cv.notify_all()
        return min(eps for c, eps in self.known.items() if c >= done)

    def _next(self) -> int | None:
        """The checkpoint to certify next (the one covering the releases so far, else the one after
        it), or ``None`` when both are known, after an error or once closed."""
        if self._stopped or self.error is not None:
            return None
        c = self.incremental.checkpoint(max(self._done, 1))
        if c in self.known:
            c = self.incremental.checkpoint(c + 1)
        return None if c in self.known or not self.ledger.steps < c < self.horizon else c

    def _run(self) -> None:
        while True:
            with self._cv:
                while (c := self._next()) is None:
                    if self._stopped or self.error is not None:
                        return
                    self._cv.wait()
                self.ledger.record(self.release, c - self.ledger.steps)
                self._busy = True
            try:
                eps = float(self.incremental.epsilon())
            except Exception as exc:   # the bound stays valid: the planned run's certificate
                log.warning("the per-step epsilon bound stays at the run's certificate: %s", exc)
                eps, self.error = None, exc
            with self._cv:
                if eps is not None:
                    self.known = {**self.known, c: eps}
                self._busy = False
                self._cv.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every checkpoint the thread would certify now is known (tests, benchmarks)."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._busy and self._next() is None, timeout)

    def close(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()


class StepCounter:
    """The guard interface for the non-private baseline: a step limit, no ledger, no epsilon."""

    sampling, relation, ledger = "poisson", None, None

    def __init__(self, steps: int, expected_batch_size: float):
        self.steps = self.limit = int(steps)
        self.steps_taken = 0
        self.expected_batch_size = float(expected_batch_size)

    def check_sampling(self, sampling: str) -> None:
        if sampling != self.sampling:
            raise SamplingMismatch(f"this batch was drawn by {sampling!r} sampling, not this run's")

    def remaining(self) -> int:
        return max(0, self.limit - self.steps_taken)

    def check_next(self) -> None:
        if self.steps_taken >= self.limit:
            raise PrivacyBudgetExceeded(f"all {self.limit} planned steps are taken")

    def record_step(self) -> None:
        self.check_next()
        self.steps_taken += 1

    def stop_reason(self):
        return None

    def epsilon_spent(self) -> float:
        return float("inf")

    epsilon_bound = epsilon_spent

    def close(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {"steps_taken": self.steps_taken, "ledger": None}

    def load_state_dict(self, state: dict) -> None:
        steps = int(state["steps_taken"])
        if not 0 <= steps <= self.limit:
            raise ValueError(f"the saved state has {steps} steps; this run plans {self.limit}")
        self.steps_taken = steps
