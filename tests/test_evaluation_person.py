"""Person-level evaluation: the DP limits on TPR and AUC, scores per person, bootstrap over persons."""
import math

import numpy as np
import pytest
from scipy import integrate

from finetune.evaluation import membership

# (eps, TPR@1%FPR, TPR@0.1%FPR, AUC) limits at delta 1e-5, each computed from
# min(1, e^eps FPR + delta, 1 - e^-eps (1 - delta - FPR)) when the person-level design was written
TABLE = [(1, 0.02719, 0.00273, 0.73106), (2, 0.07390, 0.00740, 0.88080),
         (4, 0.54599, 0.05461, 0.98201), (8, 0.99967, 0.99966, 0.99966)]


@pytest.mark.parametrize("eps,t1,t01,auc", TABLE)
def test_dp_limits_match_the_table_at_delta_1e5(eps, t1, t01, auc):
    v = membership.dp_bound_values(eps, 1e-5)
    assert v["tpr_at_0.01_fpr"] == pytest.approx(t1, abs=6e-6)
    assert v["tpr_at_0.001_fpr"] == pytest.approx(t01, abs=6e-6)
    assert v["auc"] == pytest.approx(auc, abs=6e-6)


@pytest.mark.parametrize("eps,delta", [(0.0, 0.0), (0.3, 1e-3), (1.0, 1e-5), (2.5, 0.05),
                                       (6.0, 1e-9), (12.0, 0.0)])
def test_auc_limit_is_the_integral_of_the_tpr_limit(eps, delta):
    f = lambda x: float(membership.dp_tpr_bound(x, eps, delta))
    kinks = [(1 - delta) / (1 + math.exp(eps)), 1 - delta]
    num = integrate.quad(f, 0.0, 1.0, points=kinks, epsabs=1e-13, epsrel=1e-13, limit=200)[0]
    assert membership.dp_auc_bound(eps, delta) == pytest.approx(num, abs=1e-10)
    assert membership.dp_auc_bound(eps, 0.0) == pytest.approx(1 / (1 + math.exp(-eps)), abs=1e-14)
    assert membership.dp_auc_bound(math.inf, delta) == 1.0


def test_randomized_response_attains_the_auc_limit():
    """eps-DP randomized response on membership: its exact AUC (ties half) is the limit."""
    eps = 1.3
    p = math.exp(eps) / (1 + math.exp(eps))
    n = 100_000
    members = np.r_[np.ones(int(round(p * n))), np.zeros(n - int(round(p * n)))]
    nonmembers = 1 - members
    auc = membership.roc_auc(members, nonmembers)[0]
    assert auc == pytest.approx(membership.dp_auc_bound(eps, 0.0), abs=1e-5)


def test_person_scores_against_a_loop():
    rng = np.random.default_rng(0)
    who = [tuple(rng.choice(9, size=rng.integers(1, 3), replace=False).tolist()) for _ in range(60)]
    s = rng.normal(size=60)
    persons, mean, low = membership.person_scores(s, who)
    assert sorted(persons) == sorted({x for w in who for x in w})
    for x, a, b in zip(persons, mean, low):
        mine = [s[i] for i, w in enumerate(who) if x in w]
        assert a == pytest.approx(sum(mine) / len(mine), abs=1e-14) and b == min(mine)
    with pytest.raises(ValueError, match="scores for"):
        membership.person_scores(s[:5], who)


def test_person_report_bootstraps_over_persons():
    rng = np.random.default_rng(1)
    m, n = rng.normal(1.0, 1, 80), rng.normal(0.0, 1, 70)
    r = membership.person_attack_report(m, n, n_boot=400, seed=3)
    lo, hi = r["auc_bootstrap_ci"]
    assert lo < r["auc"] < hi and hi - lo < 0.3
    # percentile interval of a bootstrap of the AUC: close to the DeLong interval at this size
    assert r["auc_ci"][0] == pytest.approx(lo, abs=0.04) and r["auc_ci"][1] == pytest.approx(hi, abs=0.04)
    t = r["tpr_at_0.01_fpr"]
    assert t["tpr_bootstrap_ci"][0] <= t["tpr"] <= t["tpr_bootstrap_ci"][1]
    assert r["bootstrap"]["unit"] == "person"
    assert r == membership.person_attack_report(m, n, n_boot=400, seed=3)   # seeded


