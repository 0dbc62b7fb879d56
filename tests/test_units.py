"""Unit-level (person-level) sampling and clipping: finetune.dp.units and make_private(unit_ids=...)."""
import warnings

import mindspore as ms
import numpy as np
import pytest
from mindspore import Parameter, Tensor, nn, ops

from finetune.dp.per_example import CLIP_MARGIN, PerExampleGradients
from finetune.dp.units import UnitLayout, UnitSampler, person_report
from finetune.engine import EngineConfigError, make_private

D = 4


class Linear(nn.Cell):
    """Per-example loss ``x . w``: the gradient of row ``x`` is ``x`` whatever ``w`` is."""

    def __init__(self):
        super().__init__()
        self.w = Parameter(Tensor(np.zeros(D, np.float32)), name="w")

    def construct(self, x):
        return (x * self.w).sum(-1)


class Square(nn.Cell):
    """Per-example loss ``0.5 ||W x - y||^2``: gradients depend on the weights (for mode checks)."""

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(1)
        self.dense = nn.Dense(D, 3, weight_init=Tensor(rng.normal(size=(3, D)).astype(np.float32)))

    def construct(self, x, y):
        return 0.5 * ops.square(self.dense(x) - y).sum(-1)


def _engine(x, ids=None, m=None, batch_size=None, seed=0, lr=0.5, **kw):
    net = Linear()
    opt = nn.SGD(net.trainable_params(), learning_rate=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = make_private(net, opt, dataset_size=len(x), batch_size=batch_size, steps=kw.pop("steps", 4),
                              noise_multiplier=1.0, target_delta=1e-6, max_grad_norm=1.0, seed=seed,
                              unit_ids=ids, max_rows_per_unit=m, verbose=False, **kw)
    engine.optimizer.add_noise = False      # test hook: the update is the clipped sum alone
    return net, engine


def _updates(net, engine, x):
    """Weight change of every step (float64) and the sampled layout of every step."""
    out = []
    for batch in engine.batches(x):
        before = net.w.asnumpy().astype(np.float64)
        engine.step(batch)
        out.append(net.w.asnumpy().astype(np.float64) - before)
    return out


def _corpus(big_norm=100.0, n_small=9):
    """Unit 0: 200 identical rows of norm ``big_norm``; units 1..n_small: one small row each."""
    rng = np.random.default_rng(0)
    direction = rng.normal(size=D)
    direction /= np.linalg.norm(direction)
    big = np.tile(big_norm * direction, (200, 1))
    small = 0.01 * rng.normal(size=(n_small, D))
    x = np.concatenate([big, small]).astype(np.float32)
    ids = [0] * 200 + list(range(1, n_small + 1))
    return x, ids


def test_one_unit_of_200_rows_moves_the_weights_by_at_most_lr_C_over_q_n_units():
    """Unit clipping: one unit of 200 aligned rows moves the weights by at most lr C / (q n_units)
    plus the noise. Fails before unit clipping (the 200 rows were clipped one by one: 200x)."""
    lr, C = 0.5, 1.0
    x, ids = _corpus()
    without = x.copy()
    without[:200] = 0.0                     # the unit's rows contribute nothing (same public n_units)
    n_units, batch = 10, 5                  # q = 0.5 over units
    net_a, eng_a = _engine(x, ids, m=200, batch_size=batch, steps=8, lr=lr)
    net_b, eng_b = _engine(without, ids, m=200, batch_size=batch, steps=8, lr=lr)
    assert eng_a.unit == "unit" and eng_a.n_units == n_units and eng_a.sampling_rate == batch / n_units
    assert eng_a.optimizer.expected_batch_size == batch       # q * n_units, public
    diffs = [np.linalg.norm(a - b) for a, b in zip(_updates(net_a, eng_a, x), _updates(net_b, eng_b, without))]
    bound = lr * C / (batch / n_units * n_units)
    assert max(diffs) <= bound * (1 + 1e-6)
    assert max(diffs) >= bound * (1 - 2 * CLIP_MARGIN)       # the unit was sampled and clipped to C
    # record-level clipping of the same rows (every row sampled, q = 1): 200 x C
    net_r, eng_r = _engine(x, batch_size=len(x), steps=1, lr=lr)
    net_s, eng_s = _engine(without, batch_size=len(x), steps=1, lr=lr)
    d = np.linalg.norm(_updates(net_r, eng_r, x)[0] - _updates(net_s, eng_s, without)[0])
    expected = 200 * lr * C * (1 - CLIP_MARGIN) / len(x)
    assert d == pytest.approx(expected, rel=1e-5)
    assert d / (lr * C / len(ids)) > 199                      # ~200x the unit-level bound at q = 1


def test_rows_beyond_m_are_never_used_and_the_subset_is_uniform():
    ids = [0] * 10 + [1] * 2 + [2]
    layout = UnitLayout(ids, 3, dataset_size=len(ids))
    sampler = UnitSampler(layout, 1.0, 3000, rng=np.random.default_rng(3))
    hits = np.zeros(len(ids))
    for step in sampler:
        assert step.shape == (3, 3)
        assert set(step[0]) <= set(range(10)) and len(set(step[0])) == 3        # 3 of unit 0's rows
        assert list(step[1]) == [10, 11, -1] and list(step[2]) == [12, -1, -1]   # all rows, padded
        hits[step[step >= 0]] += 1
    freq = hits[:10] / 3000                  # each row of unit 0 with probability 3/10
    assert np.all(np.abs(freq - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 3000))
    # the engine's micro-batches: whole units, unit-major, at most m real rows per unit
    x = np.arange(len(ids), dtype=np.float32)[:, None] * np.ones((1, D), np.float32)
    _, engine = _engine(x, ids, m=3, batch_size=3, steps=5)
    for batch in engine.batches(x):
        for (rows,), mask in batch:
            per_unit = mask.reshape(-1, 3)
            assert per_unit.sum(1).max() <= 3
            units = [set(ids[int(r)] for r, k in zip(u, mk) if k) for u, mk in
                     zip(rows[:, 0].reshape(-1, 3), per_unit)]
            assert all(len(u) <= 1 for u in units)              # a unit's rows are contiguous


def test_units_are_sampled_independently_at_rate_q():
    ids = np.repeat(np.arange(40), 3)
    layout = UnitLayout(ids, 3)
    sampler = UnitSampler(layout, 0.25, 4000, rng=np.random.default_rng(5))
    inc = np.zeros((4000, 40), bool)
    for t, step in enumerate(sampler):
        units = ids[step[:, 0]]
        inc[t, units] = True
        assert np.all(ids[step] == units[:, None])               # a sampled unit comes whole
    se = np.sqrt(0.25 * 0.75 / 4000)
    assert np.all(np.abs(inc.mean(0) - 0.25) < 5 * se)
    joint = (inc[:, :-1] & inc[:, 1:]).mean(0)                  # pairs: q^2 if independent
    assert np.abs(joint.mean() - 0.0625) < 5 * np.sqrt(0.0625 * 0.9375 / (4000 * 39))
    assert inc.sum(1).std() > 0                                  # Poisson: the batch size varies


@pytest.mark.parametrize("method", ["vmap", "bookkeeping"])
@pytest.mark.parametrize("mode", ["graph", "pynative"])
def test_unit_norms_and_clipped_sum_match_float64(mode, method):
    """Per-unit norms = ||sum of the unit's per-example gradients||, in both MindSpore modes."""
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    rng = np.random.default_rng(2)
    m, units = 3, 4
    x = rng.normal(size=(m * units, D)).astype(np.float32)
    y = rng.normal(size=(m * units, 3)).astype(np.float32)
    mask = np.ones(m * units, np.float32)
    mask[[2, 7, 8]] = 0.0                                       # padding rows inside units 0 and 2
    mask[9:] = 0.0                                              # unit 3 is all padding
    net = Square()
    grads = PerExampleGradients(net, geometry="l2", method=method, rows_per_unit=m)
    assert grads.method == method
    clip = 2.0
    sums, _, norms = grads.clipped_sum([Tensor(x), Tensor(y)], mask, clip)
    w = net.dense.weight.asnumpy().astype(np.float64)
    b = net.dense.bias.asnumpy().astype(np.float64)
    r = (x @ w.T + b - y) * mask[:, None]                       # dL/dy per row, padding zeroed
    gw, gb = r[:, :, None] * x[:, None, :], r
    unit_w, unit_b = gw.reshape(units, m, 3, D).sum(1), gb.reshape(units, m, 3).sum(1)
    unit_norm = np.sqrt((unit_w ** 2).sum((1, 2)) + (unit_b ** 2).sum(1))
    np.testing.assert_allclose(norms.asnumpy(), unit_norm, rtol=1e-5, atol=1e-6)     # one per unit
    factor = np.minimum(1.0, clip * (1 - CLIP_MARGIN) / np.maximum(unit_norm, 1e-30))
    np.testing.assert_allclose(sums[0].asnumpy(), (factor[:, None, None] * unit_w).sum(0), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(sums[1].asnumpy(), (factor[:, None] * unit_b).sum(0), rtol=1e-5, atol=1e-6)


def test_refusals():
    x = np.zeros((6, D), np.float32)
    with pytest.raises(EngineConfigError, match="one unit id per row"):
        _engine(x, [0, 1, 2], m=2, batch_size=1)
    with pytest.raises(EngineConfigError, match="max_rows_per_unit is required"):
        _engine(x, [0, 0, 1, 1, 2, 2], m=None, batch_size=1)
    with pytest.raises(EngineConfigError, match="only Poisson"):
        _engine(x, [0, 0, 1, 1, 2, 2], m=2, batch_size=1, sampling="shuffle")
    with pytest.raises(EngineConfigError, match="needs unit_ids"):
        _engine(x, None, m=2, batch_size=1)
    with pytest.raises(EngineConfigError, match="exceeds the 3 units"):
        _engine(x, [0, 0, 1, 1, 2, 2], m=2, batch_size=4)
    with pytest.raises(EngineConfigError, match="multiple of max_rows_per_unit"):
        _engine(x, [0, 0, 1, 1, 2, 2], m=2, batch_size=1, micro_batch_size=3)


def test_person_report_unit_level_is_the_certificate_and_record_level_fails_closed():
    x, ids = _corpus()
    _, engine = _engine(x, ids, m=200, batch_size=5, unit_name="person")
    assert engine.unit == "person"
    assert engine.person_epsilon == engine.certificate.epsilon and engine.person_method == "unit-level"
    assert engine.record_epsilon > engine.person_epsilon and "record-level epsilon" in engine.summary
    _, rec = _engine(x, batch_size=20)
    assert rec.person_epsilon is None and "no person ids" in rec.person_method
    from accountant.mechanism import Mechanism
    from accountant.noise import Gaussian

    mech = Mechanism(Gaussian(rec.noise_multiplier), 1.0, "l2", rec.sampling_rate, rec.steps)
    people = [[0]] * 4 + [[i] for i in range(1, 10)]
    report = person_report(rec.certificate.epsilon, mech, rec.delta, unit="record", sampling="poisson",
                           record_people=people)
    assert report["person_k"] == 4 and report["person_method"] == "tight mixture"
    assert report["person_epsilon"] > rec.certificate.epsilon      # a person in 4 records: more loss
    single = person_report(rec.certificate.epsilon, None, 1e-6, unit="record", sampling="poisson",
                           record_people=[[i] for i in range(len(ids))])
    assert single["person_epsilon"] == rec.certificate.epsilon and single["person_k"] == 1
    with pytest.raises(ValueError, match="person_cap"):
        person_report(rec.certificate.epsilon, None, 1e-6, unit="record", sampling="poisson",
                      record_people=people, person_cap=3)


def test_record_epsilon_of_a_unit_level_run_bounds_a_record_changed_inside_its_unit():
    """One record removed from a unit that keeps others moves that unit's clipped sum from v to v'
    (both in the C-ball) when the unit is sampled: the worst scalar case, v = C and v' = -C, is the
    pair ((1-q) N(0) + q N(C), (1-q) N(0) + q N(-C)), integrated here by quadrature.  The unit-level
    epsilon does not cover it; the reported record_epsilon does."""
    from scipy import integrate, stats

    from accountant.certify import certify
    from accountant.mechanism import Mechanism
    from accountant.noise import Gaussian

    q, sigma, delta = 0.5, 2.0, 1e-5
    mech = Mechanism(Gaussian(sigma), 1.0, "l2", q, 1)
    unit_eps = certify(mech, delta).epsilon
    report = person_report(unit_eps, mech, delta, unit="person", sampling="poisson")
    assert report["person_epsilon"] == unit_eps and report["person_method"] == "unit-level"

    def exact_delta(eps):
        def excess(x):
            p = (1 - q) * stats.norm.pdf(x, 0, sigma) + q * stats.norm.pdf(x, 1, sigma)
            p2 = (1 - q) * stats.norm.pdf(x, 0, sigma) + q * stats.norm.pdf(x, -1, sigma)
            return max(0.0, p - np.exp(eps) * p2)
        return integrate.quad(excess, -40, 40, points=[0.0], limit=500, epsabs=1e-14)[0]

    assert exact_delta(unit_eps) > 10 * delta                 # the unit-level epsilon is not enough
    assert report["record_epsilon"] > unit_eps
    assert exact_delta(report["record_epsilon"]) <= delta     # the reported one holds
    record = person_report(unit_eps, mech, delta, unit="record", sampling="poisson", record_people=None)
    assert record["record_epsilon"] == unit_eps               # a record-level run: its own epsilon


# ---- python -m finetune --privacy-unit person ------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from accountant.certify import certify
    from accountant.mechanism import Mechanism
    from accountant.noise import Gaussian
    from accountant.table import write_certified_table
    from finetune.data import generate_records, write_jsonl

    d = tmp_path_factory.mktemp("units")
    recs = generate_records(60, seed=0, val_fraction=0.0)
    # owners only: a record that also listed the persons its PII names would have several people
    write_jsonl([{k: v for k, v in r.items() if k != "people"} | {"user": f"u{i % 12}"}
                 for i, r in enumerate(recs)], d / "users.jsonl")
    write_jsonl([dict(r, people=[i % 12] if i % 7 else [i % 12, (i + 1) % 12]) for i, r in enumerate(recs)],
                d / "people.jsonl")
    write_jsonl([dict(r, people=[i % 12]) if i else {k: v for k, v in r.items() if k != "people"}
                 for i, r in enumerate(recs)], d / "nopeople.jsonl")
    noise = Gaussian(1.0)
    cert = certify(Mechanism(noise, 1.0, "l2", 0.25, 2), 1e-5)
    write_certified_table(d / "t.npz", noise, eps_target=cert.epsilon, delta=1e-5, sampling_rate=0.25, steps=2,
                          geometry="l2", certificate=cert, gaussian_sigma=1.0)
    return d


def _cli(d, data, out, *extra):
    from finetune.__main__ import main

    return main(["--table", str(d / "t.npz"), "--model", "tiny", "--method", "bitfit", "--data", str(d / data),
                 "--out", str(out), "--seq-len", "16", "--micro-batch", "8", "--quiet", *extra])


def test_cli_person_run_reports_person_epsilon_in_metrics_and_ledger(corpus, tmp_path, capsys):
    import json

    from accountant.ledger import PrivacyLedger

    out = tmp_path / "person"
    assert _cli(corpus, "users.jsonl", out, "--privacy-unit", "person", "--max-records-per-unit", "4") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    ledger_json = json.loads((out / "ledger.json").read_text())
    ledger = PrivacyLedger.from_json((out / "ledger.json").read_text())
    assert metrics["privacy_unit"] == "person" and metrics["n_units"] == 12
    assert metrics["max_records_per_unit"] == 4 and metrics["per_example"] == "bookkeeping"
    assert metrics["expected_batch_size"] == pytest.approx(0.25 * 12)      # q over persons
    assert metrics["person_method"] == "unit-level"
    assert metrics["person_epsilon"] == metrics["epsilon_spent"] == pytest.approx(ledger.epsilon())
    assert ledger_json["person_epsilon"] == metrics["person_epsilon"] and ledger_json["privacy_unit"] == "person"
    assert ledger_json["record_epsilon"] == metrics["record_epsilon"] > metrics["person_epsilon"]
    out_text = capsys.readouterr().out
    assert "person-level epsilon" in out_text and "record-level epsilon" in out_text
    assert f"epsilon {metrics['epsilon_spent']:.4g} per person (delta" in out_text     # whose epsilon


@pytest.mark.parametrize("data, extra, message", [
    ("people.jsonl", ["--privacy-unit", "person", "--max-records-per-unit", "4"], "name several people"),
    ("people.jsonl", ["--privacy-unit", "person"], "needs --max-records-per-unit"),
    ("nopeople.jsonl", ["--privacy-unit", "person", "--max-records-per-unit", "4"], "has PII but no 'people'"),
    ("users.jsonl", ["--max-records-per-unit", "4"], "are for --privacy-unit person"),
    ("users.jsonl", ["--privacy-unit", "person", "--max-records-per-unit", "4", "--no-dp"], "no privacy unit"),
])
def test_cli_person_refusals_are_one_line(corpus, tmp_path, capsys, data, extra, message):
    assert _cli(corpus, data, tmp_path / "r", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([e for e in err if "error" in e]) == 1 and message in err[-1]
    assert not (tmp_path / "r").exists()


def test_drop_keeps_exactly_the_single_owner_records_and_removing_a_person_removes_only_theirs():
    """Method B (corpus_units(..., multi_owner='drop')) is record-local: S(D minus R_X) = S(D) minus R_X."""
    from finetune.data import record_people
    from finetune.dp.units import corpus_units

    rng = np.random.default_rng(7)
    for _ in range(30):
        recs = [{"id": i, "people": sorted(set(rng.integers(0, 8, rng.integers(0, 4)).tolist()))}
                for i in range(40)]
        full = corpus_units(record_people(recs), "person", "drop")
        kept = {recs[i]["id"]: u for i, u in zip(full.keep, full.unit_ids)}
        assert all(len(r["people"]) == 1 for r in recs if r["id"] in kept)
        assert full.dropped == sum(len(r["people"]) != 1 for r in recs)
        for x in range(8):
            rest = [r for r in recs if x not in r["people"]]
            if not any(len(r["people"]) == 1 for r in rest):
                continue
            sub = corpus_units(record_people(rest), "person", "drop")
            assert {rest[i]["id"] for i in sub.keep} == {i for i, u in kept.items() if u != x}
    with pytest.raises(ValueError, match="name several people"):
        corpus_units(record_people([{"people": [0, 1]}, {"people": [0]}]), "person")
    assert corpus_units(record_people([{"people": [0, 1]}, {"people": [0]}]), "person",
                        "record-sampling").record_people == [(0, 1), (0,)]
    assert corpus_units(record_people([{"user": "a", "people": ["a"]}, {"user": "b", "pii": [["name", "B"]]}]),
                        "person").unit_ids == ["a", "b"]
    with pytest.raises(ValueError, match="name several people"):   # the owner's record names someone else
        corpus_units(record_people([{"user": "a", "people": [0]}, {"user": "b"}]), "person")
    with pytest.raises(TypeError, match="record_people"):          # the records themselves: refused
        corpus_units([{"user": "a"}, {"user": "b"}], "person")


def test_dataset_rows_of_a_unit_run_are_whole_units():
    """engine.dataset(...) (mindspore.train.Model) cuts the same unit layout into whole units."""
    from finetune.dp.dataset import MicroBatchRows

    ids = [0] * 5 + [1] * 2 + [2, 3]
    x = np.arange(len(ids), dtype=np.float32)[:, None] * np.ones((1, D), np.float32)
    _, engine = _engine(x, ids, m=2, batch_size=2, steps=6, micro_batch_size=4)
    rows = MicroBatchRows([x], list(engine.plan()), engine.micro_batch_size, engine.ticket)
    assert len(rows)
    for i in range(len(rows)):
        data, mask = rows[i][0], rows[i][1]
        assert data.shape == (4, D) and mask.shape == (4,)
        for unit_rows, unit_mask in zip(data[:, 0].reshape(2, 2), mask.reshape(2, 2)):
            owners = {ids[int(r)] for r, k in zip(unit_rows, unit_mask) if k}
            assert len(owners) <= 1 and unit_mask.sum() <= 2


def test_cli_person_metrics_of_a_finished_guarded_run():
    """python -m finetune's person_epsilon of a table run (ReleaseGuard) is the person-level accountant
    at the steps charged so far, k = the most records naming one person; a unit-level run's is its own
    epsilon.  (It read ``guard.mechanism``, which ReleaseGuard does not have: every private CLI run
    ended in an AttributeError after its last step.)"""
    from types import SimpleNamespace

    from accountant.mechanism import Mechanism
    from accountant.noise import Gaussian
    from accountant.person import person_epsilon
    from accountant.shuffle import check_sampling
    from finetune.__main__ import _person_metrics
    from finetune.dp.release_guard import ReleaseGuard

    release = Mechanism(Gaussian(1.0), 1.0, "l2", 0.25, 1)
    guard = ReleaseGuard(release, sampling="poisson", relation=check_sampling("poisson", None), steps=5,
                         steps_in_epoch=None, delta=1e-5, budget=50.0, expected_batch_size=3.0)
    for _ in range(3):
        guard.record_step()
    args = SimpleNamespace(person_cap=None)
    people = [[0], [0, 1], [0], [2], [1]]                           # person 0 in 3 records
    m = _person_metrics(args, SimpleNamespace(guard=guard), None, people)
    expect = person_epsilon(Mechanism(Gaussian(1.0), 1.0, "l2", 0.25, 3), delta=1e-5, k=3)
    assert m["privacy_unit"] == "record" and m["person_k"] == 3
    assert m["person_epsilon"] == pytest.approx(expect.epsilon, rel=1e-9)
    assert m["person_epsilon"] > guard.epsilon_spent() > 0
    units = UnitLayout([0, 0, 1, 2], 2)
    u = _person_metrics(args, SimpleNamespace(guard=guard), units, None)
    assert u["person_method"] == "unit-level" and u["person_epsilon"] == guard.epsilon_spent()
    assert u["record_epsilon"] > u["person_epsilon"] and m["record_epsilon"] == guard.epsilon_spent()
    assert u["n_units"] == 3 and u["max_records_per_unit"] == 2
