"""The hard stop for a run whose whole certificate is already known, for either sampling.

``ReleaseGuard`` charges the ledger one *release* at a time (``accountant.shuffle``): one step under
Poisson sampling, one epoch under shuffling (charged when the epoch's first step runs, so a partial
epoch is counted in full).  The run's certificate covers ``steps`` steps; the guard raises
``PrivacyBudgetExceeded`` before step ``steps + 1`` and refuses batches from another sampling than
the one accounted (docs/soundness.md rule 7).  It has the interface ``DPOptimizer`` and
``PrivacyBudgetCallback`` use (``check_next``, ``record_step``, ``remaining``).
"""
from __future__ import annotations

from accountant.ledger import PrivacyLedger
from accountant.mechanism import Mechanism
from accountant.shuffle import releases

from .guard import PrivacyBudgetExceeded

__all__ = ["ReleaseGuard", "SamplingMismatch"]


class SamplingMismatch(ValueError):
    """A batch does not come from the sampler the certificate accounts for."""


class ReleaseGuard:
    def __init__(self, release: Mechanism, *, sampling: str, relation: str, steps: int,
                 steps_in_epoch: int | None, delta: float, budget: float,
                 expected_batch_size: float):
        """``budget`` is the certified epsilon of all ``steps`` (the run's certificate)."""
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
        """Certified epsilon of the releases charged so far (cached per step count)."""
        if self.steps_taken == 0:
            return 0.0
        if self._releases(self.steps_taken) == self._releases(self.limit):
            return self.budget          # the whole run: its certificate is the budget (same mechanism)
        if self._eps_cache[0] != self.steps_taken:
            self._eps_cache = (self.steps_taken, float(self.ledger.epsilon()))
        return self._eps_cache[1]

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
