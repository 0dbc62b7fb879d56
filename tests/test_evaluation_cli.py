"""The evaluation pipeline and its command line.

Fast tests drive ``finetune.evaluation.report`` with stand-in scorers whose leakage is known by
construction (a model that memorised its training set; a model that ignores it). The end-to-end test
on a real tiny GPT-2 run is marked slow.
"""
import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest

from finetune.evaluation import plots, report
from finetune.evaluation.canary import make_canaries


def _h(text):  # deterministic pseudo-random number in [0, 1) per text
    return (zlib.crc32(text.encode()) % 10007) / 10007


class StubScorer:
    """Loss 1 on memorised texts, 3 + noise elsewhere; generates memorised texts if it leaks."""

    def __init__(self, memorised=(), leak=False, delay=0.0):
        self.memorised = set(memorised)
        self.leak = leak
        self.delay = delay

    def losses(self, texts):
        return np.array([1.0 + 0.1 * _h(t) if t in self.memorised else 3.0 + _h(t) for t in texts])

    def log_perplexity(self, texts):
        return 10 * self.losses(texts)

    def perplexity(self, texts):
        return float(np.exp(np.mean(self.losses(texts))))

    def generate(self, prompts, max_new_tokens=48, top_k=40, seed=0):
        src = sorted(self.memorised) if self.leak else ["nothing to see here"]
        return [f"{p} {src[i % len(src)]}" for i, p in enumerate(prompts)]

    def generation_seconds(self, prompts, max_new_tokens=32, repeats=3, warmup=True):
        return 1.0 + self.delay


def _corpus(n=300, seed=0):
    from faker import Faker

    fk = Faker("en_US")
    fk.seed_instance(seed)
    recs = []
    for i in range(n):
        name, email, phone = fk.name(), fk.email(), fk.numerify("(###) ###-####")
        recs.append((f"{name} can be reached at {email} or {phone}. Ticket {i}.",
                     [("name", name), ("email", email), ("phone", phone)]))
    return recs


def _data(seed=0, canaries=True):
    recs = _corpus(seed=seed)
    train, hold = recs[:150], recs[150:]
    rng = np.random.default_rng(seed)
    exp = make_canaries(4, 4, rng) if canaries else []
    aud = [f"audit canary {i} code {rng.integers(10**9)}" for i in range(200)] if canaries else []
    inc = list(rng.random(len(aud)) < 0.5)
    d = report.EvalData(members=[t for t, _ in train], nonmembers=[t for t, _ in hold],
                        train_pii=[p for _, ps in train for p in ps],
                        holdout_pii=[p for _, ps in hold for p in ps],
                        exposure_canaries=exp, canary_digits=4, audit_canaries=aud,
                        audit_included=inc)
    trained = set(d.members) | {c.text for c in exp} | {a for a, i in zip(aud, inc) if i}
    return d, trained


OPTS = report.EvalOptions(n_generate=40, canary_candidates=500, mia_limit=500)


def test_memorising_model_leaks_everywhere():
    data, trained = _data()
    ft, base = StubScorer(trained, leak=True, delay=0.1), StubScorer()
    res = report.evaluate_model(ft, base, data, OPTS, epsilon=1.0, delta=1e-5)
    s = report.summarise(res, {"seconds_per_step": 0.2}, 1.0, 1e-5, None)
    assert s["mia_auc"] == 1.0 and s["mia_tpr_at_1pct_fpr"] == 1.0
    assert s["mia_inside_dp_bound"] is False and s["mia_significant_dp_violation"] is True
    assert s["pii_precision"] == 1.0 and s["pii_recall"] > 0.1
    assert s["canary_exposure_max"] == pytest.approx(math.log2(10**4))
    assert s["audit_epsilon_lower_bound"] > 1.0  # refutes the claimed eps = 1
    assert s["inference_overhead"] == pytest.approx(0.1)


def test_private_model_shows_no_leakage():
    data, _ = _data(seed=1)
    ft, base = StubScorer(), StubScorer()
    res = report.evaluate_model(ft, base, data, OPTS, epsilon=1.0, delta=1e-5)
    s = report.summarise(res, {}, 1.0, 1e-5, None)
    assert s["mia_auc_ci"][0] <= 0.5 + 0.1
    assert s["mia_significant_dp_violation"] is False and s["mia_inside_dp_bound"] is True
    assert s["pii_recall"] == 0.0
    assert s["audit_epsilon_lower_bound"] < 1.0
    for key in ["epsilon", "val_perplexity", "mia_auc", "mia_tpr_at_1pct_fpr", "pii_precision",
                "pii_recall", "audit_epsilon_lower_bound", "inference_overhead"]:
        assert key in s


def test_plots_write_png(tmp_path):
    from accountant.noise import Laplace

    rng = np.random.default_rng(0)
    fpr, tpr = np.sort(rng.random(50)), np.sort(rng.random(50))
    paths = [plots.plot_roc({"loss attack": (fpr, tpr)}, tmp_path / "roc.png", 1.0, 1e-5),
             plots.plot_perplexity_vs_epsilon([("DP", 1.0, 30.0), ("non-private", None, 20.0)],
                                              tmp_path / "ppl.png"),
             plots.plot_noise_density(Laplace(2.0), tmp_path / "noise.png", gaussian_sigma=3.0)]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _drawn_figures(monkeypatch):
    """The figures the plot functions close, kept open for inspection."""
    figs = []
    monkeypatch.setattr(plots.plt, "close", figs.append)
    return figs


