"""``python -m finetune`` end to end, the training loop on GPT-2 (what each method may change), and
user-error handling (one line, exit code 2)."""
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

import mindspore as ms

from accountant.ledger import PrivacyLedger  # noqa: E402
from accountant.noise import Gaussian  # noqa: E402
from helpers import certified_table  # noqa: E402
from finetune.__main__ import main  # noqa: E402
from finetune.data import generate_records, write_jsonl  # noqa: E402

METRIC_KEYS = {"steps", "epsilon_spent", "delta", "seconds_per_step", "peak_rss_mb", "randomness"}
#: statistics of the private data, recorded only with --log-private-stats
PRIVATE_KEYS = {"train_perplexity", "val_perplexity", "final_train_loss", "mean_batch_size"}


def _table(path, sigma, geometry, q, steps, delta=1e-5):
    return certified_table(path, Gaussian(sigma), geometry, q, steps, delta)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    write_jsonl(generate_records(120, seed=0), d / "data.jsonl")
    _table(d / "l2.npz", 1.0, "l2", 0.1, 4)
    _table(d / "scalar.npz", 1.0, "scalar", 0.1, 4)
    return d


def _run(files, out, *extra):
    return main(["--table", str(files / "l2.npz"), "--model", "tiny", "--data", str(files / "data.jsonl"),
                 "--out", str(out), "--seq-len", "24", "--micro-batch", "8", "--quiet", *extra])


def test_cli_dp_lora_writes_adapter_ledger_and_metrics(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(files, out, "--method", "lora", "--lr", "0.01", "--log-private-stats") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # the summary says whose privacy the epsilon protects
    assert f"epsilon {metrics['epsilon_spent']:.4g} per record (delta" in capsys.readouterr().out
    assert METRIC_KEYS | PRIVATE_KEYS <= set(metrics)
    assert set(metrics["private_stats_not_covered_by_epsilon"]) == PRIVATE_KEYS
    assert metrics["steps"] == 4 and metrics["private"] and metrics["per_example"] == "bookkeeping"
    assert metrics["expected_batch_size"] == pytest.approx(0.1 * metrics["n_train"])
    ledger = PrivacyLedger.from_json((out / "ledger.json").read_text())
    assert ledger.steps == 4
    assert metrics["epsilon_spent"] == pytest.approx(ledger.epsilon())
    assert 0 < metrics["epsilon_spent"] <= metrics["certified_epsilon_of_table"] * (1 + 1e-9)
    assert metrics["train_perplexity"] > 1 and metrics["val_perplexity"] > 1
    from safetensors.numpy import load_file

    from finetune.models.checkpoint import from_pretrained
    from finetune.models.peft import is_adapter_name, load_adapter

    saved = load_file(str(out / "adapter.safetensors"))
    assert saved and all(is_adapter_name(k) for k in saved)
    assert any(np.abs(v).max() > 0 for k, v in saved.items() if k.endswith("lora_B"))  # trained
    model = from_pretrained("tiny")
    load_adapter(model, out / "adapter.safetensors")
    got = dict(model.parameters_and_names())
    for k, v in saved.items():
        np.testing.assert_array_equal(got[k].asnumpy(), v)


def test_cli_no_dp_bitfit_baseline(files, tmp_path):
    out = tmp_path / "base"
    assert _run(files, out, "--method", "bitfit", "--no-dp", "--max-steps", "2") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics) and not PRIVATE_KEYS & set(metrics)
    assert metrics["private"] is False and metrics["epsilon_spent"] is None
    assert metrics["steps"] == 2 and metrics["per_example"] == "none"
    assert not (out / "ledger.json").exists()
    assert (out / "adapter.safetensors").exists()


