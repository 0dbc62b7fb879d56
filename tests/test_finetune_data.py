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
