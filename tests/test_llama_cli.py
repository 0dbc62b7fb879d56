"""``python -m finetune --model DIR`` on a Llama-family checkpoint folder (config.json with model_type
llama / qwen2, model.safetensors, tokenizer.json), ``python -m finetune.models.create`` that writes
such a folder, and the README section "Your own Llama/Qwen checkpoint" run as written."""
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from accountant.ledger import PrivacyLedger
from accountant.noise import Gaussian
from helpers import certified_table
from finetune.__main__ import _tokenizer, main
from finetune.cli import UserError
from finetune.data import generate_records, write_jsonl
from finetune.models import create
from finetune.models.checkpoint import from_pretrained
from test_docs_run import ROOT, fenced_blocks, shell_commands

SECTION = "## Your own Llama/Qwen checkpoint"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama_cli")
    create.write_checkpoint(str(d / "ckpt"), "llama-tiny")
    write_jsonl(generate_records(120, seed=0), d / "data.jsonl")
    certified_table(d / "l2.npz", Gaussian(1.0), "l2", 0.1, 3, 1e-5)
    return d


def _run(files, out, *extra):
    return main(["--model", str(files / "ckpt"), "--data", str(files / "data.jsonl"), "--out", str(out),
                 "--seq-len", "16", "--micro-batch", "8", "--quiet", *extra])


@pytest.mark.slow   # one compiled DP graph: 36 s measured on a loaded 2-core machine
def test_dp_lora_on_a_llama_checkpoint_folder(files, tmp_path):
    """Failed before: the CLI read GPT-2's ``n_positions`` and died in AttributeError (traceback)."""
    from safetensors.numpy import load_file

    out = tmp_path / "run"
    assert _run(files, out, "--table", str(files / "l2.npz"), "--method", "lora") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["private"] and metrics["per_example"] == "bookkeeping" and metrics["steps"] == 3
    ledger = PrivacyLedger.from_json((out / "ledger.json").read_text())
    assert metrics["epsilon_spent"] == pytest.approx(ledger.epsilon())
    assert 0 < metrics["epsilon_spent"] <= metrics["certified_epsilon_of_table"] * (1 + 1e-9)
    # the Llama default targets (q_proj, v_proj of both layers), nothing else, were trained
    layers = {k.rsplit(".", 1)[0] for k in load_file(str(out / "adapter.safetensors"))}
    assert layers == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}


@pytest.mark.slow   # three compiled training graphs: about 40 s on a loaded 2-core machine
@pytest.mark.parametrize("method", ["norm-only", "adapters", "full"])
def test_every_llama_method_trains_from_the_cli(files, tmp_path, method):
    from safetensors.numpy import load_file

    out = tmp_path / method
    assert _run(files, out, "--no-dp", "--sampling-rate", "0.1", "--steps", "2", "--method", method,
                "--adapter-size", "4") == 0
    base = from_pretrained(str(files / "ckpt"))
    if method == "full":   # the run folder is a checkpoint, its tokenizer included
        trained = from_pretrained(str(out))
        changed = [n for (n, p), (_, q) in zip(base.parameters_and_names(), trained.parameters_and_names())
                   if not np.array_equal(p.asnumpy(), q.asnumpy())]
        assert "model.embed_tokens.weight" in changed and len(changed) > 10
        assert _tokenizer(str(out), trained).encode("Hello world") == \
            _tokenizer(str(files / "ckpt"), base).encode("Hello world")
        return
    names = set(load_file(str(out / "adapter.safetensors")))
    if method == "norm-only":
        assert names == {f"model.layers.{i}.{n}.weight" for i in range(2)
                         for n in ("input_layernorm", "post_attention_layernorm")} | {"model.norm.weight"}
    else:
        assert names and all(re.search(r"\.adapter_(down|up)\.(weight|bias)$", n) for n in names)