def _labelled_ticks(ax, axis):
    """Tick labels with text that lie inside the axis's visible range (after drawing)."""
    lo, hi = sorted(ax.get_ylim() if axis == "y" else ax.get_xlim())
    get = ax.yaxis if axis == "y" else ax.xaxis
    ticks = get.get_majorticklabels() + get.get_minorticklabels()
    return [t.get_text() for t in ticks
            if t.get_text() and lo <= (t.get_position()[1] if axis == "y" else t.get_position()[0]) <= hi]


def test_every_plot_has_axis_labels_numbers_and_a_title(tmp_path, monkeypatch):
    """The perplexity plot of a report at eps 2 (5069.3, base 5137.2: inside one decade) had a log y
    axis with no labelled tick in view; every axis must say what it shows and where it is."""
    from accountant.noise import Laplace

    figs = _drawn_figures(monkeypatch)
    rng = np.random.default_rng(0)
    fpr, tpr = np.sort(rng.random(50)), np.sort(rng.random(50))
    plots.plot_roc({"loss attack": (fpr, tpr)}, tmp_path / "roc.png", 1.0, 1e-5)
    plots.plot_perplexity_vs_epsilon([("dp (eps 2)", 2.0, 5069.3)], tmp_path / "p1.png",
                                     base_perplexity=5137.2)
    plots.plot_perplexity_vs_epsilon([("dp", 1.0, 300.0), ("non-private", None, 20.0)],
                                     tmp_path / "p2.png", base_perplexity=900.0)
    plots.plot_noise_density(Laplace(2.0), tmp_path / "noise.png", gaussian_sigma=3.0)
    assert len(figs) == 4
    for fig in figs:
        fig.canvas.draw()
        title = fig._suptitle.get_text() if fig._suptitle is not None else ""
        for ax in fig.axes:
            assert ax.get_xlabel() and ax.get_ylabel()
            assert ax.get_title() or title
            assert len(_labelled_ticks(ax, "y")) >= 2, (ax.get_ylabel(), ax.get_ylim())
            assert len(_labelled_ticks(ax, "x")) >= 1
    # no "non-private" tick on a plot without a non-private run
    assert "non-private" not in [t.get_text() for t in figs[1].axes[0].get_xticklabels()]
    assert "non-private" in [t.get_text() for t in figs[2].axes[0].get_xticklabels()]


class ByteTokenizer:
    """Stand-in tokenizer for the scorer test: one id per UTF-8 byte."""

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i % 256 for i in ids).decode(errors="replace")


def test_lm_scorer_matches_model_loss_and_generates():
    from mindspore import Tensor

    from finetune.evaluation.scoring import LMScorer
    from finetune.models.gpt2 import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=256, n_positions=64)
    model = GPT2LMHeadModel(cfg, seed=0)
    sc = LMScorer(model, ByteTokenizer(), seq_len=32, batch_size=4)
    texts = ["hello world", "a b c d e f", "x" * 40, "PII: jane@doe.org", "zz"]
    means, counts = sc.token_losses(texts)
    ids = list("hello world".encode())
    direct = model.loss(Tensor(np.array([ids], np.int32)), Tensor(np.ones((1, len(ids)), np.float32)))
    assert means[0] == pytest.approx(float(direct.asnumpy()[0]), rel=1e-5)
    assert counts.tolist() == [10, 10, 31, 16, 1]
    assert sc.log_perplexity(texts)[0] == pytest.approx(means[0] * 10, rel=1e-6)
    assert sc.perplexity(texts) == pytest.approx(math.exp(np.sum(means * counts) / counts.sum()))
    gen = sc.generate(["ab", "hello"], max_new_tokens=5, top_k=5, seed=1)
    assert len(gen) == 2 and all(isinstance(g, str) for g in gen)
    assert sc.generation_seconds(["ab", "cd"], max_new_tokens=3) > 0


def test_lm_scorer_never_quotes_a_text_and_refuses_a_bad_seq_len():
    """A text too short to score raised ValueError("text too short to score: '<the record>'"), and
    seq_len 1 (or one above n_positions, silently shortened) was accepted."""
    from finetune.evaluation.scoring import LMScorer
    from finetune.models.gpt2 import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=256,
                                       n_positions=64), seed=0)
    for bad in (1, 0, 65):
        with pytest.raises(ValueError, match="seq_len"):
            LMScorer(model, ByteTokenizer(), seq_len=bad)
    record = "Jane Roe lives at 12 Elm Street, phone (555) 010-2233"

    class OneTokenForRecords(ByteTokenizer):  # a whole record as one token (a learned merge)
        def encode(self, text):
            return [7] if text == record else super().encode(text)

    sc = LMScorer(model, OneTokenForRecords(), seq_len=8)
    with pytest.raises(ValueError) as e:
        sc.losses(["ok text", record, "more text"])
    assert "text 1 of 3" in str(e.value)
    assert not any(w in str(e.value) for w in ("Jane", "Elm", "555"))