def test_person_pii_and_extraction_known_answer():
    from finetune.evaluation import pii

    who = [(1,), (1,), (2,), (1, 2), (3,), (4,)]
    items = [[["email", "A@x.org"]], [["name", "Ann"]], [["name", "Bo"]], [["name", "Shared"]],
             [["phone", "(415) 555-0100"]], [["name", "Dee"]]]
    per = pii.person_pii(who, items)
    assert per == {1: {("email", "a@x.org"), ("name", "Ann")}, 2: {("name", "Bo")},
                   3: {("phone", "4155550100")}, 4: {("name", "Dee")}}
    members = {x: per[x] for x in (1, 2)}
    never = {x: per[x] for x in (3, 4)}
    got = {("email", "a@x.org"), ("phone", "4155550100"), ("name", "Zed")}
    r = pii.person_extraction(got, members, never)
    assert r["precision"] == pytest.approx(1 / 3) and r["recall"] == pytest.approx(1 / 3)
    assert r["never_seen_recall"] == 0.5
    assert r["member_persons_exposed"] == 0.5 and r["never_seen_persons_exposed"] == 0.5
    assert (r["n_member_persons"], r["n_never_seen_persons"], r["n_member_pii"]) == (2, 2, 3)


def _person_split_corpus(n=200, people=30, seed=0):
    from finetune import data

    recs = data.generate_records(n, seed=seed, val_fraction=0.5, people=people)
    tr, va, _ = data.split_by_person(recs, 0.5, seed)
    return [dict(r, split="train") for r in tr] + [dict(r, split="val") for r in va]


def test_person_canaries_one_per_person_inserted_only_for_training_persons(tmp_path, capsys):
    from finetune.data import load_records, write_jsonl
    from finetune.evaluation import prepare

    src, out = tmp_path / "d.jsonl", tmp_path / "c.jsonl"
    corpus = _person_split_corpus()
    write_jsonl(corpus, src)
    assert prepare.main(["--data", str(src), "--out", str(out), "--exposure-canaries", "2",
                         "--audit-canaries", "0", "--digits", "3", "--person-canaries"]) == 0
    truth = prepare.load_truth(str(out) + prepare.SIDE_SUFFIX)
    recs = load_records(out)
    train_p, val_p = prepare.sided_persons(corpus)
    secrets, inserted = truth["person_secrets"], truth["person_inserted"]
    assert len(secrets) == len(train_p) + len(val_p) and sum(inserted) == len(train_p)
    assert len(set(secrets) | set(truth["exposure_secrets"])) == len(secrets) + 2   # all distinct
    person_recs = [r for r in recs if r.get("canary") and r.get("people")]
    assert sorted(r["people"][0] for r in person_recs) == sorted(train_p)
    texts = " ".join(r["text"] for r in recs)
    for s, ins in zip(secrets, inserted):
        assert (s in texts) == ins
    assert all(r["split"] == "train" and len(r["people"]) == 1 for r in person_recs)
    # a corpus split by record has every person on both sides: refused in one line
    rec_split = tmp_path / "r.jsonl"
    from finetune.data import generate_records
    write_jsonl(generate_records(200, seed=0, val_fraction=0.5, people=30), rec_split)
    capsys.readouterr()
    assert prepare.main(["--data", str(rec_split), "--out", str(tmp_path / "x.jsonl"),
                         "--person-canaries"]) == 2
    err = capsys.readouterr().err
    assert "--split person" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.jsonl").exists()


