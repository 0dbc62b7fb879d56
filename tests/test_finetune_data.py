"""Tests for finetune.models.tokenizer (real GPT-2 BPE, offline) and finetune.data (synthetic PII corpus,
jsonl loading, padding/masks, deterministic split, CLI)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from finetune import data
from finetune.models.tokenizer import FULL_VOCAB_SIZE, load_tokenizer

TEXTS = [
    "Hello world",
    "Email jane.doe@example.com or call +1 (555) 010-2233 before 5pm.",
    "Zoë lives at 12 Rue de Rivoli, Paris \u2014 naïve café \U0001F642\n\ttabs  and  spaces",
    "",
]


# ---------------------------------------------------------------- tokenizer
def test_known_gpt2_ids():
    tok = load_tokenizer()
    assert len(tok) == FULL_VOCAB_SIZE == 50257
    assert tok.encode("Hello") == [15496]
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.encode("<|endoftext|>") == [50256] and tok.eos_id == 50256
    assert tok.decode([15496, 11, 995, 0]) == "Hello, world!"


@pytest.mark.parametrize("vocab_size", [FULL_VOCAB_SIZE, 5000, 300])
def test_round_trip_and_id_range(vocab_size):
    tok = load_tokenizer(vocab_size)
    for t in TEXTS:
        ids = tok.encode(t)
        assert all(0 <= i < vocab_size - 1 for i in ids)
        assert tok.decode(ids) == t
    assert tok.encode("<|endoftext|>") == [vocab_size - 1]


def test_truncated_vocab_keeps_gpt2_ids_and_only_splits_further():
    full, small = load_tokenizer(), load_tokenizer(5000)
    text = TEXTS[1] + " " + TEXTS[2]
    a, b = full.encode(text), small.encode(text)
    assert len(b) > len(a)
    common = [i for i in a if i < 4999]
    assert common and all(i in b for i in common)   # frequent tokens have the same ids
    # every small-vocab token is a real GPT-2 token with the same string
    assert all(full.decode([i]) == small.decode([i]) for i in b)
    with pytest.raises(ValueError, match="vocab_size"):
        load_tokenizer(100)


# ---------------------------------------------------------------- corpus generator
def test_generator_is_deterministic_and_records_its_pii():
    a = data.generate_records(60, seed=3)
    assert a == data.generate_records(60, seed=3)
    assert a != data.generate_records(60, seed=4)
    kinds = set()
    for r in a:
        assert r["pii"], r
        for kind, value in r["pii"]:
            assert kind in data.PII_KINDS
            assert value and value in r["text"]
            kinds.add(kind)
        assert "{" not in r["text"]
    assert kinds == set(data.PII_KINDS)
    assert sum(r["split"] == "val" for r in a) == 6
    # people recur: fewer distinct names than name mentions
    names = [v for r in a for k, v in r["pii"] if k == "name"]
    assert len(set(names)) < len(names)


def test_generated_pii_is_found_by_the_evaluation_tagger():
    from finetune.evaluation import pii
    recs = data.generate_records(200, seed=0)
    matcher = pii.KnownEntityMatcher({k: [v for r in recs for kk, v in r["pii"] if kk == k]
                                      for k in data.PII_KINDS})
    for r in recs:
        assert pii.pii_set(map(tuple, r["pii"])) <= pii.extract_pii([r["text"]], matcher=matcher)


def test_generator_rejects_bad_arguments():
    with pytest.raises(data.DataError, match="positive"):
        data.generate_records(0)
    with pytest.raises(data.DataError, match="val-fraction"):
        data.generate_records(10, val_fraction=1.0)
    with pytest.raises(data.DataError, match="people"):
        data.generate_records(10, people=1)


# ---------------------------------------------------------------- loading
def test_encode_pads_masks_and_truncates():
    tok = load_tokenizer(5000)
    texts = ["Hello world", "a " * 50, ""]
    ids, mask, nt = data.encode_texts(tok, texts, seq_len=8)
    assert ids.dtype == np.int32 and mask.dtype == np.float32 and ids.shape == mask.shape == (3, 8)
    n0 = len(tok.encode(texts[0])) + 1
    assert mask[0].tolist() == [1.0] * n0 + [0.0] * (8 - n0)
    assert ids[0, : n0 - 1].tolist() == tok.encode(texts[0]) and ids[0, n0 - 1] == tok.eos_id
    assert (ids[0, n0:] == tok.pad_id).all()
    assert mask[1].all() and nt == 1
    assert mask[2].tolist() == [1.0] + [0.0] * 7 and ids[2, 0] == tok.eos_id


def test_split_is_deterministic_and_honours_split_field(tmp_path):
    recs = data.generate_records(50, seed=1, val_fraction=0.2)
    tr, va = data.split_records(recs)
    assert [r["split"] for r in tr] == ["train"] * 40 and len(va) == 10
    plain = [{"text": r["text"], "i": i} for i, r in enumerate(recs)]
    t1, v1 = data.split_records(plain, 0.3, seed=7)
    t2, v2 = data.split_records(plain, 0.3, seed=7)
    assert t1 == t2 and v1 == v2 and len(v1) == 15 and len(t1) + len(v1) == 50
    _, v3 = data.split_records(plain, 0.3, seed=8)
    assert v3 != v1
    assert not {r["i"] for r in t1} & {r["i"] for r in v1}


def test_load_dataset_and_errors(tmp_path):
    p = tmp_path / "d.jsonl"
    recs = data.generate_records(30, seed=2)
    data.write_jsonl(recs, p)
    tok = load_tokenizer(5000)
    ds = data.load_dataset(p, tok, seq_len=48)
    assert len(ds.train) == 27 and len(ds.val) == 3
    assert ds.train.ids.shape == (27, 48)
    assert ds.train_pii == data.pii_pairs([r for r in recs if r["split"] == "train"])
    first = next(r for r in recs if r["split"] == "train")
    n = int(ds.train.mask[0].sum())
    assert tok.decode(ds.train.ids[0, : n - 1]) == first["text"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(data.DataError, match=r"bad.jsonl:2: .*'text'"):
        data.load_records(bad)
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(data.DataError, match=r":2: not valid JSON"):
        data.load_records(bad)
    with pytest.raises(data.DataError, match="not found"):
        data.load_records(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- CLI
def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "finetune.data", *args], capture_output=True,
                          text=True, cwd=cwd)


def test_cli_writes_corpus_and_gives_one_line_errors(tmp_path):
    import finetune

    root = str(__import__("pathlib").Path(finetune.__file__).resolve().parents[1])
    out = tmp_path / "c.jsonl"
    r = _cli("--n", "40", "--out", str(out), "--seed", "5", "--val-fraction", "0.25", cwd=root)
    assert r.returncode == 0, r.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 40
    recs = [json.loads(x) for x in lines]
    assert recs == data.generate_records(40, seed=5, val_fraction=0.25)
    new = str(tmp_path / "new.jsonl")
    for args in (["--n", "0", "--out", new], ["--n", "x", "--out", new],
                 ["--n", "5", "--out", str(tmp_path / "no" / "c.jsonl")],
                 ["--n", "5", "--out", new, "--val-fraction", "-0.1"],
                 ["--n", "5", "--out", str(out)]):  # exists: refused without --overwrite
        r = _cli(*args, cwd=root)
        assert r.returncode == 2, args
        assert len(r.stderr.strip().splitlines()) == 1 and "error" in r.stderr
        assert "Traceback" not in r.stderr
    assert out.read_text().splitlines() == lines  # the refused run left the file alone
    r = _cli("--n", "5", "--out", str(out), "--overwrite", cwd=root)
    assert r.returncode == 0, r.stderr
    assert len(out.read_text().splitlines()) == 5
    r = _cli("--help", cwd=root)
    assert r.returncode == 0 and "--val-fraction" in r.stdout


# ---------------------------------------------------------------- persons
def _random_corpus(seed, n=120, n_people=25, max_people=3):
    """Records naming 0..max_people persons (ids mixed int/str), some owned by a 'user'."""
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        k = int(rng.integers(0, max_people + 1))
        who = [int(x) if x % 2 else f"p{x}" for x in rng.choice(n_people, size=k, replace=False)]
        r = {"id": i, "text": f"record {i}", "pii": [["name", "x"]] if who else [], "people": who}
        if who and rng.random() < 0.2:
            r["user"] = who[0]
        recs.append(r)
    return recs


def test_people_field_names_the_persons_and_leaves_the_texts_unchanged():
    import faker

    recs = data.generate_records(300, seed=0, people=40)
    # the person ids come from the same draw as before: texts, PII and splits are the old ones
    # (sha256 of the records written before the field existed, Faker of constraints.txt)
    if faker.VERSION == "40.63.0":
        import hashlib
        old = [{k: v for k, v in r.items() if k != "people"} for r in recs]
        assert hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest() == \
            "f4100c1389ef87e6808f8c092f46b2f82caf32991e8f8be63477d52ab67b1283"
    # a person id always carries the same PII, and every PII item belongs to a person named
    owner = {}
    for r in recs:
        assert 1 <= len(r["people"]) <= 2 and all(0 <= x < 40 for x in r["people"])
        if len(r["people"]) == 1:
            for kind, value in r["pii"]:
                assert owner.setdefault((r["people"][0], kind), value) == value
    for r in recs:
        for kind, value in r["pii"]:
            assert any(owner.get((x, kind)) in (None, value) for x in r["people"])
            assert any(owner.get((x, kind)) == value for x in r["people"]) or len(r["people"]) == 2
    # the two-person e-mail-only template names both persons although it contains no name
    fwd = [r for r in recs if r["text"].startswith("Forward the report")]
    assert fwd and all(len(r["people"]) == 2 for r in fwd)
    assert all(k == "email" for r in fwd for k, _ in r["pii"])


def test_load_records_validates_people_and_user(tmp_path):
    p = tmp_path / "d.jsonl"
    good = [{"text": "a", "people": [1, "b"]}, {"text": "b", "user": "u7"}, {"text": "c"}]
    data.write_jsonl(good, p)
    assert data.load_records(p) == good
    for bad, msg in (({"text": "a", "people": 3}, "list of person ids"),
                     ({"text": "a", "people": [1.5]}, "list of person ids"),
                     ({"text": "a", "people": [True]}, "list of person ids"),
                     ({"text": "a", "people": [2, 2]}, "twice"),
                     ({"text": "a", "user": None}, "'user'")):
        data.write_jsonl([good[0], bad], p)
        with pytest.raises(data.DataError, match=rf"d.jsonl:2: .*{msg}"):
            data.load_records(p)


def test_record_people_refuses_pii_without_people_by_index_only():
    secret = "Ann Secret-Person lives at 1 Private Road"
    recs = [{"text": "no pii"}, {"text": "x", "people": [3], "user": 9},
            {"text": secret, "pii": [["name", "Ann Secret-Person"]]}]
    with pytest.raises(data.DataError) as e:
        data.record_people(recs)
    msg = str(e.value)
    assert msg.startswith("record 2 has PII but no 'people' field") and "\n" not in msg
    assert "Secret" not in msg and "Private" not in msg
    assert data.record_people(recs[:2]) == [(), (9, 3)]
    assert data.record_people([{"text": "y", "user": 4, "people": [4, 5]}]) == [(4, 5)]


def _people_of(recs):
    return {(type(x).__name__, x) for who in data.record_people(recs) for x in who}


@pytest.mark.parametrize("seed", range(6))
def test_person_split_puts_no_person_on_both_sides(seed):
    recs = _random_corpus(seed)
    for vf in (0.0, 0.3, 0.5, 0.9):
        tr, va, dropped = data.split_by_person(recs, vf, seed=seed)
        assert not _people_of(tr) & _people_of(va)
        # only records naming several persons are dropped, and none of them fits one side
        kept = {r["id"] for r in tr + va}
        gone = [r for r in recs if r["id"] not in kept]
        assert len(tr) + len(va) + dropped == len(recs) and dropped == len(gone)
        for r in gone:
            who = _people_of([r])
            assert len(who) >= 2 and not who <= _people_of(tr) and not who <= _people_of(va)
        assert data.split_records(recs, vf, seed=seed, by="person") == (tr, va)
    n_people = len(_people_of(recs))
    assert len(_people_of(data.split_by_person(recs, 0.5, seed)[1])) <= round(n_people * 0.5)


def test_person_split_of_the_readme_corpus():
    recs = data.generate_records(1000, seed=0, val_fraction=0.5, people=60)
    tr, va = data.split_records(recs)  # the record split: every person on both sides
    assert _people_of(tr) == _people_of(va) and len(_people_of(tr)) == 60
    tr, va, dropped = data.split_by_person(recs, 0.5, seed=0)
    assert not _people_of(tr) & _people_of(va)
    assert len(_people_of(tr)) == len(_people_of(va)) == 30
    assert dropped > 0 and len(tr) + len(va) + dropped == 1000


def test_cli_split_person(tmp_path):
    import finetune

    root = str(__import__("pathlib").Path(finetune.__file__).resolve().parents[1])
    out = tmp_path / "p.jsonl"
    r = _cli("--n", "300", "--out", str(out), "--seed", "2", "--val-fraction", "0.5",
             "--people", "30", "--split", "person", cwd=root)
    assert r.returncode == 0, r.stderr
    recs = data.load_records(out)
    tr, va = data.split_records(recs)
    assert not _people_of(tr) & _people_of(va) and tr and va
    dropped = int(r.stdout.split("; ")[-1].split()[0])
    assert dropped == 300 - len(recs) > 0
    assert "held-out persons never seen in training" in r.stdout
    gen = {x["id"]: x for x in data.generate_records(300, seed=2, val_fraction=0.5, people=30)}
    assert all(x["text"] == gen[x["id"]]["text"] for x in recs)
    r = _cli("--n", "30", "--out", str(tmp_path / "q.jsonl"), "--split", "people", cwd=root)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("seed", range(5))
def test_single_owner_rule_commutes_with_removing_a_person(seed):
    recs = _random_corpus(seed, max_people=3)
    kept = data.single_owner_records(recs)
    assert all(len(w) == 1 for w in data.record_people(kept))
    for x in _people_of(recs):
        rest = [r for r, who in zip(recs, data.record_people(recs))
                if x not in {(type(y).__name__, y) for y in who}]
        removed = [r for r in kept if x not in _people_of([r])]
        assert data.single_owner_records(rest) == removed


def _sym_diff(a, b):
    ia, ib = {r["id"] for r in a}, {r["id"] for r in b}
    return len(ia ^ ib)


def test_greedy_selection_cascades_along_a_chain():
    n = 50
    chain = [{"id": i, "text": "", "people": [i, i + 1]} for i in range(n)]   # r_i = {X_i, X_i+1}
    s = data.greedy_contribution_bound(chain, k=1)
    s2 = data.greedy_contribution_bound([r for r in chain if 0 not in r["people"]], k=1)
    assert [r["id"] for r in s] == list(range(0, n, 2))
    assert _sym_diff(s, s2) == n        # removing X_0 changes every record of the chain


def test_rank_selection_lets_in_one_record_per_shared_record():
    n = 50
    star = ([{"id": i, "text": "", "people": ["X", f"B{i}"]} for i in range(n)]
            + [{"id": n + i, "text": "", "people": [f"B{i}", f"Y{i}"]} for i in range(n)])
    s = data.rank_contribution_bound(star, k=1)
    s2 = data.rank_contribution_bound([r for r in star if "X" not in r["people"]], k=1)
    assert [r["id"] for r in s] == [0] and len(s2) == n
    assert _sym_diff(s, s2) == n + 1    # k + (records naming X): not bounded by k


def test_selection_methods_are_refused_in_one_line():
    for m in data.MULTI_OWNER_METHODS:
        assert data.check_multi_owner_method(m) == m
    for m in ("greedy", "rank"):
        with pytest.raises(data.DataError, match="refused") as e:
            data.check_multi_owner_method(m)
        assert "\n" not in str(e.value)
    with pytest.raises(data.DataError, match="unknown"):
        data.check_multi_owner_method("merge")


def test_records_per_person_and_the_declared_cap():
    recs = _random_corpus(0)
    counts = {}
    for r in recs:
        for x in set(data.record_people([r])[0]):
            counts[(type(x).__name__, x)] = counts.get((type(x).__name__, x), 0) + 1
    k = max(counts.values())
    assert data.max_records_per_person(recs) == k
    assert sorted(data.person_counts(recs).values()) == sorted(counts.values())
    assert data.check_person_cap(recs, k) == k
    with pytest.raises(data.DataError, match=rf"more than the declared cap of {k - 1} records") as e:
        data.check_person_cap(recs, k - 1)
    assert "record " not in str(e.value)
    for bad in (0, 2.5, True):
        with pytest.raises(data.DataError, match="cap"):
            data.check_person_cap(recs, bad)
    assert data.max_records_per_person([{"text": "a"}]) == 0
    assert data.max_records_per_person(data.generate_records(1000, seed=0, val_fraction=0.5,
                                                             people=60)) == 31