def test_prepare_inserts_canaries_with_fair_coins(tmp_path, capsys):
    from finetune.data import generate_records, load_records, write_jsonl
    from finetune.evaluation import prepare

    src = tmp_path / "d.jsonl"
    write_jsonl(generate_records(50, seed=0), src)
    out = tmp_path / "c.jsonl"
    assert prepare.main(["--data", str(src), "--out", str(out), "--exposure-canaries", "3",
                         "--repeats", "2", "--audit-canaries", "400", "--digits", "4"]) == 0
    truth = prepare.load_truth(str(out) + prepare.SIDE_SUFFIX)
    recs = load_records(out)
    texts = [r["text"] for r in recs if r.get("canary")]
    assert all(r["split"] == "train" for r in recs if r.get("canary"))
    included = [t for t, i in zip(truth["audit_texts"], truth["audit_included"]) if i]
    excluded = [t for t, i in zip(truth["audit_texts"], truth["audit_included"]) if not i]
    assert set(included) <= set(texts) and not set(excluded) & set(texts)
    assert 150 < len(included) < 250  # fair coins: Binomial(400, 1/2)
    for s in truth["exposure_secrets"]:
        assert sum(s in t for t in texts) == 2
    assert len(recs) == 50 + 6 + len(included)
    assert prepare.main(["--data", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
    assert "error" in capsys.readouterr().err


def _notebooks():
    from pathlib import Path

    return sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.name)
def test_committed_notebooks_are_executed_and_clean(path):
    """Executed (every code cell has run, in order), no error outputs, no machine paths."""
    nb = json.loads(path.read_text())
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert cells and all(c.get("execution_count") for c in cells)
    counts = [c["execution_count"] for c in cells]
    assert counts == sorted(counts)
    assert not any(o.get("output_type") == "error" for c in cells for o in c.get("outputs", []))
    assert any(c.get("outputs") for c in cells)
    text = path.read_text()
    for bad in ("/" + "work/", "/home/", "/tmp/"):   # split so this file holds no machine path
        assert bad not in text


@pytest.mark.slow
def test_notebook_2_reexecutes(tmp_path):
    """Re-run the cheapest notebook from its builder (about a minute)."""
    import sys

    sys.path.insert(0, str(_notebooks()[0].parent))
    import build_notebooks

    nb = build_notebooks.execute(build_notebooks.build(build_notebooks.NB2), timeout=600)
    outs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not any(o.output_type == "error" for o in outs)
    text = "".join(o.get("text", "") for o in outs)
    assert "VIOLATION" not in text and "-> caught" in text


# ----------------------------------------------------------------------------- the command
def _cli(argv):
    from finetune import evaluate

    return evaluate.main(argv)


def test_cli_help_and_user_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _cli(["--help"])
    assert e.value.code == 0
    assert "summary.json" in capsys.readouterr().out
    # missing run directory, missing metrics, missing data, bad option: one line, exit code 2
    cases = [["--run", str(tmp_path / "nope"), "--data", __file__],
             ["--run", str(tmp_path), "--data", str(tmp_path / "missing.jsonl")],
             ["--run", str(tmp_path), "--n-generate", "0"]]
    for argv in cases:
        assert _cli(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err
    (tmp_path / "metrics.json").write_text("{not json")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a", "split": "train"}\n')
    assert _cli(["--run", str(tmp_path), "--data", str(data)]) == 2
    assert "metrics.json" in capsys.readouterr().err


def test_cli_refuses_corpus_without_split(tmp_path, capsys):
    from finetune.evaluate import UserError, load_eval_data

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(30)))
    with pytest.raises(UserError, match="split"):
        load_eval_data(str(data))