def test_a_llama_folder_uses_its_own_tokenizer(files, tmp_path):
    """The folder's tokenizer.json (not GPT-2's BPE by vocabulary size); refused in one line when it is
    missing, has no end-of-sequence token, or emits ids beyond the model's embedding."""
    from finetune.models.tokenizer import load_tokenizer

    d = files / "ckpt"
    model = from_pretrained(str(d))
    tok = _tokenizer(str(d), model)
    assert type(tok).__name__ == "HFTokenizer" and tok.eos_id == tok.pad_id == model.config.vocab_size - 1
    text = "Alice Smith lives at 12 Main Street."
    assert tok.encode(text) == load_tokenizer(model.config.vocab_size).encode(text)

    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        os.link(d / name, bad / name)
    with pytest.raises(UserError, match="end-of-sequence"):      # no tokenizer_config.json
        _tokenizer(str(bad), model)
    (bad / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="no tokenizer.json"):
        _tokenizer(str(bad), model)
    smaller = SimpleNamespace(config=SimpleNamespace(model_type="llama", vocab_size=4000))
    with pytest.raises(UserError, match="5000 tokens but the model's vocab_size is 4000"):
        _tokenizer(str(d), smaller)


def test_create_writes_qwen2_and_refuses_an_existing_folder(tmp_path, capsys):
    out = tmp_path / "q"
    assert create.main(["--preset", "llama-tiny", "--model-type", "qwen2", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["tie_word_embeddings"] is True
    model = from_pretrained(str(out))
    names = {n for n, _ in model.parameters_and_names()}
    assert "model.layers.0.self_attn.q_proj.bias" in names and "lm_head.weight" not in names
    before = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert create.main(["--preset", "llama-tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists" in err and "--overwrite" in err
    assert (out / "model.safetensors").read_bytes() == before
    assert create.main(["--preset", "llama-2b", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def _section_commands() -> list:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + 1)
    start_line = text.count("\n", 0, start) + 1
    end_line = text.count("\n", 0, end) + 1
    return [c for line, b in fenced_blocks(ROOT / "README.md", "bash") if start_line < line < end_line
            for c in shell_commands(b)]


def test_readme_llama_section_creates_trains_exports_and_merges():
    """The section's block is found, goes from a created folder to a merged checkpoint, and writes no
    file an earlier README command writes (the README's commands run in order in one folder)."""
    cmds = _section_commands()
    assert cmds[0].startswith("python -m finetune.models.create")
    train = [c for c in cmds if c.startswith("python -m finetune --")]
    assert len(train) == 1 and "--model my-llama" in train[0] and "--table" in train[0]
    assert any(c.startswith("python -m finetune.export") and "--merge" not in c for c in cmds)
    assert any(c.startswith("python -m finetune.export") and "--merge" in c for c in cmds)
    outs = lambda cs: {m for c in cs for m in re.findall(r"--out (\S+)", c)}
    every = [c for _, b in fenced_blocks(ROOT / "README.md", "bash") for c in shell_commands(b)]
    assert not outs(cmds) & outs([c for c in every if c not in cmds])


@pytest.mark.slow   # a DP run and two exports: a few minutes on 2 loaded cores
def test_readme_llama_section_runs_in_an_empty_directory(tmp_path):
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for cmd in _section_commands():
        p = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=3600)
        assert p.returncode == 0, f"{cmd}\n{p.stderr[-3000:]}"
    dp = json.loads((tmp_path / "llama_adapter" / "dp_metadata.json").read_text())
    ledger = json.loads((tmp_path / "llama_dp" / "ledger.json").read_text())
    assert 0 < dp["epsilon"] <= 3.0 and dp["delta"] == 1e-5
    assert dp["epsilon"] == PrivacyLedger.from_json(json.dumps(ledger)).epsilon()
    cfg = json.loads((tmp_path / "llama_adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and len(cfg["target_modules"]) == 7
    merged = from_pretrained(str(tmp_path / "llama_merged"))
    assert merged.config.model_type == "llama"
    assert (tmp_path / "llama_merged" / "tokenizer.json").is_file()
