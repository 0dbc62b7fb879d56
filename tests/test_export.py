"""python -m finetune.export: PEFT LoRA adapter layout, merged checkpoints, DP metadata, bad inputs.

The expected PEFT layout below is written by hand from PEFT's documented format (``LoraConfig``
fields; ``get_peft_model_state_dict`` keys ``base_model.model.<module>.lora_A.weight`` [r, in] and
``lora_B.weight`` [out, r], for GPT-2's Conv1D layers too, with ``fan_in_fan_out`` true), not from
the exporter.
"""
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from mindspore import Tensor

from finetune import export
from finetune.models import checkpoint, peft
from finetune.models.gpt2 import GPT2Config, GPT2LMHeadModel, assign_parameter
from finetune.models.llama import LlamaConfig, LlamaForCausalLM

GPT2 = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=61, n_positions=32)
LLAMA = LlamaConfig(model_type="llama", vocab_size=61, hidden_size=32, intermediate_size=48,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=32)

# PEFT adapter_model.safetensors keys and shapes for r = 2 (hidden 32; GPT-2 c_attn out 96;
# Llama q_proj out 4 heads x 8 = 32, v_proj out 2 kv heads x 8 = 16)
EXPECTED_KEYS = {
    "gpt2": {f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{ab}.weight": shape
             for i in range(2) for ab, shape in (("A", [2, 32]), ("B", [96, 2]))},
    "llama": {f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight": shape
              for i in range(2) for m, out in (("q_proj", 32), ("v_proj", 16))
              for ab, shape in (("A", [2, 32]), ("B", [out, 2]))},
}
EXPECTED_CONFIG = {
    "gpt2": {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 8.0, "bias": "none",
             "target_modules": ["c_attn"], "fan_in_fan_out": True},
    "llama": {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 8.0, "bias": "none",
              "target_modules": ["q_proj", "v_proj"], "fan_in_fan_out": False},
}
IDS = Tensor(np.random.default_rng(1).integers(0, 61, (2, 7)).astype(np.int32))
MASK = Tensor(np.array([[1] * 7, [1] * 5 + [0] * 2], np.float32))
EPS, DELTA = 1.2345678901, 1e-5


def _run_dir(tmp_path, arch="gpt2", method="lora", private=True, metrics_extra=None):
    """A run folder laid out as python -m finetune writes it, with a trained (perturbed) adapter."""
    base_dir = tmp_path / f"base-{arch}"
    model = GPT2LMHeadModel(GPT2, seed=5) if arch == "gpt2" else LlamaForCausalLM(LLAMA, seed=5)
    if not base_dir.exists():
        checkpoint.save_pretrained(model, base_dir)
    if method == "lora":
        peft.apply_lora(model, r=2, alpha=8.0, targets=("c_attn",) if arch == "gpt2" else ("q_proj", "v_proj"))
    elif method == "houlsby":
        peft.apply_adapters(model, size=4)
    else:
        peft.apply_norm_only(model) if arch == "llama" else peft.apply_bitfit(model)
    rng = np.random.default_rng(9)
    for _, p in model.parameters_and_names():
        if p.requires_grad:
            assign_parameter(p, p.asnumpy() + rng.normal(0, 0.3, p.shape))
    run = tmp_path / f"run-{arch}-{method}"
    run.mkdir()
    peft.save_adapter(model, run / "adapter.safetensors")
    metrics = {"method": method, "model": str(base_dir), "private": private, "weights": "adapter.safetensors",
               "epsilon_spent": EPS if private else None, "delta": DELTA if private else None,
               "table_sha256": "ab" * 32 if private else None, "steps": 3}
    metrics.update(metrics_extra or {})
    (run / "metrics.json").write_text(json.dumps(metrics))
    if private:
        (run / "ledger.json").write_text(json.dumps({"ledger_version": 1, "delta": DELTA, "epsilon_spent": EPS,
                                                     "sampling": "poisson", "relation": "add_remove"}))
    return run, base_dir, model


