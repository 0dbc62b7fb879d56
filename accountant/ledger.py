"""Privacy ledger for training: what was spent, and whether more steps fit the budget.

The ledger records the mechanism of each step (noise, sensitivity, geometry, Poisson rate) with a
count; heterogeneous runs (a change of rate or noise midway) compose exactly through
:func:`accountant.certify.certify`.  ``steps_remaining`` answers "how many more steps of this
mechanism fit the budget?" by bisection on certified epsilons and caches the answer, so a training
loop can stop BEFORE the budget would be exceeded at the cost of one comparison per step.

:class:`IncrementalEpsilon` (``ledger.epsilon_bound()``) answers "epsilon after each step" in O(1)
amortised certificates: it certifies the run only at geometric checkpoints of its length and reports,
for step t, the certificate of the next checkpoint c >= t.  Composition never lowers epsilon (the
first t releases are a post-processing of the first c), so eps(t) <= eps(c): a valid upper bound,
exact at every checkpoint and at the planned last step.

It also records how the run sampled (``sampling``: ``poisson`` or ``shuffle``) and the neighbouring
relation its epsilon is about (``relation``: ``add/remove``, ``zero-out`` or ``substitution``;
``accountant.shuffle``, docs/privacy.md Section 7).  Under ``shuffle`` an entry is one epoch.
"""
from __future__ import annotations

import json
import math

from accountant.certify import Accuracy, certify, pld_epsilon
from accountant.mechanism import Mechanism
from accountant import laws
from accountant.noise import Noise
from accountant.shuffle import check_sampling

LEDGER_VERSION = 1


def _noise_to_json(noise: Noise) -> dict:
    return laws.to_json(noise)


def _noise_from_json(data: dict) -> Noise:
    return laws.from_json(data)


class PrivacyLedger:
    def __init__(self, delta: float, epsilon_budget: float | None = None, *,
                 sampling: str = "poisson", relation: str | None = None, accuracy: Accuracy = Accuracy()):
        """``accuracy`` holds the numerical settings of every certificate, among them the memory
        budget of its grids (``Accuracy(memory_budget=...)``)."""
        self.accuracy = accuracy
        self.relation = check_sampling(sampling, relation)
        self.sampling = sampling
        if not 0 < delta < 1:
            raise ValueError(f"delta must lie in (0, 1), got {delta}")
        if epsilon_budget is not None and not epsilon_budget > 0:
            raise ValueError(f"epsilon budget must be positive, got {epsilon_budget}")
        self.delta = float(delta)
        self.epsilon_budget = epsilon_budget
        self._entries: list[list] = []       # [mechanism with steps=1, count]
        self._cache: dict = {}

    # --- recording ----------------------------------------------------------------------------
    def record(self, mechanism: Mechanism, count: int = 1) -> None:
        if count < 1 or int(count) != count:
            raise ValueError("count must be a positive integer")
        step = mechanism.with_steps(1)
        if self._entries and self._same(self._entries[-1][0], step):
            self._entries[-1][1] += int(count)
        else:
            self._entries.append([step, int(count)])
        self._cache.pop("epsilon", None)

    @staticmethod
    def _same(a: Mechanism, b: Mechanism) -> bool:
        return a.describe() == b.describe() and _noise_to_json(a.noise) == _noise_to_json(b.noise)

    @property
    def steps(self) -> int:
        return sum(count for _, count in self._entries)

    def mechanisms(self) -> list[Mechanism]:
        return [m.with_steps(c) for m, c in self._entries]

    # --- queries ------------------------------------------------------------------------------
    def epsilon(self) -> float:
        """Certified epsilon spent so far (0 before the first step)."""
        if not self._entries:
            return 0.0
        if "epsilon" not in self._cache:
            self._cache["epsilon"] = certify(self.mechanisms(), self.delta, self.accuracy).epsilon
        return self._cache["epsilon"]

    def epsilon_bound(self) -> float:
        """Certified upper bound on the epsilon spent so far at O(1) amortised cost per step (see
        :class:`IncrementalEpsilon`); ``epsilon()`` is the exact certificate of the steps taken."""
        if not hasattr(self, "_incremental"):
            self._incremental = IncrementalEpsilon(self)
        return self._incremental.epsilon()

    def _split(self, mechanism: Mechanism):
        """(earlier mechanisms, length of the current run of ``mechanism`` at the end)."""
        items = self.mechanisms()
        if items and self._same(items[-1].with_steps(1), mechanism.with_steps(1)):
            return items[:-1], items[-1].steps
        return items, 0

    def epsilon_after(self, n: int, mechanism: Mechanism) -> float:
        """Certified epsilon if ``n`` more steps of ``mechanism`` were taken."""
        prefix, run = self._split(mechanism)
        return certify(prefix + [mechanism.with_steps(run + n)], self.delta, self.accuracy).epsilon

    def steps_remaining(self, mechanism: Mechanism) -> int:
        """Largest n with certified epsilon after n more steps <= budget.  The longest affordable run
        of ``mechanism`` after the earlier entries is found once by bisection and cached, so a
        training loop pays one comparison per step."""
        if self.epsilon_budget is None:
            return math.inf
        prefix, run = self._split(mechanism)
        key = json.dumps([_noise_to_json(mechanism.noise), mechanism.with_steps(1).describe(),
                          [[_noise_to_json(m.noise), m.describe()] for m in prefix]], sort_keys=True)
        if key not in self._cache:
            def fits(n, quick):
                mechs = prefix + [mechanism.with_steps(n)]
                eps = (pld_epsilon(mechs, self.delta, self.accuracy) if quick
                       else certify(mechs, self.delta, self.accuracy).epsilon)
                return eps <= self.epsilon_budget

            def longest_run(lo, hi, quick):   # fits(lo) holds, fits(hi) fails
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    lo, hi = (mid, hi) if fits(mid, quick) else (lo, mid)
                return lo

            if not fits(1, False):
                longest = 0
            else:
                # the PLD bound alone is fast and never above the certificate: search with it, then
                # settle the exact boundary with full certificates inside the PLD answer
                lo, hi = 1, 2
                while hi <= 10 ** 8 and fits(hi, True):
                    lo, hi = hi, hi * 2
                guess = longest_run(lo, hi, True)
                low = max(1, int(guess * 0.97))
                while low > 1 and not fits(low, False):
                    low = max(1, low // 2)
                longest = longest_run(low, guess + 1, False) if not fits(guess, False) else guess
            self._cache[key] = longest
        return max(self._cache[key] - run, 0)

    def can_take(self, n: int, mechanism: Mechanism) -> bool:
        """True when n more steps of ``mechanism`` keep the certified epsilon within budget."""
        if self.epsilon_budget is None:
            return True
        return n <= self.steps_remaining(mechanism)

    # --- serialisation ------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({
            "ledger_version": LEDGER_VERSION, "delta": self.delta, "epsilon_budget": self.epsilon_budget,
            "sampling": self.sampling, "relation": self.relation,
            "entries": [{"mechanism": {**m.describe(), "noise": _noise_to_json(m.noise)}, "count": c}
                        for m, c in self._entries],
            "epsilon_spent": self.epsilon(),
        }, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "PrivacyLedger":
        data = json.loads(text)
        if data.get("ledger_version") != LEDGER_VERSION:
            raise ValueError(f"unsupported ledger version {data.get('ledger_version')!r}")
        ledger = cls(data["delta"], data.get("epsilon_budget"), sampling=data.get("sampling", "poisson"),
                     relation=data.get("relation"))
        for entry in data["entries"]:
            m = entry["mechanism"]
            mech = Mechanism(_noise_from_json(m["noise"]), m["sensitivity"], m["geometry"],
                             m["sampling_rate"], 1, records_per_unit=m.get("records_per_unit", 1),
                             sampling=m.get("sampling", "poisson"), relation=m.get("relation"))
            ledger.record(mech, entry["count"])
        return ledger