@pytest.mark.slow
def test_cli_end_to_end_non_private_vs_dp(tmp_path):
    """Train a tiny GPT-2 without and with DP (Gaussian, eps 1) and evaluate both (several minutes)."""
    import subprocess
    import sys

    from accountant.certify import calibrate
    from accountant.noise import Gaussian
    from accountant.table import write_certified_table

    py = sys.executable
    run = lambda *a: subprocess.run([py, "-m", *a], cwd=tmp_path, check=True, capture_output=True,
                                    text=True)
    run("finetune.data", "--n", "400", "--val-fraction", "0.5", "--people", "60", "--split",
        "person", "--out", "d.jsonl")
    run("finetune.evaluation.prepare", "--data", "d.jsonl", "--out", "dc.jsonl",
        "--exposure-canaries", "3", "--digits", "3", "--audit-canaries", "60", "--person-canaries")
    q, steps = 0.05, 40
    sigma, _ = calibrate(lambda s: Gaussian(s), 1.0, 1e-5, q, steps, geometry="l2")
    write_certified_table(tmp_path / "g.npz", Gaussian(sigma), eps_target=1.0, delta=1e-5,
                          sampling_rate=q, steps=steps, geometry="l2", family="gaussian",
                          params={"sigma": sigma})
    run("finetune", "--no-dp", "--method", "full", "--model", "tiny", "--data", "dc.jsonl",
        "--sampling-rate", str(q), "--steps", str(steps), "--out", "nodp", "--quiet",
        "--seq-len", "32", "--seed", "0", "--log-private-stats")
    run("finetune", "--table", "g.npz", "--method", "full", "--model", "tiny", "--data", "dc.jsonl",
        "--out", "dp", "--quiet", "--seq-len", "32", "--seed", "0", "--log-private-stats")
    p = run("finetune.evaluate", "--run", "dp", "--baseline", "nodp", "--data", "dc.jsonl",
            "--table", "g.npz", "--out", "rep", "--n-generate", "16", "--mia-limit", "200",
            "--audit-draws", "200000", "--quiet")
    s = json.loads((tmp_path / "rep" / "summary.json").read_text())
    for key in ["epsilon", "val_perplexity", "mia_auc", "mia_tpr_at_1pct_fpr", "pii_precision",
                "pii_recall", "audit_epsilon_lower_bound", "inference_overhead"]:
        assert key in s
    assert s["epsilon"] <= 1.0 and s["mia_inside_dp_bound"] is True
    assert s["sampler_audit_epsilon_lower_bound"] <= s["sampler_certified_epsilon"]
    assert s["audit_epsilon_lower_bound"] <= 1.0
    assert s["baselines"]["nodp"]["val_perplexity"] < s["val_perplexity"]
    assert {"roc", "perplexity_vs_epsilon", "noise_density"} <= set(s["plots"])
    assert "epsilon" in p.stdout
    # scored at the runs' --seq-len 32: the validation perplexity is the one each run reported
    for r in (s, s["baselines"]["nodp"]):
        assert r["seq_len"] == 32 and r["run_seq_len"] == 32
        assert r["val_perplexity"] == pytest.approx(r["run_val_perplexity"], rel=1e-3)
    assert "at seq len 32 (the run's --seq-len" in p.stdout
    assert "train_perplexity" not in (tmp_path / "rep" / "summary.json").read_text()
    # the corpus is split by person: person-level membership, PII and canaries are reported, at
    # the run's person-level epsilon when it records one, else labelled record-level
    assert s["n_member_persons"] > 5 and s["n_never_seen_persons"] > 5
    assert 0.0 <= s["person_mia_auc"] <= 1.0 and s["person_canary_exposure_member_mean"] is not None
    assert s["person_epsilon"] is not None or "record-level run: no person-level bound" in p.stdout


# ------------------------------------------------------------------ the run names its corpus
def _fake_run(tmp_path, name, data, sha=None):
    from finetune.evaluate import file_sha256

    d = tmp_path / name
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps(
        {"data": str(data), "data_sha256": sha or file_sha256(data), "model": "tiny"}))
    return d