def _read(path):
    from safetensors.numpy import load_file
    return load_file(str(path))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_adapter_keys_and_config_match_peft_layout(tmp_path, arch):
    run, base_dir, model = _run_dir(tmp_path, arch)
    out = tmp_path / "adapter"
    assert export.main(["--run", str(run), "--out", str(out)]) == 0
    tensors = _read(out / "adapter_model.safetensors")
    assert {k: list(v.shape) for k, v in tensors.items()} == EXPECTED_KEYS[arch]
    config = json.loads((out / "adapter_config.json").read_text())
    for key, value in EXPECTED_CONFIG[arch].items():
        assert config[key] == value, key
    assert config["base_model_name_or_path"] == str(base_dir)
    # the values are the trained A and B
    name = "transformer.h.1.attn.c_attn" if arch == "gpt2" else "model.layers.1.self_attn.v_proj"
    layer = dict(peft.lora_layers(model))[name]
    assert np.array_equal(tensors[f"base_model.model.{name}.lora_A.weight"], layer.lora_A.asnumpy())
    assert np.array_equal(tensors[f"base_model.model.{name}.lora_B.weight"], layer.lora_B.asnumpy())
    dp = json.loads((out / "dp_metadata.json").read_text())
    assert dp["epsilon"] == EPS and dp["delta"] == DELTA and dp["privacy_unit"] == "record"
    assert dp["ledger_sha256"] == hashlib.sha256((run / "ledger.json").read_bytes()).hexdigest()
    assert dp["noise_table_sha256"] == "ab" * 32
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]     # no staging left


def test_some_layers_only_gives_an_exact_full_path_regex(tmp_path):
    import re
    model = GPT2LMHeadModel(GPT2, seed=5)
    peft.apply_lora(model, r=2, alpha=4.0, targets=(r"h\.1\.attn\.c_attn",))
    target = export.peft_lora_config(model, "x")["target_modules"]
    names = [n for n, c in model.cells_and_names() if type(c).__name__ in ("Linear", "LoRALinear")]
    assert [n for n in names if re.fullmatch(target, n)] == ["transformer.h.1.attn.c_attn"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_merged_checkpoint_reloads_with_the_adapted_logits(tmp_path, arch):
    run, base_dir, model = _run_dir(tmp_path, arch)
    adapted = model(IDS, MASK).asnumpy()
    out = tmp_path / "merged"
    assert export.main(["--run", str(run), "--out", str(out), "--merge"]) == 0
    reloaded = checkpoint.from_pretrained(out)
    assert type(reloaded) is type(model)
    assert np.abs(reloaded(IDS, MASK).asnumpy() - adapted).max() <= 1e-5
    assert json.loads((out / "dp_metadata.json").read_text())["epsilon"] == EPS
    # PEFT's merge rule on the Hugging Face files: W += transpose(B A, fan_in_fan_out) * alpha / r
    adapter = tmp_path / "peft"
    assert export.main(["--run", str(run), "--out", str(adapter)]) == 0
    base, merged, lora = _read(base_dir / "model.safetensors"), _read(out / "model.safetensors"), \
        _read(adapter / "adapter_model.safetensors")
    fan_in_fan_out = json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"]
    name = "transformer.h.0.attn.c_attn" if arch == "gpt2" else "model.layers.0.self_attn.q_proj"
    delta = lora[f"base_model.model.{name}.lora_B.weight"].astype(np.float64) @ \
        lora[f"base_model.model.{name}.lora_A.weight"].astype(np.float64) * (8.0 / 2)
    want = base[f"{name}.weight"] + (delta.T if fan_in_fan_out else delta)
    assert np.abs(merged[f"{name}.weight"] - want).max() <= 1e-6


def test_norm_only_run_merges(tmp_path):
    run, _, model = _run_dir(tmp_path, "llama", method="norm_only")
    out = tmp_path / "merged"
    assert export.main(["--run", str(run), "--out", str(out), "--merge"]) == 0
    assert np.abs(checkpoint.from_pretrained(out)(IDS, MASK).asnumpy() - model(IDS, MASK).asnumpy()).max() <= 1e-5


def _fails(capsys, argv, match):
    assert export.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and match in err, err


def test_bad_inputs_end_in_one_line_and_exit_2(tmp_path, capsys):
    run, _, _ = _run_dir(tmp_path, "gpt2")
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(capsys, ["--run", str(tmp_path / "nope"), "--out", str(tmp_path / "o1")], "is not a folder")
    _fails(capsys, ["--run", str(run), "--out", str(out)], "exists; pass --overwrite")
    assert (out / "keep.txt").read_text() == "mine"                     # never silently overwritten
    _fails(capsys, ["--run", str(run)], "--out")
    (run / "ledger.json").rename(run / "ledger.moved")
    _fails(capsys, ["--run", str(run), "--out", str(tmp_path / "o2")], "has no ledger.json")
    (run / "ledger.moved").rename(run / "ledger.json")
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps(dict(metrics, epsilon_spent=0.5)))
    _fails(capsys, ["--run", str(run), "--out", str(tmp_path / "o3")], "differs from ledger.json")
    (run / "metrics.json").write_text(json.dumps({k: v for k, v in metrics.items() if k != "model"}))
    _fails(capsys, ["--run", str(run), "--out", str(tmp_path / "o4")], "does not name the base model")
    (run / "metrics.json").write_text("{broken")
    _fails(capsys, ["--run", str(run), "--out", str(tmp_path / "o5")], "not readable JSON")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".o", "o"))]
    assert export.main(["--run", str(tmp_path / "nope"), "--out", str(out), "--overwrite"]) == 2
    assert (out / "keep.txt").exists()                                  # a failed export leaves --out alone