def test_person_extraction_counts_unattributed_pii_of_member_records():
    """A value from a record naming two member persons is member PII (precision), though it
    exposes neither person on its own."""
    from finetune.evaluation import pii

    members = {1: {("name", "Ann")}, 2: {("name", "Bo")}}
    got = {("name", "Ann"), ("email", "pair@x.org")}
    r0 = pii.person_extraction(got, members, {3: {("name", "Cy")}})
    assert r0["precision"] == 0.5
    r = pii.person_extraction(got, members, {3: {("name", "Cy")}},
                              member_all={("name", "Ann"), ("name", "Bo"), ("email", "pair@x.org")})
    assert r["precision"] == 1.0 and r["recall"] == pytest.approx(2 / 3)
    assert r["member_persons_exposed"] == 0.5


def test_person_summary_line_of_a_unit_level_run_names_no_record_count():
    """A unit-level run has no person_k (its certificate covers a person whatever their count); the
    printed line said "a person in at most None records"."""
    from finetune.evaluation.report import _person_lines

    unit = _person_lines({"person_epsilon": 0.99977, "person_k": None, "person_method": "unit-level",
                          "epsilon": 0.99977})[0]
    assert "None" not in unit and "(unit-level)" in unit and "person-level epsilon 0.9998" in unit
    rec = _person_lines({"person_epsilon": 18.31, "person_k": 12, "person_method": "tight mixture",
                         "epsilon": 0.99977})[0]
    assert "a person in at most 12 records; tight mixture" in rec


def test_record_level_checks_of_a_unit_level_run_use_its_record_epsilon():
    """A person-level run's epsilon covers a whole person, not one record changed inside a person
    who stays: the record-level membership bound and audit are held to ``record_epsilon``."""
    from finetune.evaluate import record_level_epsilon

    assert record_level_epsilon({"privacy_unit": "person", "record_epsilon": 2.46}, 0.9998) == 2.46
    assert record_level_epsilon({"privacy_unit": "person"}, 0.9998) is None     # not recorded: no limit
    assert record_level_epsilon({"privacy_unit": "record", "record_epsilon": 1.0}, 1.0) == 1.0
    assert record_level_epsilon({}, 0.5) == 0.5                                  # older record-level runs
    assert record_level_epsilon({"privacy_unit": "person", "record_epsilon": 2.46}, None) is None


def test_canaries_a_drop_run_never_trained_are_skipped_but_per_person_canaries_are_scored():
    """A --multi-owner drop run never sees the exposure and audit canaries (they name nobody): the
    report says so instead of scoring them, and still scores the per-person canaries (each names
    its person and is trained)."""
    from finetune.evaluation import canary
    from finetune.evaluation.report import EvalData, EvalOptions, canary_report

    class Scorer:                           # log-perplexity: the trained secrets score lowest
        def __init__(self, trained):
            self.trained, self.calls = set(trained), 0

        def log_perplexity(self, texts):
            self.calls += 1
            return np.array([0.0 if t in self.trained else 10.0 for t in texts])

        def losses(self, texts):
            raise AssertionError("the audit canaries of a drop run must not be scored")

    secret = lambda i: canary.format_secret(i, 2)      # noqa: E731
    persons = [canary.Canary(secret(i)) for i in (11, 22, 33, 44)]
    data = EvalData(members=[], nonmembers=[], exposure_canaries=[canary.Canary(secret(55))],
                    canary_digits=2, audit_canaries=["a", "b"], audit_included=[True, False],
                    person_canaries=persons, person_canary_inserted=[True, True, False, False])
    ft = Scorer([c.text for c in persons[:2]])
    out = canary_report(ft, ft, data, EvalOptions(), 2.46, 1e-5, note="n/a: never trained")
    assert out["note"] == "n/a: never trained" and "exposure" not in out and "one_run_audit" not in out
    assert out["person"]["n_members"] == 2 and out["person"]["member_mean"] > out["person"]["never_seen_mean"]
