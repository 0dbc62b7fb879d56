"""The Llama-family decoder against an independent float64 reference, in both MindSpore modes, and its
Hugging Face checkpoint round trip.

The reference below is written from the published architecture (Hugging Face ``modeling_llama.py``
semantics: RMSNorm in float32, rotate-half RoPE, ``repeat_kv`` head sharing, SwiGLU, additive causal
and padding mask), in numpy float64 with explicit loops over heads; it shares no code with
``finetune.models.llama``.
"""
import json

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from finetune.models import checkpoint
from finetune.models.llama import LlamaConfig, LlamaForCausalLM

LLAMA_GQA = LlamaConfig(model_type="llama", vocab_size=97, hidden_size=48, intermediate_size=80,
                        num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                        max_position_embeddings=64, rope_theta=500.0, tie_word_embeddings=False)
QWEN2_TIED = LlamaConfig(model_type="qwen2", vocab_size=89, hidden_size=32, intermediate_size=72,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64, rms_norm_eps=1e-5, qkv_bias=True,
                         tie_word_embeddings=True)
MISTRAL_WINDOW = LlamaConfig(model_type="mistral", vocab_size=61, hidden_size=32, intermediate_size=48,
                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1,
                             max_position_embeddings=64, sliding_window=3)


def _weights(model) -> dict:
    return {n: p.asnumpy().astype(np.float64) for n, p in model.parameters_and_names()}


def reference_logits(cfg: LlamaConfig, w: dict, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    hd = cfg.dim_per_head
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads

    def rms(x, g):
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + cfg.rms_norm_eps) * g

    def lin(x, name):
        y = x @ w[name + ".weight"].T
        return y + w[name + ".bias"] if name + ".bias" in w else y

    t = ids.shape[1]
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(t)[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):                                   # x [T, hd]
        x1, x2 = x[:, :hd // 2], x[:, hd // 2:]
        return x * cos + np.concatenate([-x2, x1], -1) * sin

    out = []
    for b in range(ids.shape[0]):
        x = w["model.embed_tokens.weight"][ids[b]]
        allowed = np.tril(np.ones((t, t), bool)) & (mask[b][None, :] > 0.5)
        if cfg.sliding_window:
            allowed &= (np.arange(t)[:, None] - np.arange(t)[None, :]) < cfg.sliding_window
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            h = rms(x, w[p + "input_layernorm.weight"])
            q, k, v = (lin(h, p + f"self_attn.{n}_proj") for n in "qkv")
            heads = []
            for j in range(nh):
                kv = j // (nh // nkv)
                qj = rope(q[:, j * hd:(j + 1) * hd])
                kj = rope(k[:, kv * hd:(kv + 1) * hd])
                s = np.where(allowed, qj @ kj.T / np.sqrt(hd), -np.inf)
                s[~allowed.any(-1)] = 0.0          # a query with no visible key (padding only)
                e = np.exp(s - s.max(-1, keepdims=True))
                heads.append((e / e.sum(-1, keepdims=True)) @ v[:, kv * hd:(kv + 1) * hd])
            x = x + lin(np.concatenate(heads, -1), p + "self_attn.o_proj")
            h = rms(x, w[p + "post_attention_layernorm.weight"])
            g = lin(h, p + "mlp.gate_proj")
            x = x + lin(g / (1 + np.exp(-g)) * lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
        x = rms(x, w["model.norm.weight"])
        head = w["model.embed_tokens.weight"] if cfg.tie_word_embeddings else w["lm_head.weight"]
        out.append(x @ head.T)
    return np.stack(out)


def _randomise(model, seed):
    """Random non-trivial values for every weight (norm gains and biases too)."""
    rng = np.random.default_rng(seed)
    for _, p in model.parameters_and_names():
        p.set_data(Tensor(rng.normal(0.0, 0.3 if p.ndim == 1 else 0.15, p.shape).astype(np.float32)
                          + (1.0 if p.name.endswith("norm.weight") else 0.0)))


def _batch(cfg, seed, t=9):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, (3, t)).astype(np.int32)
    mask = np.ones((3, t), np.float32)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return ids, mask


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE], ids=["pynative", "graph"])
@pytest.mark.parametrize("cfg", [LLAMA_GQA, QWEN2_TIED, MISTRAL_WINDOW], ids=["llama-gqa", "qwen2-tied", "mistral-sw"])
def test_logits_match_float64_reference(cfg, mode):
    ms.set_context(mode=mode)
    model = LlamaForCausalLM(cfg, seed=1)
    _randomise(model, 2)
    ids, mask = _batch(cfg, 3)
    got = model(Tensor(ids), Tensor(mask)).asnumpy()
    want = reference_logits(cfg, _weights(model), ids, mask)
    assert got.shape == (3, 9, cfg.vocab_size)
    real = mask > 0.5          # a padding query may see no key at all (sliding window): its logits are unused
    assert np.max(np.abs(got[real] - want[real])) <= 1e-4, np.max(np.abs(got[real] - want[real]))