def test_non_lora_adapter_export_and_houlsby_merge_are_refused(tmp_path, capsys):
    run, _, _ = _run_dir(tmp_path, "llama", method="norm_only")
    _fails(capsys, ["--run", str(run), "--out", str(tmp_path / "o")], "not LoRA")
    run, _, _ = _run_dir(tmp_path, "gpt2", method="houlsby")
    _fails(capsys, ["--run", str(run), "--out", str(tmp_path / "o"), "--merge"], "cannot be merged")


def test_overwrite_replaces_and_non_private_run_says_so(tmp_path):
    run, _, _ = _run_dir(tmp_path, "gpt2", private=False)
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert export.main(["--run", str(run), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "old.txt").exists()
    dp = json.loads((out / "dp_metadata.json").read_text())
    assert dp["private"] is False and dp["epsilon"] is None


def test_module_entry_point_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "finetune.export", "--run", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "is not a folder" in proc.stderr


@pytest.mark.slow
def test_export_of_a_real_dp_lora_run(tmp_path):
    """A run written by python -m finetune (tiny GPT-2, DP LoRA, 4 steps) exports, and its
    dp_metadata carries the ledger's epsilon; the merged checkpoint reloads with the adapted logits."""
    from accountant.certify import certify
    from accountant.ledger import PrivacyLedger
    from accountant.mechanism import Mechanism
    from accountant.noise import Gaussian
    from accountant.table import write_certified_table
    from finetune.__main__ import main as train
    from finetune.data import generate_records, write_jsonl

    write_jsonl(generate_records(120, seed=0), tmp_path / "data.jsonl")
    cert = certify(Mechanism(Gaussian(1.0), 1.0, "l2", 0.1, 4), 1e-5)
    write_certified_table(tmp_path / "t.npz", Gaussian(1.0), eps_target=cert.epsilon, delta=1e-5,
                          sampling_rate=0.1, steps=4, geometry="l2", certificate=cert, gaussian_sigma=1.0)
    run = tmp_path / "run"
    assert train(["--table", str(tmp_path / "t.npz"), "--model", "tiny", "--data", str(tmp_path / "data.jsonl"),
                  "--out", str(run), "--seq-len", "24", "--micro-batch", "8", "--quiet", "--method", "lora",
                  "--lr", "0.01"]) == 0
    assert export.main(["--run", str(run), "--out", str(tmp_path / "a")]) == 0
    dp = json.loads((tmp_path / "a" / "dp_metadata.json").read_text())
    ledger = PrivacyLedger.from_json((run / "ledger.json").read_text())
    assert dp["private"] and dp["epsilon"] == pytest.approx(ledger.epsilon()) and dp["delta"] == 1e-5
    assert dp["noise_table_sha256"] == hashlib.sha256((tmp_path / "t.npz").read_bytes()).hexdigest()
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny" and config["target_modules"] == ["c_attn"]
    assert export.main(["--run", str(run), "--out", str(tmp_path / "m"), "--merge"]) == 0
    adapted = checkpoint.from_pretrained("tiny")
    peft.load_adapter(adapted, run / "adapter.safetensors")
    ids = Tensor(np.random.default_rng(2).integers(0, 5000, (2, 9)).astype(np.int32))
    mask = Tensor(np.ones((2, 9), np.float32))
    merged = checkpoint.from_pretrained(tmp_path / "m")
    assert np.abs(merged(ids, mask).asnumpy() - adapted(ids, mask).asnumpy()).max() <= 1e-5