class IncrementalEpsilon:
    """Epsilon after every step of a :class:`PrivacyLedger`, in O(1) amortised certificates.

    The ledger's last entry (the current run of one mechanism, ``r`` steps after a fixed prefix) is
    certified only at run lengths on a geometric grid c_0 = 1, c_{i+1} = max(c_i + 1, ceil(c_i *
    growth)), and at ``horizon`` (the planned total steps of the ledger, if given); ``epsilon()``
    returns the certificate of the smallest checkpoint c >= r.  The first r releases are a
    post-processing of the first c (drop the rest), so eps(r) <= eps(c) (the data-processing
    inequality of the hockey-stick divergence): a valid upper bound, equal to the certificate at every
    checkpoint.  Over a run of T steps it certifies about log(T) / log(growth) times: O(1) per step
    amortised; with growth 2^(1/4) a bound is at most that of 19% more steps.
    """

    def __init__(self, ledger: PrivacyLedger, growth: float = 2 ** 0.25, horizon: int | None = None):
        if not growth > 1:
            raise ValueError(f"growth must exceed 1, got {growth}")
        self.ledger, self.growth, self.horizon = ledger, float(growth), horizon
        self._values: dict = {}
        #: certificates computed so far (the amortised cost)
        self.certificates = 0

    def checkpoint(self, run: int, prefix_steps: int = 0) -> int:
        """The run length at which a run of ``run`` steps after ``prefix_steps`` is certified."""
        c = 1
        while c < run:
            c = max(c + 1, math.ceil(c * self.growth))
        if self.horizon is not None and run <= self.horizon - prefix_steps:
            c = min(c, self.horizon - prefix_steps)
        return c

    def epsilon(self) -> float:
        """Certified upper bound on the epsilon of the ledger's steps so far (0 before the first)."""
        entries = self.ledger._entries
        if not entries:
            return 0.0
        prefix = self.ledger.mechanisms()[:-1]
        last, run = entries[-1]
        c = self.checkpoint(run, sum(m.steps for m in prefix))
        key = json.dumps([[_noise_to_json(m.noise), m.describe()] for m in prefix + [last.with_steps(c)]],
                         sort_keys=True)
        if key not in self._values:
            self._values[key] = certify(prefix + [last.with_steps(c)], self.ledger.delta,
                                        self.ledger.accuracy).epsilon
            self.certificates += 1
        return self._values[key]
