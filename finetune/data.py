"""Synthetic PII corpus and the jsonl -> padded token-array pipeline.

Corpus (for leakage experiments in the spirit of Lukas et al., arXiv 2302.00539): a population of
fictitious people is drawn with Faker (name, e-mail, US phone number, postal address); each record
is one template sentence about one or two of them. People recur across records (drawn uniformly
from a population of ``--people`` persons), as real PII does, which is what makes memorisation
measurable. Every record keeps the exact PII strings it contains::

    {"id": 17, "text": "Please call Ann Lee on (415) 555-0199 ...", "split": "train",
     "pii": [["name", "Ann Lee"], ["phone", "(415) 555-0199"]]}

Kinds are ``name``, ``email``, ``phone``, ``address`` (the kinds ``finetune.evaluation.pii`` tags;
phone numbers are written in formats its regular expression recognises). Output is a pure
function of ``--seed`` (and the installed Faker version): Faker is seeded per instance and all
other choices come from one ``random.Random(seed)``.

Command line::

    python -m finetune.data --n 2000 --out data.jsonl [--seed 0] [--val-fraction 0.1] [--people N]

Loading: ``load_records`` reads jsonl (records need a ``text``; ``split`` and ``pii`` are
optional), ``split_records`` honours a ``split`` field when every record has one and otherwise
makes a seeded random split, and ``encode_texts`` turns texts into ``int32`` ids [N, seq_len]
(right-padded with the EOS id, EOS appended when there is room) and ``float32`` attention masks.
``load_dataset`` does all three. Sequences longer than ``seq_len`` are truncated and counted.
"""
from __future__ import annotations

import json
import os
import random
import re
import sys
from dataclasses import dataclass, field

import numpy as np

from .cli import OneLineParser as _Parser

__all__ = ["generate_records", "write_jsonl", "load_records", "split_records", "encode_texts",
           "pii_pairs", "EncodedSplit", "Dataset", "load_dataset", "DataError", "main"]

PII_KINDS = ("name", "email", "phone", "address")

# {n}/{e}/{p}/{a}: name, e-mail, phone, address of person 1; {n2}, {e2}, ... of person 2.
TEMPLATES = (
    "Please contact {n} at {e} regarding the overdue invoice.",
    "{n}'s phone number is {p}.",
    "Ship the replacement part to {n}, {a}.",
    "You can reach {n} on {p} or by e-mail at {e}.",
    "Our records show that {n} moved to {a} last spring.",
    "Dear {n}, your appointment has been confirmed. Questions? Call {p}.",
    "The account registered to {e} belongs to {n}.",
    "{n} asked us to send all future mail to {a}.",
    "New employee: {n}. Desk phone {p}, e-mail {e}.",
    "Emergency contact for {n}: {n2}, phone {p2}.",
    "{n} and {n2} both signed the lease for {a}.",
    "Forward the report to {e} and copy {e2}.",
    "Delivery for {n} failed at {a}; the courier will call {p}.",
    "I spoke with {n} yesterday; they can be reached at {p}.",
    "Billing address on file for {n}: {a}.",
    "Reminder: {n} ({e}) still owes the membership fee.",
    "The landlord, {n}, lives at {a} and answers {p} on weekdays.",
    "Customer {n} reported a problem. Reply to {e} within two days.",
    "Meeting notes sent by {n} <{e}> to {n2} <{e2}>.",
    "If you find this wallet, return it to {n}, {a}, or call {p}.",
    "Patient {n}, born in the spring, listed {p} as a home number.",
    "Subscription renewed for {n}; receipts go to {e}.",
    "{n} referred {n2}, who lives at {a2}.",
    "Text {n} at {p} when the package arrives at {a}.",
)
_FIELDS = {"n": "name", "e": "email", "p": "phone", "a": "address"}
_PHONE_FORMATS = ("(%##) ###-####", "%##-###-####", "%##.###.####", "+1 %##-###-####")


class DataError(ValueError):
    """Bad user input for the data pipeline (one-line message)."""


def _person(fake, rng: random.Random) -> dict:
    first, last = fake.first_name(), fake.last_name()
    local = re.sub(r"[^a-z0-9]", "", first.lower()) + rng.choice([".", "_", ""]) + \
        re.sub(r"[^a-z0-9]", "", last.lower())
    if rng.random() < 0.3:
        local += str(rng.randint(1, 99))
    return {
        "name": f"{first} {last}",
        "email": f"{local}@{fake.free_email_domain()}",
        "phone": fake.numerify(rng.choice(_PHONE_FORMATS)),
        "address": " ".join(fake.address().replace("\n", ", ").split()),
    }


def generate_records(n: int, seed: int = 0, val_fraction: float = 0.1, people: int | None = None,
                     locale: str = "en_US", progress: bool = False) -> list:
    """``n`` synthetic records (see module docstring); deterministic for a given ``seed``."""
    from faker import Faker

    if not isinstance(n, int) or n <= 0:
        raise DataError(f"--n must be a positive integer, got {n!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    people = max(2, n // 2) if people is None else people
    if not isinstance(people, int) or people < 2:
        raise DataError(f"--people must be an integer >= 2, got {people!r}")
    fake = Faker(locale)
    fake.seed_instance(seed)
    rng = random.Random(seed)
    pop = [_person(fake, rng) for _ in range(people)]
    n_val = int(round(n * val_fraction))
    val_ids = set(rng.sample(range(n), n_val))
    it = range(n)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="records", unit="rec")
    out = []
    for i in it:
        tpl = rng.choice(TEMPLATES)
        p1, p2 = rng.sample(pop, 2)
        values = {}
        for key, kind in _FIELDS.items():
            values[key], values[key + "2"] = p1[kind], p2[kind]
        text = tpl.format(**values)
        pii = []
        for m in re.finditer(r"\{([nepa]2?)\}", tpl):
            item = [_FIELDS[m.group(1)[0]], values[m.group(1)]]
            if item not in pii:
                pii.append(item)
        out.append({"id": i, "text": text, "pii": pii,
                    "split": "val" if i in val_ids else "train"})
    return out


