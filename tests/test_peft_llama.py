"""PEFT methods on both architectures (GPT-2, Llama family): each starts exactly at the base model,
trains only its own parameters, and round-trips through save_adapter / load_adapter; plus the
tokenizer.json loader."""
import json

import numpy as np
import pytest

from mindspore import Tensor, ops

from finetune.models import peft
from finetune.models.gpt2 import GPT2Config, GPT2LMHeadModel, Linear, assign_parameter
from finetune.models.llama import LlamaConfig, LlamaForCausalLM

GPT2 = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=61, n_positions=32)
LLAMA = LlamaConfig(model_type="llama", vocab_size=61, hidden_size=32, intermediate_size=48,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=32)
QWEN2 = LlamaConfig(model_type="qwen2", vocab_size=61, hidden_size=32, intermediate_size=48,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                    max_position_embeddings=32, qkv_bias=True, tie_word_embeddings=True)
LLAMA_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_rng = np.random.default_rng(1)
IDS = Tensor(_rng.integers(0, 61, (2, 7)).astype(np.int32))
MASK = Tensor(np.array([[1] * 7, [1] * 5 + [0] * 2], np.float32))


def _model(cfg, seed=3):
    return GPT2LMHeadModel(cfg, seed=seed) if isinstance(cfg, GPT2Config) else LlamaForCausalLM(cfg, seed=seed)


def _logits(model):
    return model(IDS, MASK).asnumpy()


def _apply(model, method):
    if method == "lora":
        return peft.apply_lora(model, r=2, alpha=4.0,
                               targets=LLAMA_ALL if isinstance(model, LlamaForCausalLM) else ("c_attn", "c_fc"))
    if method == "bitfit":
        return peft.apply_bitfit(model)
    if method == "norm_only":
        return peft.apply_norm_only(model)
    return peft.apply_adapters(model, size=4)


def _expected_trainable(model, method) -> set:
    names = [n for n, _ in model.parameters_and_names()]
    if method == "lora":
        return {n for n in names if n.endswith((".lora_A", ".lora_B"))}
    if method == "bitfit":
        return {n for n in names if n.endswith(".bias")}
    if method == "norm_only":
        return {n for n in names if n.endswith(("layernorm.weight", "model.norm.weight"))}
    return {n for n in names if ".adapter_down." in n or ".adapter_up." in n}


_SLOW = pytest.mark.slow      # > 20 s each on a shared 2-core machine
CASES = [pytest.param(GPT2, "lora", id="gpt2-lora"), pytest.param(GPT2, "bitfit", id="gpt2-bitfit"),
         pytest.param(GPT2, "houlsby", id="gpt2-houlsby"),
         pytest.param(LLAMA, "lora", id="llama-lora-all-seven", marks=_SLOW),
         pytest.param(LLAMA, "norm_only", id="llama-norm-only"),
         pytest.param(LLAMA, "houlsby", id="llama-houlsby", marks=_SLOW),
         pytest.param(QWEN2, "bitfit", id="qwen2-bitfit")]


@pytest.mark.parametrize("cfg,method", CASES)
def test_method_starts_at_base_trains_only_its_parameters_and_round_trips(cfg, method, tmp_path):
    model = _model(cfg)
    base = _logits(model)
    n_total = len(list(model.parameters_and_names()))
    _apply(model, method)
    assert np.array_equal(_logits(model), base)                      # exactly the base model
    trainable = set(peft.trainable_parameter_names(model))
    assert trainable and trainable == _expected_trainable(model, method)
    assert len(trainable) < len(list(model.parameters_and_names()))
    assert len(list(model.parameters_and_names())) >= n_total
    # move the trained tensors away from their initial values, as training would
    rng = np.random.default_rng(7)
    for n, p in model.parameters_and_names():
        if p.requires_grad:
            assign_parameter(p, p.asnumpy() + rng.normal(0, 0.2, p.shape))
    trained = _logits(model)
    assert np.abs(trained - base).max() > 1e-3
    path = tmp_path / "adapter.safetensors"
    saved = peft.save_adapter(model, path)
    assert set(saved) == trainable
    fresh = _model(cfg)                                              # same base weights, no method
    loaded = peft.load_adapter(fresh, path)
    assert set(loaded) == trainable
    assert fresh.peft["method"] == method
    assert set(peft.trainable_parameter_names(fresh)) == trainable
    assert np.array_equal(_logits(fresh), trained)


def test_adapter_of_one_architecture_is_refused_by_the_other(tmp_path):
    model = _model(LLAMA)
    peft.apply_adapters(model, size=4)
    peft.save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(peft.AdapterError, match="llama model, this model is gpt2"):
        peft.load_adapter(_model(GPT2), tmp_path / "a.safetensors")


