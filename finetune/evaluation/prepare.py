"""Insert canaries into a training corpus before fine-tuning (for exposure and the one-run audit).

    python -m finetune.evaluation.prepare --data data.jsonl --out data_canaries.jsonl \
        [--exposure-canaries 10 --digits 6 --repeats 1] [--audit-canaries 200] [--seed 0]

Two kinds of canaries, both added as ``split: "train"`` records:
- *exposure* canaries (Carlini et al. 2019): "My secret access code is 4 9 3 0 2 7." with a secret
  drawn uniformly from 10^digits; always inserted, ``--repeats`` times each. A DP guarantee covers
  one record; with repeats > 1 it covers them only through group privacy (k * eps).
- *audit* canaries (Steinke, Nasr, Jagielski 2023): random word sequences, each inserted with
  probability 1/2 by an independent fair coin; the coins are the secret the audit guesses.

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


def load_truth(path) -> dict:
    with open(path, encoding="utf-8") as f:
        t = json.load(f)
    if t.get("format") != "canaries-v1":
        raise ValueError(f"{path}: not a canary ground-truth file (format canaries-v1)")
    if len(t["audit_texts"]) != len(t["audit_included"]):
        raise ValueError(f"{path}: audit texts and inclusion bits differ in length")
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
        write_jsonl(recs, a.out)                       # atomic
        atomic_write(a.out + SIDE_SUFFIX, json.dumps(truth, indent=1).encode())
    except (ValueError, OSError) as e:
        sys.stderr.write(f"{p.prog}: error: {e}\n")
        return 2
    print(f"wrote {len(recs)} records to {a.out} ({a.exposure_canaries} x {a.repeats} exposure "
          f"canaries, {sum(truth['audit_included'])} of {a.audit_canaries} audit canaries); "
          f"ground truth in {os.path.basename(a.out + SIDE_SUFFIX)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
