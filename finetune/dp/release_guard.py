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

from accountant.ledger import PrivacyLedger
from accountant.mechanism import Mechanism
from accountant.shuffle import releases

from .guard import PrivacyBudgetExceeded

__all__ = ["ReleaseGuard", "SamplingMismatch", "StepCounter"]

#: relative slack when a run's certificate is compared with a table's claim (float round-off)
_CLAIM_RTOL = 1e-9


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
        self._trace = None
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
        """An upper bound on :meth:`epsilon_spent`, cheap enough for every step.

        0 before the first release; the run's certificate once its last release is charged; in
        between the smaller of the certificate of all planned releases (composing more releases of
        the same mechanism never lowers epsilon, so it bounds any prefix) and the coarse pessimistic
        PLD bound of ``finetune.dp.epsilon_trace`` (computed in a background thread, started on the
        first call).  Never below the certified epsilon of the releases so far."""
        done = self._releases(self.steps_taken)
        if done == 0:
            return 0.0
        if done == self._releases(self.limit):
            return self.epsilon_at_limit
        if self._eps_cache[0] == self.steps_taken and self.steps_taken:
            return self._eps_cache[1]   # already certified exactly
        if self._trace is None:
            from .epsilon_trace import EpsilonTrace
            self._trace = EpsilonTrace(self.release, self.delta, self._releases(self.limit),
                                       self.epsilon_at_limit)
        return self._trace.upper_bound(done)

    def close(self) -> None:
        """Stop the background bound of :meth:`epsilon_bound` (if one was started)."""
        if self._trace is not None:
            self._trace.close()

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