def test_methods_that_do_not_fit_the_architecture_are_refused():
    with pytest.raises(peft.AdapterError, match="no bias terms; use norm-only"):
        peft.apply_bitfit(_model(LLAMA))
    with pytest.raises(peft.AdapterError, match="use BiTFiT"):
        peft.apply_norm_only(_model(GPT2))
    model = _model(LLAMA)
    peft.apply_adapters(model, size=4)
    with pytest.raises(peft.AdapterError, match="start from the base model"):
        peft.apply_lora(model, targets=("q_proj",))


def test_llama_lora_default_targets_are_q_and_v():
    model = _model(LLAMA)
    names = peft.apply_lora(model)
    assert [n.rsplit(".", 1)[-1] for n in names] == ["q_proj", "v_proj"] * 2


def test_lora_on_a_bias_free_linear_with_a_per_example_probe():
    """A bias-free base (Llama) with a probe constant over the tokens ([B, 1, d], book-keeping of a
    bias-only tap): the output is the plain output plus the probe (this raised on a None bias)."""
    rng = np.random.default_rng(0)
    base = Linear(6, 5, rng, 0.3, bias=False)
    layer = peft.LoRALinear(base, 2, 4.0, rng)
    assign_parameter(layer.lora_B, rng.normal(0, 0.5, (5, 2)))
    x = Tensor(rng.normal(0, 1, (3, 4, 6)).astype(np.float32))
    probe = Tensor(rng.normal(0, 1, (3, 1, 5)).astype(np.float32))
    plain = layer(x).asnumpy()
    assert np.allclose(layer(x, probe).asnumpy(), plain + probe.asnumpy(), atol=1e-6)
    w = base.weight.asnumpy().astype(np.float64)
    delta = layer.delta_weight()
    assert np.allclose(plain, x.asnumpy() @ (w + delta).T, atol=1e-5)


def test_houlsby_adapter_is_the_bottleneck_of_the_paper():
    """y = h + up(gelu(down(h))), h the frozen layer's output (Houlsby et al. 2019, Fig. 2)."""
    rng = np.random.default_rng(0)
    base = Linear(6, 5, rng, 0.3)
    layer = peft.AdaptedLinear(base, 3, rng)
    for p in (layer.adapter_up.weight, layer.adapter_up.bias, base.bias):
        assign_parameter(p, rng.normal(0, 0.5, p.shape))
    x = rng.normal(0, 1, (2, 4, 6))
    h = x @ base.weight.asnumpy().T + base.bias.asnumpy()
    z = h @ layer.adapter_down.weight.asnumpy().T + layer.adapter_down.bias.asnumpy()
    gelu = 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
    want = h + gelu @ layer.adapter_up.weight.asnumpy().T + layer.adapter_up.bias.asnumpy()
    got = layer(Tensor(x.astype(np.float32))).asnumpy()
    assert np.abs(got - want).max() < 1e-5


# -- tokenizer.json -----------------------------------------------------------------------------
SENTENCES = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"]


def _tokenizer_dir(tmp_path, config=None, tok_config=None):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "</s>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    if tok_config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return tok


def test_load_tokenizer_from_dir_encodes_like_the_file_and_reads_special_ids(tmp_path):
    from finetune.models.tokenizer import load_tokenizer_from_dir

    ref = _tokenizer_dir(tmp_path, config={"eos_token_id": 2, "pad_token_id": None, "model_type": "llama"},
                         tok_config={"eos_token": "</s>", "pad_token": "<pad>"})
    tok = load_tokenizer_from_dir(tmp_path)
    text = "the cat sat on the log"
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids
    assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text).ids)
    assert tok.eos_id == ref.token_to_id("</s>") == 2
    assert tok.pad_id == ref.token_to_id("<pad>")
    assert len(tok) == ref.get_vocab_size()


def test_load_tokenizer_from_dir_pad_falls_back_to_eos_from_config(tmp_path):
    from finetune.models.tokenizer import load_tokenizer_from_dir

    _tokenizer_dir(tmp_path, config={"eos_token_id": 2})
    tok = load_tokenizer_from_dir(tmp_path)
    assert tok.eos_id == 2 and tok.pad_id == 2


def test_load_tokenizer_from_dir_missing_or_broken_is_one_line(tmp_path):
    from finetune.models.tokenizer import TokenizerError, load_tokenizer_from_dir

    with pytest.raises(TokenizerError, match="no tokenizer.json") as e:
        load_tokenizer_from_dir(tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read") as e:
        load_tokenizer_from_dir(tmp_path)
    assert "\n" not in str(e.value)