@pytest.mark.parametrize("args, message", [
    (["--sampling-rate", "0.2"], "does not match the table's certified rate"),
    (["--max-steps", "5"], "certifies only 4 steps"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--seed", "1", "--secure"], "--seed and --secure exclude each other"),
])
def test_cli_user_errors_are_one_line_exit_2(files, tmp_path, capsys, args, message):
    argv = list(args) + ([] if "--method" in args else ["--method", "lora"])
    assert _run(files, tmp_path / "x", *argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_cli_refuses_scalar_table_and_missing_files(files, tmp_path, capsys):
    base = ["--model", "tiny", "--method", "lora", "--out", str(tmp_path / "o"), "--quiet"]
    assert main(["--table", str(files / "scalar.npz"), "--data", str(files / "data.jsonl"), *base]) == 2
    assert "scalar certificate covers one real-valued query" in capsys.readouterr().err
    assert main(["--table", str(tmp_path / "none.npz"), "--data", str(files / "data.jsonl"), *base]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["--data", str(files / "data.jsonl"), *base]) == 2
    assert "--table is required" in capsys.readouterr().err


def test_cli_process_exit_code_and_help(files, tmp_path):
    r = subprocess.run([sys.executable, "-m", "finetune", "--table", str(files / "l2.npz"),
                        "--method", "lora", "--model", "nonexistent-model", "--data",
                        str(files / "data.jsonl"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("python -m finetune: error: cannot load model")
    assert "Traceback" not in r.stderr
    h = subprocess.run([sys.executable, "-m", "finetune", "--help"], capture_output=True, text=True,
                       timeout=300)
    assert h.returncode == 0 and "--no-dp" in h.stdout and "--per-example" in h.stdout
    text = " ".join(h.stdout.split())
    assert "fresh OS entropy" in text and "public seed" in text and "--log-private-stats" in text


# ---------------------------------------------------------------------------------------------
# what each method may change (train() on a small GPT-2)
# ---------------------------------------------------------------------------------------------
def _small_model():
    from finetune.models.gpt2 import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=61, n_positions=16),
                           seed=0)


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_dp_training_changes_only_what_the_method_trains(files, method):
    from finetune.models.peft import apply_bitfit, apply_lora, is_adapter_name
    from finetune.train import train

    ms.set_context(mode=ms.GRAPH_MODE)
    model = _small_model()
    if method == "lora":
        apply_lora(model, r=2, alpha=4.0, targets=("c_attn", "c_fc"))
        allowed = is_adapter_name
    else:
        apply_bitfit(model)
        allowed = lambda n: n.endswith(".bias")  # noqa: E731
    before = {n: p.asnumpy().copy() for n, p in model.parameters_and_names()}
    rs = np.random.RandomState(0)
    ids = rs.randint(0, 61, (40, 12)).astype(np.int32)
    mask = np.ones((40, 12), np.float32)
    table = _table(files / f"t_{method}.npz", 1.0, "l2", 0.1, 3)
    result = train(model, ids, mask, table=table, lr=0.05, micro_batch_size=8, progress=False,
                   evaluate=False)
    assert result.metrics["steps"] == 3
    changed = {n for n, p in model.parameters_and_names() if not np.array_equal(p.asnumpy(), before[n])}
    assert changed and all(allowed(n) for n in changed), sorted(changed)


@pytest.mark.slow
def test_short_dp_lora_run_lowers_validation_loss(tmp_path):
    from finetune.models.checkpoint import from_pretrained
    from finetune.data import load_dataset
    from finetune.models.peft import apply_lora
    from finetune.models.tokenizer import load_tokenizer
    from finetune.train import perplexity, train

    ms.set_context(mode=ms.GRAPH_MODE)
    write_jsonl(generate_records(1500, seed=1), tmp_path / "d.jsonl")
    model = from_pretrained("tiny", seed=0)
    data = load_dataset(tmp_path / "d.jsonl", load_tokenizer(model.config.vocab_size), seq_len=48)
    apply_lora(model, r=8, alpha=16.0, targets=("c_attn", "c_fc", "c_proj"))
    before = perplexity(model, data.val.ids, data.val.mask)
    table = _table(tmp_path / "t.npz", 1.0, "l2", 0.04, 60)
    result = train(model, data.train.ids, data.train.mask, data.val.ids, data.val.mask, table=table,
                   lr=0.01, max_grad_norm=1.0, micro_batch_size=16, progress=False)
    assert result.metrics["epsilon_spent"] <= table.certified_epsilon * (1 + 1e-9)
    assert result.metrics["val_perplexity"] < 0.9 * before, (before, result.metrics)


def test_msrun_leaves_every_finetune_flag_to_the_script(monkeypatch):
    """msrun's own parser matches abbreviations of its options anywhere on the command line (a
    script flag ``--worker`` aborts msrun as an abbreviation of ``--worker_num``): every flag of
    ``python -m finetune`` must reach the script unchanged."""
    from mindspore.parallel.cluster import run
    from finetune.__main__ import _parser

    def script_args(flag):
        monkeypatch.setattr(sys, "argv", ["msrun", "--worker_num=2", "--local_worker_num=2",
                                          "--join=True", "python", "-m", "finetune", flag, "1"])
        try:
            args = run.get_args()
        except SystemExit:
            return None
        return [args.task_script, *args.task_script_args]

    assert script_args("--worker") is None  # the hazard this test guards against is real
    flags = [f for f in _parser()._option_string_actions if f.startswith("--")]
    assert "--table" in flags and "--max-grad-norm" in flags
    for flag in flags:
        assert script_args(flag) == ["python", "-m", "finetune", flag, "1"], flag


def test_train_api_draws_secure_randomness_unless_seeded_and_warns_on_a_seed(files):
    """train(): no default seed (secure ChaCha20); a given seed warns and is recorded as seeded."""
    from accountant.randomness import KnownSeedWarning
    from finetune.models.peft import apply_bitfit
    from finetune.train import train

    ms.set_context(mode=ms.GRAPH_MODE)
    ids = np.random.RandomState(0).randint(0, 61, (40, 12)).astype(np.int32)
    mask = np.ones_like(ids, np.float32)
    table = _table(files / "t_api.npz", 1.0, "l2", 0.1, 1)
    results = []
    for seed in (None, 3):
        model = _small_model()
        apply_bitfit(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results.append(train(model, ids, mask, table=table, seed=seed, micro_batch_size=8,
                                 progress=False, evaluate=False))
        seed_warnings = [w for w in caught if issubclass(w.category, KnownSeedWarning)]
        assert len(seed_warnings) == (0 if seed is None else 1)
    default, seeded = (r.metrics for r in results)
    assert default["randomness"] == "secure" and default["secure_rng"] is True
    assert seeded["randomness"] == "seeded" and seeded["secure_rng"] is False
    assert not {"mean_batch_size", "final_train_loss"} & set(default)
