"""Epsilon after each step, for the progress bar: a cheap upper bound, computed off the hot path.

The certificate of a run (``PrivacyLedger.epsilon``, both accountants) takes seconds; the progress
bar needs a number after every step.  :class:`EpsilonTrace` composes the one-step pessimistic
privacy-loss distribution (PLD route of docs/privacy.md, connect-the-dots discretisation, both
neighbouring relations) with itself step after step on a coarse loss grid, in a background thread,
and reports for step ``k`` the smaller of that upper bound and the certified epsilon of the whole
planned run (epsilon never decreases with more steps, so both bound the epsilon of ``k`` steps).
A coarser grid only makes the pessimistic bound larger, never smaller (dp-accounting's pessimistic
PMFs); the number printed at the end of the run is the full certificate from the ledger.
"""
from __future__ import annotations

import threading

__all__ = ["EpsilonTrace"]

#: loss-grid step of the display bound (the certificate uses 1e-4 or finer)
DISPLAY_STEP = 1e-3


class EpsilonTrace:
    """``trace.upper_bound(k)``: an upper bound on the epsilon of ``k`` steps of ``mechanism``."""

    def __init__(self, mechanism, delta: float, steps: int, ceiling: float):
        self.delta, self.steps, self.ceiling = float(delta), int(steps), float(ceiling)
        self._values: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(mechanism.with_steps(1),),
                                        daemon=True, name="epsilon-trace")
        self._thread.start()

    def _run(self, mechanism) -> None:
        try:
            from dp_accounting.pld import pld_pmf

            from accountant import routes
            from accountant.certify import _groups

            pair = _groups([mechanism])[0][0]
            one = {d: routes._pld_pmfs(pair, d, DISPLAY_STEP)[0] for d in routes.DIRECTIONS}
            current = dict(one)
            for k in range(1, self.steps + 1):
                if self._stop.is_set():
                    return
                if k > 1:
                    current = {d: pld_pmf.compose_pmfs(current[d], one[d], 1e-15) for d in current}
                self._values[k] = max(float(p.get_epsilon_for_delta(self.delta))
                                      for p in current.values())
        except Exception:  # a display aid: on any failure the bar shows the run's ceiling
            return

    def upper_bound(self, k: int) -> float:
        """Upper bound on the epsilon of ``k`` steps (the run's ceiling until it is computed)."""
        if k <= 0:
            return 0.0
        return min(self._values.get(int(k), self.ceiling), self.ceiling)

    def close(self) -> None:
        self._stop.set()