def test_run_finds_its_corpus_and_refuses_a_changed_one(tmp_path, capsys):
    from finetune.evaluate import UserError, resolve_corpus

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a", "split": "train"}\n')
    run = _fake_run(tmp_path, "run", data)
    assert resolve_corpus([str(run)]) == str(data)
    # a copy elsewhere with the same bytes is accepted through --data
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(data.read_bytes())
    assert resolve_corpus([str(run)], str(copy)) == str(copy)
    # one byte changed since training: refused, for the run and for a baseline alike
    data.write_text('{"text": "b", "split": "train"}\n')
    with pytest.raises(UserError, match="changed since"):
        resolve_corpus([str(run)])
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"text": "c", "split": "train"}\n')
    good, forged = _fake_run(tmp_path, "good", ok), _fake_run(tmp_path, "forged", ok, sha="0" * 64)
    with pytest.raises(UserError, match="forged"):
        resolve_corpus([str(good), str(forged)])
    # through the command line: one line, exit code 2
    assert _cli(["--run", str(run), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "changed since" in err
    # corpus gone, or never recorded
    data.unlink()
    with pytest.raises(UserError, match="gone"):
        resolve_corpus([str(run)])
    (run / "metrics.json").write_text(json.dumps({"model": "tiny"}))
    with pytest.raises(UserError, match="pass --data"):
        resolve_corpus([str(run)])


def _summary(**over):
    s = {"epsilon": 0.99981234, "delta": 1e-5, "val_perplexity": 4300.570697481919,
         "base_val_perplexity": 8.32811, "train_seconds_per_step": 0.41837,
         "inference_overhead": -0.1133, "mia_attack": "reference", "mia_auc": 0.56034,
         "mia_auc_ci": [0.5251, 0.5961], "mia_tpr_at_1pct_fpr": 0.038, "mia_inside_dp_bound": True,
         "mia_dp_bound_max_excess": 0.0262, "pii_precision": 0.0, "pii_recall": 0.0,
         "pii_holdout_recall": 0.0, "pii_extracted": 91, "canary_exposure_mean": 1.3389,
         "canary_exposure_max": 4.3541, "audit_epsilon_lower_bound": 0.0,
         "sampler_audit_epsilon_lower_bound": 0.6461, "sampler_certified_epsilon": 0.9589,
         "plots": {"roc": "roc.png"}}
    s.update(over)
    return s


def test_summary_text_is_rounded_and_explains_its_terms():
    from finetune.evaluation.report import GLOSSARY, summary_text

    base = _summary(epsilon=None, delta=None, val_perplexity=4.1101, mia_auc=0.6786,
                    mia_inside_dp_bound=None, pii_precision=0.0946, audit_epsilon_lower_bound=0.1287)
    text = summary_text(_summary(baselines={"nodp": base}), "report")
    assert "val perplexity 4300.57 (base 8.33)" in text
    assert "epsilon 0.9999 (delta 1e-05)" in text and "inside the DP bound at 95%: yes" in text
    assert "baseline nodp (non-private): val perplexity 4.11, MIA AUC 0.679" in text
    assert "4300.570697" not in text and "0.99981234" not in text
    terms = text.split("terms (one line each):\n")[1].splitlines()
    for term, _ in GLOSSARY:  # every term used above is explained on its own line
        assert sum(line.strip().startswith(term + " ") for line in terms) == 1
    assert {"base", "inside the DP bound at 95%"} <= {t for t, _ in GLOSSARY}
    # no canaries: the audit line says how to get them instead of a bare n/a
    text = summary_text(_summary(audit_epsilon_lower_bound=None, canary_exposure_max=None))
    assert "python -m finetune.evaluation.prepare" in text
    # a significant violation is shouted
    assert "inside the DP bound at 95%: NO" in summary_text(_summary(mia_inside_dp_bound=False))
    # a certified epsilon is rounded up, never printed below its value
    assert "epsilon 1.001 (delta" in summary_text(_summary(epsilon=1.0000001))
    assert "epsilon 0.3 (delta" in summary_text(_summary(epsilon=0.3))


def test_prepare_refuses_to_overwrite_without_the_flag(tmp_path):
    """finetune.evaluation.prepare replaced an existing corpus and its ground truth silently."""
    import subprocess
    import sys

    from finetune.data import generate_records, write_jsonl

    write_jsonl(generate_records(30, seed=3), str(tmp_path / "d.jsonl"))
    out = tmp_path / "c.jsonl"
    out.write_text("keep me\n")
    cmd = [sys.executable, "-m", "finetune.evaluation.prepare", "--data", str(tmp_path / "d.jsonl"),
           "--out", str(out), "--audit-canaries", "4", "--exposure-canaries", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--overwrite" in r.stderr
    assert out.read_text() == "keep me\n" and not (tmp_path / "c.jsonl.canaries.json").exists()
    r = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_text() != "keep me\n" and (tmp_path / "c.jsonl.canaries.json").exists()


# ------------------------------------------- the command on a stand-in run (no model, seconds)
RUN_METRICS = {"private": True, "epsilon_spent": 0.9, "delta": 1e-5, "method": "lora",
               "model": "tiny", "seed": 0, "steps": 4, "val_perplexity": 5069.3,
               "seconds_per_step": 0.37, "train_perplexity": 4321.987654,
               "final_train_loss": 8.371234, "mean_batch_size": 4.567891,
               "run_args": {"seq_len": 32}}
REAL_LOAD_RUN = __import__("finetune.evaluate", fromlist=["load_run"]).load_run
FAST = ["--n-generate", "12", "--mia-limit", "500", "--audit-draws", "0", "--quiet"]


def _table(path, scale):
    from accountant.noise import Laplace
    from accountant.table import write_certified_table

    write_certified_table(path, Laplace(scale), eps_target=2.0, delta=1e-5, sampling_rate=1.0,
                          steps=1, geometry="l1", family="laplace", gaussian_sigma=3.0)
    return path


@pytest.fixture
def stub_run(tmp_path, monkeypatch):
    """A run folder (metrics.json naming its corpus and table, both with their sha256) evaluated
    with stand-in models: ``load_run`` and ``make_scorers`` are replaced, the rest is the command."""
    from types import SimpleNamespace

    from finetune import evaluate
    from finetune.data import generate_records, write_jsonl

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "d.jsonl"
    write_jsonl(generate_records(60, seed=0, val_fraction=0.5), str(data))
    table = _table(tmp_path / "t.npz", 2.0)
    run = tmp_path / "run"
    run.mkdir()
    metrics = dict(RUN_METRICS, data=str(data), data_sha256=evaluate.file_sha256(data),
                   table="t.npz", table_sha256=evaluate.file_sha256(table))
    (run / "metrics.json").write_text(json.dumps(metrics))
    env = SimpleNamespace(dir=tmp_path, run=run, out=tmp_path / "rep", seq_lens=[],
                          ft=StubScorer(), metrics=metrics)

    def load_run(run_dir, model_override=None):
        return json.loads((Path(run_dir) / "metrics.json").read_text()), "ft", "base"

    def make_scorers(ft, base, seq_len, max_new_tokens):
        env.seq_lens.append(seq_len)
        return env.ft, StubScorer()

    monkeypatch.setattr(evaluate, "load_run", load_run)
    monkeypatch.setattr(evaluate, "make_scorers", make_scorers)
    # figures are built but not rendered (rendering is most of a stand-in evaluation's time; the
    # plots themselves are tested above)
    monkeypatch.setattr(plots.plt.Figure, "savefig",
                        lambda fig, path, **k: Path(path).write_bytes(b"png"))
    return env


def _nothing_left(env):
    """No --out and no hidden staging folder next to it."""
    return not env.out.exists() and not [p for p in env.dir.iterdir() if p.name.startswith(".rep")]


def _one_line(err):
    return err.count("\n") == 1 and "Traceback" not in err


def test_cli_checks_every_option_before_any_work(stub_run, capsys, monkeypatch):
    """--seq-len 1 was accepted and ended 40 s later in a traceback; every option is now checked
    before a model is loaded, in one line, with nothing written."""
    from finetune import evaluate

    def no_work(*a, **k):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(evaluate, "load_run", no_work)
    monkeypatch.setattr(evaluate, "make_scorers", no_work)
    _table(stub_run.dir / "other.npz", 2.5)
    cases = {"--seq-len": ["--seq-len", "1"], "--top-k": ["--top-k", "-1"],
             "--mia-limit": ["--mia-limit", "3"], "--seed": ["--seed", "-2"],
             "--max-new-tokens": ["--max-new-tokens", "0"], "--audit-draws": ["--audit-draws", "10"],
             "--canaries": ["--canaries", "missing.json"], "--table": ["--table", "other.npz"]}
    for flag, bad in cases.items():
        rc = _cli(["--run", str(stub_run.run), "--out", str(stub_run.out)] + FAST + bad)
        err = capsys.readouterr().err
        assert rc == 2 and _one_line(err) and flag in err, (flag, err)
        assert _nothing_left(stub_run)


def test_cli_error_shows_no_data_and_leaves_no_output(stub_run, capsys):
    """An error inside the evaluation printed a traceback whose message was a whole record and left
    an empty --out (the corrected rerun then needed --overwrite)."""
    record = None

    class FailsQuoting(StubScorer):
        def losses(self, texts):
            nonlocal record
            record = texts[0]
            raise ValueError(f"cannot score {record!r}")

    stub_run.ft = FailsQuoting()
    argv = ["--run", str(stub_run.run), "--out", str(stub_run.out)] + FAST
    assert _cli(argv) == 1
    err = capsys.readouterr().err
    assert _one_line(err) and "internal error: ValueError" in err
    assert record and record not in err and record.split()[0] not in err
    assert _nothing_left(stub_run)
    stub_run.ft = StubScorer()  # the corrected rerun needs no --overwrite
    assert _cli(argv) == 0
    assert (stub_run.out / "summary.json").is_file() and _nothing_left(stub_run) is False
    assert not [p for p in stub_run.dir.iterdir() if p.name.startswith(".rep")]


def test_cli_missing_weights_or_model_typo_leaves_no_output(stub_run, capsys, monkeypatch):
    """A missing adapter or a model-name typo exited 2 but left an empty --out behind."""
    from finetune import evaluate

    monkeypatch.setattr(evaluate, "load_run", REAL_LOAD_RUN)
    for extra, says in (([], "adapter.safetensors not found"), (["--model", "tinyy"], "tinyy")):
        assert _cli(["--run", str(stub_run.run), "--out", str(stub_run.out)] + FAST + extra) == 2
        err = capsys.readouterr().err
        assert _one_line(err) and says in err, err
        assert _nothing_left(stub_run)


def test_cli_refuses_a_table_the_run_did_not_use(stub_run, capsys):
    """--table with another table was accepted and audited as if the run had used it."""
    base = ["--run", str(stub_run.run), "--out", str(stub_run.out)] + FAST
    _table(stub_run.dir / "other.npz", 2.5)
    assert _cli(base + ["--table", "other.npz"]) == 2
    err = capsys.readouterr().err
    assert _one_line(err) and "not the table" in err and _nothing_left(stub_run)
    # the run's own table: accepted, audited and drawn
    assert _cli(base + ["--table", "t.npz"]) == 0
    s = json.loads((stub_run.out / "summary.json").read_text())
    assert s["noise_table"] == "t.npz" and s["sampler_certified_epsilon"] is not None
    assert "noise_density" in s["plots"] and (stub_run.out / "noise_density.png").is_file()
    (stub_run.out / "notes.txt").write_text("mine")
    # looked up by name: a different file under the run's table name is not used (and --overwrite
    # leaves no plot of the earlier report beside the new one, and no file of the user's removed)
    (stub_run.dir / "t.npz").replace(stub_run.dir / "kept.npz")
    (stub_run.dir / "other.npz").replace(stub_run.dir / "t.npz")
    capsys.readouterr()
    assert _cli(base + ["--overwrite"]) == 0
    s = json.loads((stub_run.out / "summary.json").read_text())
    assert s["noise_table"] is None and "not found" in s["sampler_audit_note"]
    assert "not found" in capsys.readouterr().out
    assert "noise_density" not in s["plots"] and not (stub_run.out / "noise_density.png").exists()
    assert (stub_run.out / "notes.txt").read_text() == "mine"


def test_cli_scores_at_the_runs_seq_len_and_leaves_out_training_statistics(stub_run, capsys):
    """The run reported its validation perplexity at its --seq-len 32; evaluate scored at 64 and
    printed a different number without a word. And summary.json carried the run's train
    perplexity, a statistic of the private training records that the epsilon does not cover."""
    base = ["--run", str(stub_run.run), "--out", str(stub_run.out)] + FAST
    assert _cli(base) == 0
    printed = capsys.readouterr().out
    s = json.loads((stub_run.out / "summary.json").read_text())
    assert stub_run.seq_lens == [32] and s["seq_len"] == 32 and s["run_seq_len"] == 32
    assert s["seq_len_source"] == "the run's --seq-len" and s["run_val_perplexity"] == 5069.3
    assert "at seq len 32 (the run's --seq-len; the run reported 5069.30)" in printed
    for name in ("summary.json", "details.json"):
        text = (stub_run.out / name).read_text()
        for key in ("train_perplexity", "final_train_loss", "mean_batch_size", "mean_loss_members",
                    "4321.98", "8.3712", "4.5678"):
            assert key not in text and key not in printed, (name, key)
    # another --seq-len on request, labelled; training statistics on request, labelled
    assert _cli(base + ["--overwrite", "--seq-len", "48", "--include-training-stats"]) == 0
    printed = capsys.readouterr().out
    assert stub_run.seq_lens[-1] == 48
    assert "at seq len 48 (--seq-len; the run reported 5069.30 at seq len 32)" in printed
    s = json.loads((stub_run.out / "summary.json").read_text())
    stats = s["training_data_statistics_not_covered_by_epsilon"]
    assert stats["train_perplexity"] == 4321.987654 and stats["mean_batch_size"] == 4.567891
    assert "not cover" in stats["note"] and "NOT covered" in printed
    # a run that does not record its --seq-len: the default, labelled as such
    (stub_run.run / "metrics.json").write_text(json.dumps(
        {k: v for k, v in stub_run.metrics.items() if k != "run_args"}))
    assert _cli(base + ["--overwrite"]) == 0
    assert stub_run.seq_lens[-1] == 64 and "records no --seq-len" in capsys.readouterr().out


def test_cli_sigterm_leaves_no_output(stub_run):
    """Killed (SIGTERM) during the evaluation: one line, exit code 143, no --out and no staging
    folder left (the old command died with an empty --out behind)."""
    import signal
    import subprocess
    import sys
    import time

    child = ("import json, sys, time\n"
             "from pathlib import Path\n"
             "from finetune import evaluate\n"
             "evaluate.load_run = lambda d, m=None: (json.loads((Path(d) / 'metrics.json')"
             ".read_text()), 'ft', 'base')\n"
             "evaluate.make_scorers = lambda *a: time.sleep(600)\n"
             "sys.exit(evaluate.main(sys.argv[1:]))\n")
    p = subprocess.Popen([sys.executable, "-c", child, "--run", "run", "--out", "rep"] + FAST,
                         cwd=stub_run.dir, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not [q for q in stub_run.dir.iterdir()
                                          if q.name == "rep" or q.name.startswith(".rep")]:
        time.sleep(0.2)
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 143 and _one_line(err) and "interrupted" in err, (p.returncode, err)
    assert _nothing_left(stub_run)


# ------------------------------------------------------------------- person-level evaluation
def _person_corpus(stub_run, canaries=False):
    """Replace the stand-in run's corpus with one split by person (and its sha256 in metrics)."""
    from finetune import data, evaluate
    from finetune.evaluation import prepare

    recs = data.generate_records(240, seed=1, val_fraction=0.5, people=40)
    tr, va, _ = data.split_by_person(recs, 0.5, seed=1)
    corpus = [dict(r, split="train") for r in tr] + [dict(r, split="val") for r in va]
    path = stub_run.dir / "d.jsonl"
    if canaries:
        corpus, truth = prepare.insert_canaries(corpus, 0, 3, 1, 0, seed=0)
        corpus, truth = prepare.insert_person_canaries(corpus, truth, digits=3, seed=0)
        (stub_run.dir / "d.jsonl.canaries.json").write_text(json.dumps(truth))
    data.write_jsonl(corpus, path)
    stub_run.metrics["data_sha256"] = evaluate.file_sha256(path)
    (stub_run.run / "metrics.json").write_text(json.dumps(stub_run.metrics))
    return [r for r in corpus if r["split"] == "train"]


def test_cli_person_level_membership_against_the_person_epsilon(stub_run, capsys):
    """A model that memorised its training records exposes its training *persons*: the person MIA
    (a person's records scored together, members = training persons, non-members = persons never
    seen) finds them, and that is significantly outside the limits of a person-level epsilon 0.5.
    A model that learned nothing stays inside. Without person_epsilon the run is labelled
    record-level and no verdict is drawn from its record-level epsilon."""
    train = _person_corpus(stub_run, canaries=True)
    stub_run.ft = StubScorer(memorised=[r["text"] for r in train], leak=True)
    base = ["--run", str(stub_run.run), "--out", str(stub_run.out)] + FAST
    stub_run.metrics.update(person_epsilon=0.5, person_k=12, person_method="tight mixture")
    (stub_run.run / "metrics.json").write_text(json.dumps(stub_run.metrics))
    assert _cli(base) == 0
    printed = capsys.readouterr().out
    s = json.loads((stub_run.out / "summary.json").read_text())
    assert s["person_epsilon"] == 0.5 and s["person_k"] == 12 and s["person_bound_basis"] == "person-level"
    assert s["n_member_persons"] > 10 and s["n_never_seen_persons"] > 10
    assert s["person_mia_auc"] == 1.0 and s["person_mia_tpr_at_1pct_fpr"] == 1.0
    assert s["person_mia_auc_limit"] == pytest.approx(
        __import__("finetune.evaluation.membership", fromlist=["x"]).dp_auc_bound(0.5, 1e-5))
    assert s["person_mia_inside_dp_bound"] is False
    # 12 generations, each a memorised record: some member persons' PII, none of the others'
    assert s["person_pii_recall"] > 0.1 and s["person_pii_never_seen_recall"] == 0.0
    assert s["person_pii_precision"] == 1.0
    assert s["member_persons_exposed"] > 0.1 and s["never_seen_persons_exposed"] == 0.0
    assert s["person_canary_exposure_member_mean"] is not None
    assert "person-level epsilon 0.5 (a person in at most 12 records; tight mixture)" in printed
    assert "inside at 95%: NO" in printed

    stub_run.ft = StubScorer()
    assert _cli(base + ["--overwrite"]) == 0
    s = json.loads((stub_run.out / "summary.json").read_text())
    assert s["person_mia_inside_dp_bound"] is True and s["person_mia_auc"] < 0.8
    capsys.readouterr()

    del stub_run.metrics["person_epsilon"]
    (stub_run.run / "metrics.json").write_text(json.dumps(stub_run.metrics))
    assert _cli(base + ["--overwrite"]) == 0
    printed = capsys.readouterr().out
    s = json.loads((stub_run.out / "summary.json").read_text())
    assert s["person_epsilon"] is None and s["person_mia_inside_dp_bound"] is None
    assert "record-level run: no person-level bound" in printed
    assert "record-level epsilon, NOT a limit for persons" in printed
    assert s["person_bound_basis"].startswith("record-level run: no person-level bound")


def test_cli_record_split_corpus_has_no_person_level_membership(stub_run, capsys):
    """A corpus split by record with few persons: every person is on both sides, so there are no
    never-seen persons and the report says how to get them."""
    from finetune import data, evaluate

    recs = data.generate_records(200, seed=0, val_fraction=0.5, people=8)
    tr, va = data.split_records(recs)
    assert {x for r in tr for x in r["people"]} == {x for r in va for x in r["people"]}
    data.write_jsonl(recs, stub_run.dir / "d.jsonl")
    stub_run.metrics["data_sha256"] = evaluate.file_sha256(stub_run.dir / "d.jsonl")
    (stub_run.run / "metrics.json").write_text(json.dumps(stub_run.metrics))
    assert _cli(["--run", str(stub_run.run), "--out", str(stub_run.out)] + FAST) == 0
    printed = capsys.readouterr().out
    s = json.loads((stub_run.out / "summary.json").read_text())
    assert s["person_mia_auc"] is None and "--split person" in s["person_note"]
    assert "--split person" in printed


def test_cli_refuses_pii_without_persons_by_index(stub_run, capsys):
    from finetune import data, evaluate

    recs = data.generate_records(60, seed=0, val_fraction=0.5)
    secret = recs[7]["text"]
    del recs[7]["people"]
    data.write_jsonl(recs, stub_run.dir / "d.jsonl")
    stub_run.metrics["data_sha256"] = evaluate.file_sha256(stub_run.dir / "d.jsonl")
    (stub_run.run / "metrics.json").write_text(json.dumps(stub_run.metrics))
    assert _cli(["--run", str(stub_run.run), "--out", str(stub_run.out)] + FAST) == 2
    err = capsys.readouterr().err
    assert _one_line(err) and "has PII but no 'people' field" in err and secret not in err
    assert _nothing_left(stub_run)


def test_summary_of_a_person_level_run_names_its_record_level_epsilon_and_dropped_canaries():
    from finetune.evaluate import DROPPED_CANARIES
    from finetune.evaluation.report import summary_text

    person = dict(privacy_unit="person", person_epsilon=0.99981234, person_method="unit-level")
    text = summary_text(_summary(record_epsilon=2.46107, audit_epsilon_lower_bound=0.1, **person))
    head = text.splitlines()[0]
    assert head.startswith("epsilon 0.9999 (delta 1e-05) per person; record-level epsilon 2.462")
    assert "audit     one-run empirical eps >= 0.1 (95%), certified 2.462" in text
    # a run that did not record one: said, and no record-level verdict drawn
    text = summary_text(_summary(record_epsilon=None, mia_inside_dp_bound=None, **person))
    assert "record-level epsilon not recorded by the run" in text.splitlines()[0]
    assert "inside the DP bound" not in text.split("terms (one line each):")[0]
    # a --multi-owner drop run never trained the exposure and audit canaries: n/a and why
    text = summary_text(_summary(record_epsilon=2.46, canary_note=DROPPED_CANARIES,
                                 audit_epsilon_lower_bound=None, canary_exposure_max=None, **person))
    assert f"audit     {DROPPED_CANARIES}" in text
    # a record-level run is unchanged
    assert "per person" not in summary_text(_summary()).splitlines()[0]
