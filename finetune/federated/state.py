"""The federation's record on disk: privacy ledger, global adapter and round history.

One round of DP-FedAvg is one release of the Poisson-subsampled mechanism the table certifies
(noise law, geometry, rate ``q`` = client rate, sensitivity 1 in units of the clipping norm).  The
ledger (``accountant.ledger.PrivacyLedger``, budget = the table's certified epsilon) is charged
*before* the new global adapter is published, and the files are written in this order, each to a
temporary sibling and renamed into place (``os.replace`` is atomic on POSIX):

1. ``ledger.json``  -- the privacy record (same format as a ``python -m finetune`` run);
2. ``global.safetensors`` -- the global adapter after the round (float64, with its SHA-256);
3. ``federation.json`` -- round counter, configuration, per-round history, the global's SHA-256.

A crash between 1 and 3 leaves a ledger that has charged a round whose result was never published;
the resumed server redoes the round and charges it again (over-counting is safe, under-counting is
not).  A ledger that holds *fewer* releases than ``federation.json`` was tampered with or lost, and
is refused.

Noise and client sampling come, by default, from a ChaCha20 generator keyed from the OS
(``accountant.randomness.SecureRandom``) with a fresh key for every round: no key is ever written
to disk, so a restarted server draws with new keys, never replays an earlier draw, and nobody can
regenerate the noise from the run folder.  Only when the user gives a seed (experiments, with a
warning) do release ``r``'s draws come from a generator seeded with ``(seed, r)``; a redone round
then uses the next release number, so it never reuses an earlier draw either.  The configuration
records ``secure`` (true/false) and the seed only when one was given.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from accountant.ledger import PrivacyLedger
from accountant.mechanism import Mechanism
from accountant.randomness import make_rng

from finetune.run_dir import atomic_write

__all__ = ["FederationState", "StateError", "atomic_write", "round_rng", "STATE_VERSION"]

STATE_VERSION = 1
BUDGET_RTOL = 1e-9
LEDGER_FILE, GLOBAL_FILE, STATE_FILE = "ledger.json", "global.safetensors", "federation.json"


class StateError(ValueError):
    """A saved federation cannot be resumed (one line for the user)."""




def round_rng(seed: int | None, release: int, stream: int, secure: bool = False):
    """Generator for release number ``release`` (0-based) and ``stream`` (0 sampling, 1 noise).

    ``seed=None`` (or ``secure``): a new OS-keyed ChaCha20 generator, whatever the release number
    (nothing about it is stored, so a resumed server re-keys).  A seed: PCG64 seeded with
    ``(seed, release, stream)``, reproducible by anyone who knows the seed."""
    if secure or seed is None:
        return make_rng(secure=True)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(release),
                                                                        int(stream)])))


def _digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name], dtype="<f8")
        h.update(name.encode() + b"\0" + json.dumps(list(a.shape)).encode() + a.tobytes())
    return h.hexdigest()


@dataclass
class FederationState:
    """Everything the server must remember between rounds (and across a restart)."""

    directory: Path
    ledger: PrivacyLedger
    mechanism: Mechanism                 # one round: table noise, sensitivity 1, geometry, rate q
    global_params: dict                  # name -> float64 array
    config: dict                         # what must not change on resume
    rounds_done: int = 0
    history: list = field(default_factory=list)
    _fits_until: int | None = field(default=None, repr=False)

    # --- the privacy record -----------------------------------------------------------------
    @property
    def releases(self) -> int:
        return self.ledger.steps

    def epsilon(self) -> float:
        return float(self.ledger.epsilon())

    def can_release(self, max_releases: int) -> bool:
        """True when one more round stays within the table's T and the ledger's budget (the
        certified epsilon after one more release, both accountants, against the budget).

        The budget is the table's stored certificate; re-certifying the same mechanism can land
        a few 1e-13 above it (floating-point summation order), so "within" allows a relative
        ``BUDGET_RTOL`` = 1e-9 -- far below any printed digit, and a table whose claim is lower
        than its recomputed certificate by more than that still stops early."""
        if self.releases >= int(max_releases):
            return False
        budget = self.ledger.epsilon_budget
        if budget is None:
            return True
        budget = float(budget) * (1 + BUDGET_RTOL)
        # One certification covers the rest of the run: the ledger only grows by this mechanism,
        # and fewer rounds never cost more, so once "all remaining rounds fit" holds, every later
        # prefix fits too.  Otherwise certify one more round at a time.
        if self._fits_until != int(max_releases):
            rest = int(max_releases) - self.releases
            if self.ledger.epsilon_after(rest, self.mechanism) > budget:
                return self.ledger.epsilon_after(1, self.mechanism) <= budget
            self._fits_until = int(max_releases)
        return True

    def charge_and_save(self, new_global: dict, round_record: dict) -> None:
        """Charge one release, then publish the new global adapter and the history (see module)."""
        self.ledger.record(self.mechanism)
        atomic_write(self.directory / LEDGER_FILE, self.ledger.to_json().encode())
        self.global_params = {k: np.asarray(v, np.float64) for k, v in new_global.items()}
        self.rounds_done += 1
        self.history.append(dict(round_record, round=self.rounds_done, releases=self.releases))
        self.save()

    def save(self) -> None:
        from safetensors.numpy import save

        digest = _digest(self.global_params)
        blob = save({k: np.ascontiguousarray(v, np.float64) for k, v in self.global_params.items()},
                    metadata={"sha256": digest})
        atomic_write(self.directory / GLOBAL_FILE, blob)
        body = {"state_version": STATE_VERSION, "config": self.config, "rounds_done": self.rounds_done,
                "releases": self.releases, "global_sha256": digest, "history": self.history}
        atomic_write(self.directory / STATE_FILE, json.dumps(body, indent=1).encode())
        if not (self.directory / LEDGER_FILE).exists():
            atomic_write(self.directory / LEDGER_FILE, self.ledger.to_json().encode())

    # --- creation and resume ----------------------------------------------------------------
    @classmethod
    def create(cls, directory, table, initial_params: dict, config: dict,
               sampling_rate: float) -> "FederationState":
        mech = Mechanism(table.noise, 1.0, table.geometry, float(sampling_rate), 1)
        ledger = PrivacyLedger(table.delta, table.certified_epsilon)
        state = cls(Path(directory), ledger, mech,
                    {k: np.asarray(v, np.float64) for k, v in initial_params.items()}, dict(config))
        state.save()
        return state

    @classmethod
    def load(cls, directory, table, config: dict, sampling_rate: float) -> "FederationState":
        from safetensors import safe_open
        from safetensors.numpy import load_file

        directory = Path(directory)
        try:
            body = json.loads((directory / STATE_FILE).read_text())
            ledger = PrivacyLedger.from_json((directory / LEDGER_FILE).read_text())
            with safe_open(str(directory / GLOBAL_FILE), framework="numpy") as f:
                meta = f.metadata() or {}
            params = load_file(str(directory / GLOBAL_FILE))
        except (OSError, ValueError, KeyError) as e:
            raise StateError(f"cannot resume the federation in {directory}: {e}") from None
        if body.get("state_version") != STATE_VERSION:
            raise StateError(f"{directory}: unsupported federation state version "
                             f"{body.get('state_version')!r}")
        changed = sorted(k for k in config if body["config"].get(k) != config[k])
        if changed:
            raise StateError(f"{directory}: cannot resume with a different "
                             f"{', '.join(changed)} than the interrupted federation")
        digest = _digest(params)
        if digest != body.get("global_sha256") or digest != meta.get("sha256"):
            raise StateError(f"{directory}: the global adapter does not match its checksum")
        if ledger.steps < int(body["releases"]):
            raise StateError(f"{directory}: the ledger records {ledger.steps} rounds but the federation "
                             f"released {body['releases']}; refusing to resume with a shortened "
                             "privacy record")
        if abs(ledger.delta - table.delta) > 0 or ledger.epsilon_budget != table.certified_epsilon:
            raise StateError(f"{directory}: the saved ledger's delta/budget do not match the table")
        mech = Mechanism(table.noise, 1.0, table.geometry, float(sampling_rate), 1)
        for m in ledger.mechanisms():
            if not PrivacyLedger._same(m.with_steps(1), mech):
                raise StateError(f"{directory}: the saved ledger holds a different mechanism")
        return cls(directory, ledger, mech, {k: np.asarray(v, np.float64) for k, v in params.items()},
                   dict(body["config"]), int(body["rounds_done"]), list(body.get("history", [])))
