"""Split a corpus across organisations so that every person lives in exactly one organisation.

A record names the persons of its ``people`` list and its ``user`` (the ids ``finetune.data``
writes). A corpus without those ids falls back to the ``name`` values of its ``pii`` field: that
misses a person mentioned by e-mail only and merges persons with equal names, so write the corpus
with ids. Records sharing a person are linked; the connected components of that graph (union-find) are the
units that are assigned to organisations, so no person's records are spread over two organisations
(client-level DP then protects everything about a person at once, docs/federated.md).  Records with
no named person are their own component.  Components are dealt to the ``k`` organisations largest
first, each to the organisation with the fewest records so far (balanced, deterministic given the
seed that orders ties).

Components are organisations here, never privacy units of person-level DP: under the relation
"remove every record naming one person", removing a person who bridges two groups of records
splits a component, so one person's removal changes several units
(:func:`refuse_component_units`). On the 1000-record corpus of the README (60 persons) all named
records form a single component anyway.
"""
from __future__ import annotations

import numpy as np

__all__ = ["person_components", "split_by_person", "refuse_component_units"]


def _people(record) -> list:
    if "people" in record or "user" in record:
        return [("id", type(x).__name__, x)
                for x in ([record["user"]] if "user" in record else []) + list(record.get("people", ()))]
    return [("name", v) for kind, v in record.get("pii", ()) if kind == "name"]


def refuse_component_units(reason: str = "") -> None:
    """Raise the one-line refusal for person-level DP over connected components of records.

    Under "remove every record naming person X", removing X can split X's component into several
    (X was the bridge), so X's removal changes several units and unit-level accounting of one unit
    does not cover X. Person units must be disjoint by construction: records naming one person
    (``finetune.data.single_owner_records``) or record-level sampling with person accounting."""
    raise ValueError("person-level DP cannot sample connected components of records as units: "
                     "removing one person can split a component into several"
                     + (f" ({reason})" if reason else "")
                     + "; use the records that name one person or record-level sampling")


def person_components(records) -> np.ndarray:
    """Component label of every record (records sharing a named person get the same label)."""
    parent = list(range(len(records)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_seen: dict[str, int] = {}
    for i, r in enumerate(records):
        for name in _people(r):
            j = first_seen.setdefault(name, i)
            a, b = find(i), find(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return np.array([find(i) for i in range(len(records))], dtype=np.int64)


def split_by_person(records, k: int, seed: int = 0) -> list[np.ndarray]:
    """Indices of ``records`` held by each of ``k`` organisations (see module docstring)."""
    if int(k) < 1:
        raise ValueError(f"the number of organisations must be >= 1, got {k}")
    labels = person_components(records)
    comps, sizes = np.unique(labels, return_counts=True)
    tie = np.random.default_rng(seed).permutation(len(comps))
    order = np.lexsort((tie, -sizes))
    load = np.zeros(int(k), dtype=np.int64)
    owner = {}
    for c in order:
        org = int(np.argmin(load))
        owner[int(comps[c])] = org
        load[org] += sizes[c]
    shards = [[] for _ in range(int(k))]
    for i, lab in enumerate(labels):
        shards[owner[int(lab)]].append(i)
    return [np.asarray(s, dtype=np.int64) for s in shards]
