"""Insert canaries into a training corpus before fine-tuning (for exposure and the one-run audit).

    python -m finetune.evaluation.prepare --data data.jsonl --out data_canaries.jsonl \
        [--exposure-canaries 10 --digits 6 --repeats 1] [--audit-canaries 200] [--seed 0]
        [--person-canaries]

Two kinds of canaries, both added as ``split: "train"`` records:
- *exposure* canaries (Carlini et al. 2019): "My secret access code is 4 9 3 0 2 7." with a secret
  drawn uniformly from 10^digits; always inserted, ``--repeats`` times each. A DP guarantee covers
  one record; with repeats > 1 it covers them only through group privacy (k * eps).
- *audit* canaries (Steinke, Nasr, Jagielski 2023): random word sequences, each inserted with
  probability 1/2 by an independent fair coin; the coins are the secret the audit guesses.
- *person* canaries (``--person-canaries``, a corpus split by person): one secret per person; for
  every training person it is added as one more record naming that person alone (so it counts
  towards the person's records and is covered by a person-level guarantee), for every held-out
  person it is drawn but never inserted (the never-seen comparison).

The ground truth goes to a sidecar JSON next to the output (``<out>.canaries.json``): all canary
texts, the inclusion bits and the secrets. Keep it away from training; ``finetune.evaluate`` reads
it (found automatically next to the run's data file, or given with ``--canaries``).
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from .canary import DEFAULT_TEMPLATE, make_canaries

_WORDS = ("amber", "basalt", "cobalt", "dune", "ember", "fjord", "garnet", "heron", "indigo",
          "juniper", "kelp", "lichen", "magma", "nectar", "onyx", "pollen", "quartz", "rust",
          "sable", "tundra", "umber", "violet", "willow", "xenon", "yarrow", "zephyr", "acorn",
          "birch", "cedar", "delta", "egret", "flint")

SIDE_SUFFIX = ".canaries.json"


def audit_canary_texts(m: int, rng, n_words: int = 8) -> list[str]:
    """m distinct random word sequences (32^8 ~ 10^12 possibilities each): unlikely by chance."""
    out, seen = [], set()
    while len(out) < m:
        t = "Reference phrase: " + " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), n_words)) + "."
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


def insert_canaries(records, n_exposure: int = 10, digits: int = 6, repeats: int = 1,
                    n_audit: int = 200, seed: int = 0):
    """(records with canaries appended, ground-truth dict). Input records are not modified."""
    rng = np.random.default_rng(seed)
    recs = [dict(r) for r in records]
    next_id = 1 + max((int(r.get("id", -1)) for r in recs if str(r.get("id", "")).lstrip("-").isdigit()),
                      default=len(recs))
    exp = make_canaries(n_exposure, digits, rng) if n_exposure else []
    aud = audit_canary_texts(n_audit, rng) if n_audit else []
    inc = (rng.random(len(aud)) < 0.5).tolist()
    added = [c.text for c in exp for _ in range(repeats)] + [t for t, i in zip(aud, inc) if i]
    for t in added:
        recs.append({"id": next_id, "text": t, "pii": [], "split": "train", "canary": True})
        next_id += 1
    truth = {"format": "canaries-v1", "seed": seed, "template": DEFAULT_TEMPLATE, "digits": digits,
             "repeats": repeats, "exposure_secrets": [c.secret for c in exp],
             "audit_texts": aud, "audit_included": [bool(i) for i in inc]}
    return recs, truth


def sided_persons(records):
    """``(training persons, held-out persons)``: persons named only in ``split: train`` records and
    persons named only in ``split: val`` records (canary records ignored), in order of appearance."""
    from finetune.data import DataError, record_people

    recs = [r for r in records if not r.get("canary")]
    try:
        people = record_people(recs)
    except DataError as e:
        raise ValueError(str(e)) from None
    side: dict = {}
    for r, who in zip(recs, people):
        for x in who:
            side.setdefault(x, set()).add(r.get("split"))
    return ([x for x, s in side.items() if s == {"train"}], [x for x, s in side.items() if s == {"val"}])


def insert_person_canaries(records, truth: dict, digits: int = 6, seed: int = 0):
    """Add one canary per training person (a record naming that person alone) and draw one for
    every held-out person; the secrets are distinct from each other and from the exposure canaries
    in ``truth``, which gets ``person_secrets`` and ``person_inserted``. Refused unless the corpus
    has persons on each side only (``python -m finetune.data --split person``)."""
    train_p, val_p = sided_persons(records)
    if not train_p or not val_p:
        raise ValueError("person canaries need persons seen only in training and persons never seen "
                         "in training: write the corpus with python -m finetune.data --split person")
    rng = np.random.default_rng([seed, 1])
    taken = {s.replace(" ", "") for s in truth.get("exposure_secrets", ())}
    cands = make_canaries(len(train_p) + len(val_p) + len(taken), digits, rng)
    cands = [c for c in cands if c.secret.replace(" ", "") not in taken][: len(train_p) + len(val_p)]
    recs = [dict(r) for r in records]
    next_id = 1 + max((int(r["id"]) for r in recs if isinstance(r.get("id"), int)), default=len(recs))
    for x, c in zip(train_p, cands):
        recs.append({"id": next_id, "text": c.text, "pii": [], "people": [x], "split": "train",
                     "canary": True})
        next_id += 1
    truth = dict(truth, person_secrets=[c.secret for c in cands],
                 person_inserted=[True] * len(train_p) + [False] * len(val_p))
    return recs, truth


def load_truth(path) -> dict:
    with open(path, encoding="utf-8") as f:
        t = json.load(f)
    if t.get("format") != "canaries-v1":
        raise ValueError(f"{path}: not a canary ground-truth file (format canaries-v1)")
    if len(t["audit_texts"]) != len(t["audit_included"]):
        raise ValueError(f"{path}: audit texts and inclusion bits differ in length")
    if len(t.get("person_secrets", ())) != len(t.get("person_inserted", ())):
        raise ValueError(f"{path}: person canary secrets and inclusion bits differ in length")
    return t


def main(argv=None) -> int:
    from finetune.cli import OneLineParser

    p = OneLineParser(prog="python -m finetune.evaluation.prepare",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="input corpus (.jsonl, e.g. from python -m finetune.data)")
    p.add_argument("--out", required=True, help="output corpus with canaries (.jsonl)")
    p.add_argument("--exposure-canaries", type=int, default=10, help="secret-sharer canaries (default 10)")
    p.add_argument("--digits", type=int, default=6, help="digits per secret: |R| = 10^digits (default 6)")
    p.add_argument("--repeats", type=int, default=1, help="insertions per exposure canary (default 1)")
    p.add_argument("--audit-canaries", type=int, default=200,
                   help="one-run-audit canaries, each included with probability 1/2 (default 200)")
    p.add_argument("--person-canaries", action="store_true",
                   help="one canary per person: added to the corpus for each training person, "
                        "drawn but withheld for each held-out person (needs a corpus split by "
                        "person)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (and its ground truth)")
    a = p.parse_args(argv)
    try:
        from accountant.output_path import atomic_write, check_output_file
        from finetune.data import load_records, write_jsonl

        check_output_file(a.out, overwrite=a.overwrite, what="--out")
        check_output_file(a.out + SIDE_SUFFIX, overwrite=a.overwrite, what="canary ground truth")

        if min(a.exposure_canaries, a.audit_canaries) < 0 or a.repeats < 1 or not 1 <= a.digits <= 12:
            raise ValueError("counts must be >= 0, repeats >= 1 and 1 <= digits <= 12")
        recs, truth = insert_canaries(load_records(a.data), a.exposure_canaries, a.digits, a.repeats,
                                      a.audit_canaries, a.seed)
        if a.person_canaries:
            recs, truth = insert_person_canaries(recs, truth, a.digits, a.seed)
        write_jsonl(recs, a.out)                       # atomic
        atomic_write(a.out + SIDE_SUFFIX, json.dumps(truth, indent=1).encode())
    except (ValueError, OSError) as e:
        sys.stderr.write(f"{p.prog}: error: {e}\n")
        return 2
    print(f"wrote {len(recs)} records to {a.out} ({a.exposure_canaries} x {a.repeats} exposure "
          f"canaries, {sum(truth['audit_included'])} of {a.audit_canaries} audit canaries"
          + (f", {sum(truth['person_inserted'])} person canaries inserted and "
             f"{len(truth['person_inserted']) - sum(truth['person_inserted'])} withheld"
             if a.person_canaries else "") + "); "
          f"ground truth in {os.path.basename(a.out + SIDE_SUFFIX)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
