"""Unit-level (e.g. person-level) Poisson sampling and the unit-major micro-batch layout.

A *privacy unit* is a set of rows (all records of one person, say) that neighbouring datasets differ
in as a whole.  User-level sampling ("ULS" in Charles et al., "Fine-Tuning Large Language Models with
User-Level Differential Privacy", arXiv 2407.07737, SaTML 2025):

1. every unit joins a step independently with probability ``q = batch_size / n_units`` (Poisson over
   units, from the engine's secret sampling generator);
2. a sampled unit contributes at most ``m = max_rows_per_unit`` rows, chosen by a unit-local rule:
   all its rows when it has at most ``m``, else a uniformly random ``m``-subset drawn afresh from the
   sampling generator at every step (the choice depends on the unit alone, never on other units);
3. the unit's summed gradient ``G_u = sum_{i in chosen(u)} g_i`` is clipped *as one* to ``C``
   (``finetune.dp.per_example``, ``rows_per_unit=m``); the clipped sums plus noise are divided by the
   expected number of units ``q * n_units``, fixed before training (public).

Removing a unit removes one summand of norm ``<= C`` that is present with probability ``q``: the
Poisson-subsampled pair of a record-level run with ``q`` taken over units (Zhu, Dong & Wang 2022),
so the existing certificate applies with no new math (docs/privacy.md).

Layout: a step's batch is a ``[units, m]`` array of row indices, ``-1`` marking padding, so the rows
of a unit are contiguous.  :func:`unit_micro_batches` cuts it into micro-batches of whole units
(``micro_units * m`` rows; padding rows repeat row 0 with mask 0): a unit is never split across two
compiled calls, which would clip its parts separately.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from accountant.randomness import raw_words

from .sampling import MicroBatch, PoissonSampler

__all__ = ["UnitLayout", "UnitSampler", "unit_micro_batches", "UnitConfigError", "person_counts",
           "person_report", "record_epsilon_of_unit_run", "record_epsilon_text", "corpus_units",
           "CorpusUnits", "MULTI_OWNER"]


class UnitConfigError(ValueError):
    """The unit ids or the per-unit row cap do not describe a unit-level run."""


class UnitLayout:
    """The rows of each unit: ``unit_ids`` gives one id (int or str) per row of the dataset.

    ``n_units`` is the number of distinct ids; ``rows[u]`` the sorted row indices of unit ``u``
    (units in order of first appearance); ``max_rows_per_unit`` the cap ``m``.
    """

    def __init__(self, unit_ids: Sequence, max_rows_per_unit, dataset_size: int | None = None):
        if max_rows_per_unit is None:
            raise UnitConfigError("max_rows_per_unit is required with unit_ids (the most rows a unit "
                                  "contributes to one step)")
        if isinstance(max_rows_per_unit, bool) or int(max_rows_per_unit) != max_rows_per_unit \
                or int(max_rows_per_unit) < 1:
            raise UnitConfigError(f"max_rows_per_unit must be a positive integer, got {max_rows_per_unit!r}")
        ids = list(unit_ids)
        if dataset_size is not None and len(ids) != int(dataset_size):
            raise UnitConfigError(f"unit_ids has {len(ids)} entries but dataset_size is {dataset_size}: "
                                  "give one unit id per row")
        if not ids:
            raise UnitConfigError("unit_ids is empty")
        index: dict = {}
        for row, uid in enumerate(ids):
            if uid is None or isinstance(uid, float):
                raise UnitConfigError(f"row {row} has unit id {uid!r}; unit ids must be ints or strings")
            index.setdefault(uid, []).append(row)
        self.max_rows_per_unit = int(max_rows_per_unit)
        self.rows = [np.asarray(r, dtype=np.int64) for r in index.values()]
        self.sizes = np.asarray([r.size for r in self.rows], dtype=np.int64)
        self.n_units = len(self.rows)
        self.dataset_size = len(ids)
        self.ids = ids

    def choose(self, units: np.ndarray, rng) -> np.ndarray:
        """``[len(units), m]`` row indices of the sampled ``units`` (``-1`` = padding).

        A unit with more than ``m`` rows contributes a uniformly random ``m``-subset: its rows are
        ranked by fresh 64-bit words from ``rng`` and the ``m`` smallest kept (ties have probability
        below ``2^-64`` per pair and are broken by position)."""
        m = self.max_rows_per_unit
        out = np.full((len(units), m), -1, dtype=np.int64)
        big = [k for k, u in enumerate(units) if self.sizes[u] > m]
        words = raw_words(rng, int(self.sizes[units[big]].sum())) if big else None
        pos = 0
        for k, u in enumerate(units):
            rows = self.rows[u]
            if rows.size > m:
                keys = words[pos:pos + rows.size]
                pos += rows.size
                rows = np.sort(rows[np.argsort(keys, kind="stable")[:m]])
            out[k, :rows.size] = rows
        return out


class UnitSampler:
    """Poisson sampling over units (rate ``q``), each sampled unit's rows by the unit-local rule.

    :meth:`sample` returns the step's ``[units, m]`` layout (``-1`` padding).  One generator draws the
    unit coins and the row subsets (the engine's secret sampling generator)."""

    def __init__(self, layout: UnitLayout, sampling_rate: float, steps: int, *, rng):
        self.layout = layout
        self.units = PoissonSampler(layout.n_units, sampling_rate, steps, rng=rng)
        self.rng = rng
        self.sampling_rate, self.steps = self.units.sampling_rate, self.units.steps

    @property
    def position(self) -> int:
        return self.units.position

    @property
    def expected_batch_size(self) -> float:
        """``q * n_units``: the divisor of the noisy sum (public, fixed before training)."""
        return self.sampling_rate * self.layout.n_units

    def sample(self) -> np.ndarray:
        return self.layout.choose(self.units.sample(), self.rng)

    def state_dict(self) -> dict:
        """The unit coins' sampler state (its generator also draws the row subsets) and the layout's
        shape; a secure generator's key is never saved (``PoissonSampler.state_dict``)."""
        return {"units": self.units.state_dict(), "rows": self.layout.dataset_size,
                "max_rows_per_unit": self.layout.max_rows_per_unit}

    def load_state_dict(self, state: dict) -> None:
        if "units" not in state or (int(state["rows"]), int(state["max_rows_per_unit"])) != (
                self.layout.dataset_size, self.layout.max_rows_per_unit):
            raise ValueError("the saved sampler state is not of this unit-level run (units, rows or "
                             "max_rows_per_unit differ)")
        self.units.load_state_dict(state["units"])

    def __iter__(self):
        for _ in range(self.steps):
            yield self.sample()

    def __len__(self) -> int:
        return self.steps


def unit_micro_batches(layout: np.ndarray, micro_units: int) -> list[MicroBatch]:
    """Micro-batches of ``micro_units`` whole units each (``micro_units * m`` rows, unit-major).

    Row ``k * m + j`` of a micro-batch is row ``j`` of its ``k``-th unit; padding rows (a unit's
    unused slots, or whole padding units at the end) are row 0 with mask 0.  An empty step gives one
    all-padding micro-batch (the noise-only step is still taken)."""
    u = int(micro_units)
    if u < 1:
        raise ValueError(f"micro_units must be >= 1, got {micro_units}")
    layout = np.asarray(layout, dtype=np.int64)
    if layout.ndim != 2:
        raise ValueError("a unit layout is a [units, rows_per_unit] array")
    m = layout.shape[1]
    out = []
    for c in range(max(1, -(-layout.shape[0] // u))):
        part = np.full((u, m), -1, dtype=np.int64)
        chunk = layout[c * u:(c + 1) * u]
        part[:chunk.shape[0]] = chunk
        flat = part.reshape(-1)
        mask = (flat >= 0).astype(np.float32)
        out.append(MicroBatch(np.where(flat >= 0, flat, 0), mask))
    return out


def person_counts(record_people: Sequence) -> dict:
    """How many rows name each person (``record_people[i]``: the person ids of row ``i``)."""
    counts: dict = {}
    for row, people in enumerate(record_people):
        if isinstance(people, (str, bytes, int)) or people is None:
            raise ValueError(f"record_people[{row}] must be a list of person ids")
        if len(set(people)) != len(people):
            raise ValueError(f"record_people[{row}] names a person twice")
        for p in people:
            counts[p] = counts.get(p, 0) + 1
    return counts


def person_report(epsilon: float, mechanism, delta: float, *, unit: str, sampling: str,
                  record_people=None, person_cap: int | None = None) -> dict:
    """``person_epsilon``, ``person_k``, ``person_method`` and ``record_epsilon`` of a run (fail
    closed: ``None`` and why).

    ``epsilon`` is the run's record- or unit-level epsilon (its certificate, or what was spent),
    ``mechanism`` the per-step ``accountant.mechanism.Mechanism`` with its step count.

    * unit-level run: removing a unit is the certified neighbouring relation, so the person-level
      epsilon *is* ``epsilon`` (units = persons), method ``"unit-level"``; its ``record_epsilon``
      (one record changed) is larger (:func:`record_epsilon_of_unit_run`);
    * record-level Poisson run with ``record_people``: ``k`` = the most rows naming one person (or the
      declared ``person_cap``, refused if a person exceeds it).  ``k = 1`` is the record-level pair
      itself.  ``k > 1`` needs the person-level accountant ``accountant.person`` (the privacy loss
      of ``k`` independently sampled records); without it no number is reported, never a guess.
    """
    if unit != "record":
        return {"person_epsilon": float(epsilon), "person_k": None, "person_method": "unit-level",
                "record_epsilon": record_epsilon_of_unit_run(epsilon, mechanism, delta)}
    return {"record_epsilon": float(epsilon)} | _record_run_person_report(
        epsilon, mechanism, delta, sampling, record_people, person_cap)


def record_epsilon_of_unit_run(epsilon: float, mechanism, delta: float) -> float | None:
    """The record-level epsilon of a unit-level run (docs/privacy.md, section 9, "One record of a
    unit-level run"): the larger of ``epsilon`` (a unit's only record removed removes the unit) and
    the certificate of the substitution pair of section 10 with ``gamma = q`` at sensitivity ``2C``
    (a record removed or added inside a unit that stays moves that unit's clipped sum, of norm
    ``<= C`` before and after, by at most ``2C``, and only in the steps that sample the unit, with
    probability ``q`` independently of the other units; Balle, Barthe & Gaboardi 2018).  ``None``
    when the accountant refuses the pair (no guess)."""
    from accountant.certify import CertificationError, certify
    from accountant.mechanism import Mechanism, UnsupportedMechanism

    try:
        within = Mechanism(mechanism.noise, 2 * mechanism.sensitivity, mechanism.geometry,
                           mechanism.sampling_rate, mechanism.steps, sampling="fixed")
        return max(float(epsilon), float(certify(within, delta).epsilon))
    except (CertificationError, UnsupportedMechanism):
        return None


def record_epsilon_text(record_epsilon) -> str:
    """A unit-level run's ``record_epsilon``, as the summaries print it."""
    if record_epsilon is None:
        return "record-level epsilon: not computed"
    return f"record-level epsilon {record_epsilon:.4f} (one record changed inside its unit)"


def _record_run_person_report(epsilon, mechanism, delta, sampling, record_people, person_cap) -> dict:
    if record_people is None:
        return {"person_epsilon": None, "person_k": None,
                "person_method": "no person ids for the records"}
    counts = person_counts(record_people)
    k = max(counts.values(), default=0)
    if person_cap is not None:
        if isinstance(person_cap, bool) or int(person_cap) != person_cap or person_cap < 1:
            raise ValueError(f"person_cap must be a positive integer, got {person_cap!r}")
        if k > person_cap:
            raise ValueError(f"a person is named in {k} records, more than the declared person_cap "
                             f"{person_cap}")
        k = int(person_cap)
    if k == 0:
        return {"person_epsilon": None, "person_k": 0, "person_method": "no record names a person"}
    if sampling != "poisson":
        return {"person_epsilon": None, "person_k": k,
                "person_method": f"no person-level accountant for {sampling} sampling"}
    if k == 1:
        return {"person_epsilon": float(epsilon), "person_k": 1,
                "person_method": "one record per person (the record-level certificate)"}
    from accountant.person import person_epsilon

    try:
        cert = person_epsilon(mechanism, delta=delta, k=k)
        return {"person_epsilon": float(cert.epsilon), "person_k": int(cert.k),
                "person_method": str(cert.method)}
    except ValueError as exc:   # a refusal of the accountant: no number rather than a guess
        return {"person_epsilon": None, "person_k": k,
                "person_method": f"person-level accountant failed ({type(exc).__name__}: {exc})"}


MULTI_OWNER = ("record-sampling", "drop")


@dataclass
class CorpusUnits:
    """How a corpus's training records become a run (``corpus_units``).

    ``keep``: indices of the records trained on (``None``: all); ``unit_ids``: one unit id per kept
    record for a unit-level run (``None``: record-level); ``record_people``: per kept record its
    person ids, for the person-level report of a record-level run (``None``: not known);
    ``source``: ``"user"`` or ``"people"``; ``dropped``: records left out and why (``note``)."""

    keep: np.ndarray | None = None
    unit_ids: list | None = None
    record_people: list | None = None
    source: str | None = None
    dropped: int = 0
    note: str = ""


def corpus_units(record_people, privacy_unit: str = "record", multi_owner: str | None = None, *,
                 source: str = "people") -> CorpusUnits:
    """The privacy unit of a run whose training record ``i`` names the persons ``record_people[i]``
    (its ``user``, the owner, first, then the persons its ``people`` names: what
    ``finetune.data.record_people`` reads and checks; ``None`` when the records do not say whom
    they name, which only a record-level run accepts).  ``source`` (``"user"`` when every record
    has an owner, else ``"people"``) is where the units come from, for the note.

    ``record``: every record trained; ``record_people`` for the person-level report when some
    record names somebody.  ``person``: the unit of a record is its one person.  A record naming
    several people (an owner and someone else, or two people) has no single owner: ``multi_owner``
    must be ``"record-sampling"`` (record-level sampling of every record, person-level accounting
    with k = the most records naming one person) or ``"drop"`` (unit-level over the records naming
    exactly one person; the rule looks at each record alone, so removing a person removes exactly
    their records).  Records naming nobody have no unit and are dropped from a unit-level run."""
    if record_people is not None and not all(isinstance(p, (list, tuple)) for p in record_people):
        raise TypeError("corpus_units takes the persons of each record (finetune.data.record_people), "
                        "not the records")
    if privacy_unit == "record":
        people = None if record_people is None or not any(record_people) else list(record_people)
        return CorpusUnits(record_people=people)
    if privacy_unit != "person":
        raise UnitConfigError(f"privacy unit must be 'record' or 'person', got {privacy_unit!r}")
    if record_people is None:
        raise UnitConfigError("person units need every record to say whom it names ('user' or 'people')")
    people = list(record_people)
    multi = sum(len(p) >= 2 for p in people)
    if multi and multi_owner is None:
        raise UnitConfigError(
            f"{multi} of {len(people)} training records name several people; choose --multi-owner "
            "record-sampling (every record, record-level sampling, person-level accounting) or drop "
            "(person units over the records naming one person)")
    if multi_owner not in (None, *MULTI_OWNER):
        raise UnitConfigError(f"multi-owner must be one of {MULTI_OWNER}, got {multi_owner!r}")
    if multi_owner == "record-sampling":
        return CorpusUnits(record_people=people, source=source)
    keep = np.asarray([i for i, p in enumerate(people) if len(p) == 1], dtype=np.int64)
    if keep.size == 0:
        raise UnitConfigError("no training record names exactly one person: nothing to train on "
                              "with person units")
    nobody = sum(len(p) == 0 for p in people)
    note = (f"{len(people) - keep.size} of {len(people)} training records dropped ({multi} naming several "
            f"people, {nobody} naming nobody)") if keep.size < len(people) else ""
    return CorpusUnits(keep=keep, unit_ids=[people[i][0] for i in keep], source=source,
                       dropped=int(len(people) - keep.size), note=note)