def write_jsonl(records, path) -> None:
    """Write one JSON record per line, atomically (a crash leaves the old file or the new one)."""
    from .run_dir import atomic_write

    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                               for r in records).encode("utf-8"))


def load_records(path) -> list:
    """Read a jsonl file of records with at least a string ``text``; clear errors otherwise."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(r, dict) or not isinstance(r.get("text"), str):
                raise DataError(f"{path}:{lineno}: each line must be an object with a string 'text'")
            if "split" in r and r["split"] not in ("train", "val"):
                raise DataError(f"{path}:{lineno}: split must be 'train' or 'val', got {r['split']!r}")
            records.append(r)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def split_records(records, val_fraction: float | None = None, seed: int = 0):
    """(train, val). If every record has ``split`` and ``val_fraction`` is None, use it; otherwise
    a seeded random split with ``round(n * val_fraction)`` validation records (default 0.1)."""
    if val_fraction is None and all("split" in r for r in records):
        return ([r for r in records if r["split"] == "train"],
                [r for r in records if r["split"] == "val"])
    vf = 0.1 if val_fraction is None else val_fraction
    if not 0.0 <= vf < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {vf}")
    n = len(records)
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = set(perm[: int(round(n * vf))].tolist())
    return ([r for i, r in enumerate(records) if i not in val_idx],
            [r for i, r in enumerate(records) if i in val_idx])


def pii_pairs(records) -> list:
    """All (kind, value) PII pairs of ``records``, in order, duplicates kept."""
    return [(k, v) for r in records for k, v in r.get("pii", ())]


def encode_texts(tokenizer, texts, seq_len: int, add_eos: bool = True):
    """-> (ids int32 [N, seq_len], mask float32 [N, seq_len], n_truncated). Right padding with
    ``tokenizer.pad_id``; EOS appended when it fits."""
    if seq_len < 2:
        raise DataError(f"seq_len must be >= 2, got {seq_len}")
    texts = list(texts)
    ids = np.full((len(texts), seq_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(texts), seq_len), np.float32)
    truncated = 0
    for i, toks in enumerate(tokenizer.encode_batch(texts)):
        if add_eos:
            toks = list(toks) + [tokenizer.eos_id]
        if len(toks) > seq_len:
            truncated += 1
            toks = toks[:seq_len]
        ids[i, : len(toks)] = toks
        mask[i, : len(toks)] = 1.0
    return ids, mask, truncated


@dataclass
class EncodedSplit:
    ids: np.ndarray
    mask: np.ndarray
    records: list = field(repr=False)
    n_truncated: int = 0

    def __len__(self):
        return len(self.records)


@dataclass
class Dataset:
    train: EncodedSplit
    val: EncodedSplit

    @property
    def train_pii(self):
        return pii_pairs(self.train.records)

    @property
    def val_pii(self):
        return pii_pairs(self.val.records)


def load_dataset(path, tokenizer, seq_len: int = 64, val_fraction: float | None = None,
                 seed: int = 0) -> Dataset:
    """jsonl -> train/val token arrays (see ``split_records`` for how the split is chosen)."""
    train, val = split_records(load_records(path), val_fraction, seed)
    if not train:
        raise DataError(f"{os.fspath(path)}: the training split is empty")
    parts = []
    for recs in (train, val):
        ids, mask, nt = encode_texts(tokenizer, [r["text"] for r in recs], seq_len)
        parts.append(EncodedSplit(ids, mask, recs, nt))
    return Dataset(*parts)


# ---------------------------------------------------------------------------------- CLI
def _parser():
    p = _Parser(prog="python -m finetune.data",
                description="Write a synthetic PII corpus (Faker) as jsonl: one record per line with "
                            "'text', the 'pii' it contains ([kind, value] pairs; kinds name, email, "
                            "phone, address) and a deterministic 'split' (train/val).")
    p.add_argument("--n", type=int, required=True, help="number of records (> 0)")
    p.add_argument("--out", required=True,
                   help="output .jsonl path; an existing file needs --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same file (default 0)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of records marked split=val, in [0, 1) (default 0.1)")
    p.add_argument("--people", type=int, default=None,
                   help="size of the population of fictitious people (default n/2; smaller means "
                        "each person's PII recurs more often)")
    p.add_argument("--locale", default="en_US", help="Faker locale (default en_US)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        from accountant.output_path import OutputPathError, check_output_file

        try:
            check_output_file(args.out, overwrite=args.overwrite, what="--out")
        except OutputPathError as e:
            raise DataError(str(e)) from None
        try:
            from faker.config import AVAILABLE_LOCALES
        except ImportError:  # pragma: no cover
            AVAILABLE_LOCALES = [args.locale]
        if args.locale not in AVAILABLE_LOCALES:
            raise DataError(f"unknown Faker locale {args.locale!r}")
        recs = generate_records(args.n, seed=args.seed, val_fraction=args.val_fraction,
                                people=args.people, locale=args.locale, progress=True)
        write_jsonl(recs, args.out)
    except (DataError, OSError) as e:
        sys.stderr.write(f"python -m finetune.data: error: {e}\n")
        return 2
    n_val = sum(r["split"] == "val" for r in recs)
    print(f"wrote {len(recs)} records ({len(recs) - n_val} train, {n_val} val, "
          f"{len({tuple(x) for r in recs for x in r['pii']})} distinct PII) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