def test_reference_detects_a_wrong_rotary_convention():
    """The comparison can fail: rotating interleaved pairs (GPT-NeoX vs GPT-J layout) changes logits."""
    model = LlamaForCausalLM(LLAMA_GQA, seed=1)
    _randomise(model, 2)
    ids, mask = _batch(LLAMA_GQA, 3)
    w = _weights(model)
    hd = LLAMA_GQA.dim_per_head
    perm = np.concatenate([np.arange(0, hd, 2), np.arange(1, hd, 2)])   # a different pairing of coordinates
    for name in list(w):
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            n = w[name].shape[0] // hd
            w[name] = w[name].reshape(n, hd, -1)[:, perm].reshape(n * hd, -1)
    got = model(Tensor(ids), Tensor(mask)).asnumpy()
    real = mask > 0.5
    assert np.max(np.abs(got - reference_logits(LLAMA_GQA, w, ids, mask))[real]) > 1e-3


def test_per_example_loss_masks_padding():
    model = LlamaForCausalLM(QWEN2_TIED, seed=0)
    ids, mask = _batch(QWEN2_TIED, 5)
    losses = model.loss(Tensor(ids), Tensor(mask)).asnumpy()
    logits = reference_logits(QWEN2_TIED, _weights(model), ids, mask)
    for b in range(3):
        n = int(mask[b].sum())
        lp = logits[b, :n - 1] - np.log(np.exp(logits[b, :n - 1]).sum(-1, keepdims=True))
        assert losses[b] == pytest.approx(-lp[np.arange(n - 1), ids[b, 1:n]].mean(), rel=1e-5)


@pytest.mark.parametrize("cfg", [LLAMA_GQA, QWEN2_TIED], ids=["llama-gqa", "qwen2-tied"])
def test_hugging_face_checkpoint_round_trip(tmp_path, cfg):
    """config.json + model.safetensors with Hugging Face key names load through from_pretrained."""
    from safetensors.numpy import save_file

    src = LlamaForCausalLM(cfg, seed=4)
    _randomise(src, 5)
    state = {n: p.asnumpy() for n, p in src.parameters_and_names()}
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"].copy()   # some files store it
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    loaded = checkpoint.from_pretrained(str(tmp_path))
    assert isinstance(loaded, LlamaForCausalLM) and loaded.config == cfg
    ids, mask = _batch(cfg, 6)
    assert np.array_equal(loaded(Tensor(ids), Tensor(mask)).asnumpy(), src(Tensor(ids), Tensor(mask)).asnumpy())


def test_checkpoint_mismatches_are_one_line_errors(tmp_path):
    from safetensors.numpy import save_file

    src = LlamaForCausalLM(LLAMA_GQA, seed=0)
    state = {n: p.asnumpy() for n, p in src.parameters_and_names()}
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_GQA.to_dict()))
    with pytest.raises(checkpoint.CheckpointError, match="missing 1 key"):
        checkpoint.from_pretrained(str(tmp_path))
    cfg = dict(LLAMA_GQA.to_dict(), rope_scaling={"type": "llama3", "factor": 8.0})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(checkpoint.CheckpointError, match="rope_scaling"):
        checkpoint.from_pretrained(str(tmp_path))


def test_config_reads_each_family():
    base = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=32)
    llama = LlamaConfig.from_dict(dict(base, model_type="llama", attention_bias=True))
    assert llama.qkv_bias and llama.o_bias and llama.num_key_value_heads == 2
    qwen = LlamaConfig.from_dict(dict(base, model_type="qwen2", num_key_value_heads=1, sliding_window=4,
                                      use_sliding_window=False, tie_word_embeddings=True))
    assert qwen.qkv_bias and not qwen.o_bias and qwen.sliding_window == 0 and qwen.tie_word_embeddings
    mistral = LlamaConfig.from_dict(dict(base, model_type="mistral", sliding_window=4096, head_dim=8))
    assert mistral.sliding_window == 4096 and mistral.dim_per_head == 8 and not mistral.qkv_bias
    for bad in (dict(base, model_type="gpt_neox"), dict(base, model_type="llama", hidden_act="gelu"),
                dict(base, model_type="llama", num_key_value_heads=3)):
        with pytest.raises(ValueError):
            LlamaConfig.from_dict(bad)
    assert LlamaConfig.from_dict(QWEN2_TIED.to_dict()) == QWEN2_TIED
    assert LlamaConfig.from_dict(MISTRAL_WINDOW.to_dict()) == MISTRAL_WINDOW


def test_bfloat16_tensors_are_widened_exactly(tmp_path):
    """Llama-family uploads are bfloat16, which numpy lacks: the reader widens the bit pattern."""
    src = LlamaForCausalLM(LLAMA_GQA, seed=7)
    state = {n: p.asnumpy() for n, p in src.parameters_and_names()}
    header, blobs, offset = {}, [], 0
    for name, a in state.items():
        raw = (np.ascontiguousarray(a, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    (tmp_path / "model.safetensors").write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_GQA.to_dict()))
    loaded = checkpoint.from_pretrained(str(tmp_path))
    for name, p in loaded.parameters_and_names():
        truncated = (state[name].view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
        assert np.array_equal(p.asnumpy(), truncated), name
    weight = state["model.layers.0.mlp.up_proj.weight"]         # random values: bfloat16 loses bits
    assert not np.array_equal(loaded.model.layers[0].mlp.up_proj.weight.asnumpy(), weight)
