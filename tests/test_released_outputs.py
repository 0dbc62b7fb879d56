"""What a ``python -m finetune`` run releases by default: noise and sampling nobody can replay, no
seed that was not given, and no statistic of the private data that the epsilon does not cover.

The replay attack: with a known seed (the old default) anyone can rerun the training on the corpus
with and without a record and compare with the released weights; equal weights decide membership
with certainty.  A default run must not be reproducible, a ``--seed`` run must be (and warn).
"""
import contextlib
import io
import json

import numpy as np
import pytest

from accountant.certify import certify  # noqa: E402
from accountant.mechanism import Mechanism  # noqa: E402
from accountant.noise import Gaussian  # noqa: E402
from accountant.table import write_certified_table  # noqa: E402
from finetune import checkpointing  # noqa: E402
from finetune.__main__ import main  # noqa: E402
from finetune.data import generate_records, write_jsonl  # noqa: E402

STEPS = 4
#: what a default run must neither write nor print: statistics of the private data
PRIVATE_KEYS = ("train_perplexity", "val_perplexity", "final_train_loss", "mean_batch_size",
                "losses", "batch_sizes", "loss=", "batch=", "perplexity")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("released")
    write_jsonl(generate_records(120, seed=0), d / "data.jsonl")
    noise = Gaussian(1.0)
    cert = certify(Mechanism(noise, 1.0, "l2", 0.1, STEPS), 1e-5)
    write_certified_table(d / "t.npz", noise, eps_target=cert.epsilon, delta=1e-5, sampling_rate=0.1,
                          steps=STEPS, geometry="l2", certificate=cert, gaussian_sigma=1.0)
    return d


def _run(files, out, *extra):
    """One run in this process: (exit code, stdout, stderr)."""
    argv = ["--table", str(files / "t.npz"), "--model", "tiny", "--data", str(files / "data.jsonl"),
            "--out", str(out), "--seq-len", "24", "--micro-batch", "8", "--method", "lora",
            "--lr", "0.01", *extra]
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        code = main(argv)
    return code, o.getvalue(), e.getvalue()


@pytest.fixture(scope="module")
def runs(files):
    """Two default runs (one with the progress bar), and two with --seed 5, one of them with
    --log-private-stats (same seed: the same training, so its records are the hidden values)."""
    got = {}
    for name, extra in [("default_a", ()), ("default_b", ("--quiet",)),
                        ("seeded_stats", ("--quiet", "--seed", "5", "--log-private-stats")),
                        ("seeded", ("--quiet", "--seed", "5"))]:
        out = files / name
        code, stdout, stderr = _run(files, out, *extra)
        assert code == 0, stderr[-3000:]
        got[name] = {"out": out, "stdout": stdout, "stderr": stderr,
                     "metrics": json.loads((out / "metrics.json").read_text())}
    return got


def _weights(out):
    from safetensors.numpy import load_file

    return load_file(str(out / "adapter.safetensors"))


def test_default_runs_are_not_replayable(runs):
    """Two default runs on the same corpus with the same arguments: different weights (the old
    default seed 0 gave max |victim - replay| = 0), and nothing in metrics.json to replay them."""
    a, b = _weights(runs["default_a"]["out"]), _weights(runs["default_b"]["out"])
    assert set(a) == set(b)
    diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert diff > 1e-4, diff
    for name in ("default_a", "default_b"):
        m = runs[name]["metrics"]
        assert "seed" not in m and m["run_args"]["seed"] is None
        assert m["randomness"] == "secure" and m["secure_rng"] is True
        assert "warning" not in runs[name]["stderr"]


def test_seeded_runs_are_bit_identical_and_warn(runs):
    a, b = _weights(runs["seeded"]["out"]), _weights(runs["seeded_stats"]["out"])
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    la = json.loads((runs["seeded"]["out"] / "ledger.json").read_text())
    lb = json.loads((runs["seeded_stats"]["out"] / "ledger.json").read_text())
    assert la == lb
    for name in ("seeded", "seeded_stats"):
        m = runs[name]["metrics"]
        assert m["seed"] == 5 and m["randomness"] == "seeded" and m["secure_rng"] is False
        lines = [x for x in runs[name]["stderr"].splitlines() if "--seed given" in x]
        assert len(lines) == 1 and "replay" in lines[0] and "membership" in lines[0], lines


def _private_values(run):
    """The private statistics a --log-private-stats run recorded, as they would be printed."""
    m = run["metrics"]
    _, state = checkpointing.load_checkpoint(run["out"] / "checkpoint.safetensors")
    losses, sizes = state["history"]["losses"], state["history"]["batch_sizes"]
    assert len(losses) == len(sizes) == STEPS
    values = [json.dumps(sizes)]
    for v in [m["final_train_loss"], m["train_perplexity"], m["val_perplexity"],
              m["mean_batch_size"], *losses]:
        values += [repr(v), json.dumps(v), f"{v:.3f}"]
    return values


def test_a_default_run_writes_and_prints_no_private_statistic(runs):
    stats = runs["seeded_stats"]
    assert set(stats["metrics"]["private_stats_not_covered_by_epsilon"]) == {
        "train_perplexity", "val_perplexity", "final_train_loss", "mean_batch_size"}
    assert "does not cover" in stats["stderr"] and "(not covered by epsilon)" in stats["stdout"]
    hidden = _private_values(stats)
    for name in ("default_a", "default_b", "seeded"):
        run = runs[name]
        texts = {"stdout": run["stdout"], "stderr": run["stderr"]}
        for path in sorted(p for p in run["out"].rglob("*") if p.is_file()):
            texts[path.name] = path.read_bytes().decode("latin-1")
        assert {"metrics.json", "ledger.json", "checkpoint.safetensors",
                "adapter.safetensors"} <= set(texts)
        for where, text in texts.items():
            for key in PRIVATE_KEYS:
                assert key not in text, (name, where, key)
        for where in ("stdout", "stderr", "metrics.json", "ledger.json"):
            for value in hidden if name == "seeded" else ():
                assert value not in texts[where], (name, where, value)
        _, state = checkpointing.load_checkpoint(run["out"] / "checkpoint.safetensors")
        assert set(state["history"]) == {"first_step_seconds", "later_seconds", "later_steps"}
    assert "eps<=" in runs["default_a"]["stderr"]          # the progress bar was shown


def test_poisson_sampler_without_seed_or_generator_is_secure():
    from accountant.randomness import SecureRandom
    from finetune.dp.sampling import PoissonSampler

    assert isinstance(PoissonSampler(10, 0.5, 1).rng, SecureRandom)
    assert not isinstance(PoissonSampler(10, 0.5, 1, seed=1).rng, SecureRandom)
    a, b = PoissonSampler(10_000, 0.5, 1), PoissonSampler(10_000, 0.5, 1)
    assert not np.array_equal(a.sample(), b.sample())
