"""Synthetic PII corpus and the jsonl -> padded token-array pipeline.

Corpus (for leakage experiments in the spirit of Lukas et al., arXiv 2302.00539): a population of
fictitious people is drawn with Faker (name, e-mail, US phone number, postal address); each record
is one template sentence about one or two of them. People recur across records (drawn uniformly
from a population of ``--people`` persons), as real PII does, which is what makes memorisation
measurable. Every record keeps the exact PII strings it contains and the persons it names
(``people``: population indices of the persons whose PII occurs in it)::

    {"id": 17, "text": "Please call Ann Lee on (415) 555-0199 ...", "split": "train",
     "pii": [["name", "Ann Lee"], ["phone", "(415) 555-0199"]], "people": [4]}

Persons (for person-level DP, docs/privacy.md): a record names the persons in its ``people`` list
and its optional ``user`` (owner); ``record_people`` reads them and refuses a record with PII but
neither field. ``--split person`` holds out persons instead of records: records naming persons of
both sides are dropped and counted, and no person is on both sides. ``single_owner_records`` keeps
the records naming exactly one person (person units); ``max_records_per_person`` and
``check_person_cap`` give the K of person-level accounting for record-level sampling. Selections
that cap each person's records are refused (``check_multi_owner_method``).

Kinds are ``name``, ``email``, ``phone``, ``address`` (the kinds ``finetune.evaluation.pii`` tags;
phone numbers are written in formats its regular expression recognises). Output is a pure
function of ``--seed`` (and the installed Faker version): Faker is seeded per instance and all
other choices come from one ``random.Random(seed)``.

Command line::

    python -m finetune.data --n 2000 --out data.jsonl [--seed 0] [--val-fraction 0.1] [--people N]
                            [--split {record,person}]

Loading: ``load_records`` reads jsonl (records need a ``text``; ``split``, ``pii``, ``people`` and
``user`` are optional and validated), ``split_records`` honours a ``split`` field when every record has one and otherwise
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
           "pii_pairs", "EncodedSplit", "Dataset", "load_dataset", "DataError", "main",
           "record_people", "split_by_person", "person_counts", "max_records_per_person",
           "check_person_cap", "single_owner_records", "greedy_contribution_bound",
           "rank_contribution_bound", "check_multi_owner_method", "MULTI_OWNER_METHODS"]

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
        # indices drawn exactly as rng.sample(pop, 2) draws its items: same stream, same texts
        i1, i2 = rng.sample(range(people), 2)
        p1, p2 = pop[i1], pop[i2]
        values = {}
        for key, kind in _FIELDS.items():
            values[key], values[key + "2"] = p1[kind], p2[kind]
        text = tpl.format(**values)
        pii, who = [], []
        for m in re.finditer(r"\{([nepa]2?)\}", tpl):
            item = [_FIELDS[m.group(1)[0]], values[m.group(1)]]
            if item not in pii:
                pii.append(item)
            person = i2 if m.group(1).endswith("2") else i1
            if person not in who:
                who.append(person)
        out.append({"id": i, "text": text, "pii": pii, "people": who,
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
            problem = _people_problem(r)
            if problem:
                raise DataError(f"{path}:{lineno}: {problem}")
            records.append(r)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def split_records(records, val_fraction: float | None = None, seed: int = 0, by: str = "record"):
    """(train, val).

    ``by="record"``: if every record has ``split`` and ``val_fraction`` is None, use it; otherwise
    a seeded random split with ``round(n * val_fraction)`` validation records (default 0.1).
    ``by="person"``: held-out *persons* (:func:`split_by_person`; records naming persons of both
    sides are dropped, that function returns their count)."""
    if by == "person":
        return split_by_person(records, val_fraction, seed)[:2]
    if by != "record":
        raise DataError(f"split must be by 'record' or 'person', got {by!r}")
    if val_fraction is None and all("split" in r for r in records):
        return ([r for r in records if r["split"] == "train"],
                [r for r in records if r["split"] == "val"])
    vf = _val_fraction(val_fraction)
    n = len(records)
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = set(perm[: int(round(n * vf))].tolist())
    return ([r for i, r in enumerate(records) if i not in val_idx],
            [r for i, r in enumerate(records) if i in val_idx])


def _val_fraction(val_fraction):
    vf = 0.1 if val_fraction is None else val_fraction
    if not 0.0 <= vf < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {vf}")
    return vf


def pii_pairs(records) -> list:
    """All (kind, value) PII pairs of ``records``, in order, duplicates kept."""
    return [(k, v) for r in records for k, v in r.get("pii", ())]


# ------------------------------------------------------------------------------ persons
# Person-level DP protects everyone a record names. The neighbouring relation is "remove every
# record that names one person X" (or add such records); see docs/privacy.md. A record names the
# persons in its ``people`` list (ids given by the corpus, never guessed from PII strings: equal
# names would merge two persons and an e-mail-only mention would be missed) and its ``user``.

def _is_id(x) -> bool:
    return isinstance(x, str) or (isinstance(x, int) and not isinstance(x, bool))


def _people_problem(r) -> str | None:
    """Why the ``people``/``user`` fields of record ``r`` are malformed (None if they are fine);
    the reason never quotes the record."""
    if "people" in r:
        ppl = r["people"]
        if not isinstance(ppl, list) or not all(_is_id(x) for x in ppl):
            return "'people' must be a list of person ids (integers or strings)"
        if len(set(map(_id_key, ppl))) != len(ppl):
            return "'people' lists a person twice"
    if "user" in r and not _is_id(r["user"]):
        return "'user' must be a person id (an integer or a string)"
    return None


def _id_key(x):
    return (type(x).__name__, x)   # 3 and "3" are different ids


def record_people(records) -> list:
    """The persons each record names, as a tuple per record: its ``user`` (the owner, if given)
    followed by its ``people``, without repeats. A record naming nobody gets ``()``.

    Refused (DataError naming the record's index, never its text): a record with PII but neither a
    ``people`` nor a ``user`` field, since person-level DP cannot protect a person it cannot see.
    """
    out = []
    for i, r in enumerate(records):
        problem = _people_problem(r)
        if problem:
            raise DataError(f"record {i}: {problem}")
        if "people" not in r and "user" not in r:
            if r.get("pii"):
                raise DataError(f"record {i} has PII but no 'people' field: person-level DP needs "
                                "to know whom each record names")
            out.append(())
            continue
        who = ([r["user"]] if "user" in r else []) + list(r.get("people", ()))
        seen, uniq = set(), []
        for x in who:
            if _id_key(x) not in seen:
                seen.add(_id_key(x))
                uniq.append(x)
        out.append(tuple(uniq))
    return out


def split_by_person(records, val_fraction: float | None = None, seed: int = 0):
    """``(train, val, n_dropped)`` with held-out persons: ``round(P * val_fraction)`` of the P
    persons (a seeded draw over the persons in order of first appearance) are validation persons.
    A record goes to ``train`` if all its persons are training persons, to ``val`` if all are
    validation persons, and is dropped (counted in ``n_dropped``) if it names persons of both
    sides. Records naming nobody are split at random with probability ``val_fraction``. No person
    is on both sides: validation persons were never seen in training."""
    vf = _val_fraction(val_fraction)
    people = record_people(records)
    order = list(dict.fromkeys(_id_key(x) for who in people for x in who))
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(order))
    val_people = {order[j] for j in perm[: int(round(len(order) * vf))].tolist()}
    coins = rng.random(len(records))
    train, val, dropped = [], [], 0
    for r, who, c in zip(records, people, coins):
        sides = {_id_key(x) in val_people for x in who}
        if len(sides) == 2:
            dropped += 1
        elif sides == {True} or (not sides and c < vf):
            val.append(r)
        else:
            train.append(r)
    return train, val, dropped


def person_counts(records) -> dict:
    """Number of records naming each person (the ``k_X`` of person-level accounting)."""
    counts: dict = {}
    for who in record_people(records):
        for x in who:
            counts[x] = counts.get(x, 0) + 1
    return counts


def max_records_per_person(records) -> int:
    """K = the largest number of records naming one person (0 if no record names anybody).

    For record-level Poisson sampling without any selection (the record-sampling method), the
    person-level guarantee of every person in the corpus is the one for K records: removing person
    X removes exactly the k_X <= K records naming X, whoever else they name, and nothing else
    changes (docs/privacy.md). K is computed from the private corpus; a declared public cap
    (:func:`check_person_cap`) avoids releasing it."""
    return max(person_counts(records).values(), default=0)


def check_person_cap(records, cap: int) -> int:
    """Refuse a corpus in which some person is named in more than the declared cap of records.

    The guarantee at a declared cap K holds on the corpora where every person is named in at most
    K records (restricted-domain DP): removing a person only lowers counts, but adding one could
    push a co-named person above K, which is outside that domain. Returns the corpus's K."""
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise DataError(f"the records-per-person cap must be an integer >= 1, got {cap!r}")
    counts = person_counts(records)
    over = sum(c > cap for c in counts.values())
    if over:
        raise DataError(f"{over} person(s) are named in more than the declared cap of {cap} records "
                        f"(largest count {max(counts.values())}); raise the cap or drop records")
    return max(counts.values(), default=0)


def single_owner_records(records) -> list:
    """The records that name exactly one person (the drop method for records naming several).

    The rule looks at each record alone, so for every person X it commutes with removing X:
    ``single_owner_records(D minus R_X) == single_owner_records(D) minus R_X``. The kept records have
    disjoint owners and can be sampled and clipped per person. Records naming several persons and
    records naming nobody are dropped; the caller reports how many."""
    return [r for r, who in zip(records, record_people(records)) if len(who) == 1]


# Contribution bounding by *selection* (keep a subset in which each person is named at most k
# times) is sound only when the record-person graph is public. Under the remove-person relation
# it is not: removing one person changes which other records the rule keeps. These two rules are
# kept only so the tests can show how far the change reaches; the command line refuses them.
def greedy_contribution_bound(records, k: int = 1) -> list:
    """Greedy in record order: keep a record iff each person it names has < k kept records so far.
    Removing one person can change every kept record (a chain of n two-person records: n)."""
    used: dict = {}
    out = []
    for r, who in zip(records, record_people(records)):
        if all(used.get(_id_key(x), 0) < k for x in who):
            out.append(r)
            for x in who:
                used[_id_key(x)] = used.get(_id_key(x), 0) + 1
    return out


def rank_contribution_bound(records, k: int = 1) -> list:
    """Keep a record iff it is among the first k records (in record order, a public rank) naming
    each of its persons. Removing person X frees the slots of X's co-named persons: up to one new
    record per shared record enters, so the change is k + (records naming X), not bounded by k."""
    people = record_people(records)
    seen: dict = {}
    rank = []
    for who in people:
        rank.append([seen.get(_id_key(x), 0) for x in who])
        for x in who:
            seen[_id_key(x)] = seen.get(_id_key(x), 0) + 1
    return [r for r, ranks in zip(records, rank) if all(j < k for j in ranks)]


MULTI_OWNER_METHODS = {
    "record-sampling": "record-level sampling and clipping, person-level accounting at K records",
    "drop": "person units over the records that name exactly one person",
}
_REFUSED_SELECTIONS = ("greedy", "rank", "selection", "contribution-bound")


def check_multi_owner_method(method: str) -> str:
    """The validated method for records that name several persons, or a one-line refusal.

    Selection-based contribution bounding is refused: removing one person changes which *other*
    records a greedy selection keeps (a chain of 50 two-person records: all 50 change) and a
    rank rule lets in one new record per record shared with that person (a star: 51 change for 50
    shared records), so no group size bounds the selection's sensitivity to one person."""
    if method in MULTI_OWNER_METHODS:
        return method
    if method in _REFUSED_SELECTIONS:
        raise DataError(f"multi-owner method {method!r} is refused: a selection that caps each "
                        "person's records changes other persons' records when one person is "
                        "removed, so no group size bounds it; use 'record-sampling' or 'drop'")
    raise DataError(f"unknown multi-owner method {method!r}; choose one of "
                    f"{', '.join(MULTI_OWNER_METHODS)}")


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
    p.add_argument("--split", choices=("record", "person"), default="record",
                   help="record (default): a random share of records is val; person: a share of "
                        "the persons is held out, their records are val, records naming persons of "
                        "both sides are dropped (and counted), so no person is on both sides")
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
        dropped = None
        if args.split == "person":
            train, val, dropped = split_by_person(recs, args.val_fraction, args.seed)
            side = {id(r): "train" for r in train} | {id(r): "val" for r in val}
            recs = [dict(r, split=side[id(r)]) for r in recs if id(r) in side]
        write_jsonl(recs, args.out)
    except (DataError, OSError) as e:
        sys.stderr.write(f"python -m finetune.data: error: {e}\n")
        return 2
    n_val = sum(r["split"] == "val" for r in recs)
    print(f"wrote {len(recs)} records ({len(recs) - n_val} train, {n_val} val, "
          f"{len({tuple(x) for r in recs for x in r['pii']})} distinct PII) to {args.out}")
    if dropped is not None:
        val_people = {x for r in recs if r["split"] == "val" for x in r["people"]}
        n_people = len({x for r in recs for x in r["people"]})
        print(f"split by person: {n_people - len(val_people)} training persons, {len(val_people)} "
              f"held-out persons never seen in training; {dropped} records naming persons of both "
              "sides dropped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
