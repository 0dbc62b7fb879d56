"""Tests for finetune.models.gpt2 (architecture, per-example losses/gradients, taps, generation)
and finetune.models.checkpoint (Hugging Face safetensors and MindSpore .ckpt, both directions)."""
import json
import math

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, ops  # noqa: E402

from finetune.models.gpt2 import GPT2Config, GPT2LMHeadModel, generate  # noqa: E402

# Small enough that graph compilation stays a few seconds, big enough to have 2 blocks and 2 heads.
CFG = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=61, n_positions=24)
B, T = 3, 10


@pytest.fixture(scope="module")
def model():
    return GPT2LMHeadModel(CFG, seed=1)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(5)
    ids = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.float32)
    mask[1, 6:] = 0.0
    mask[2, 8:] = 0.0
    return ids, mask


# ---------------------------------------------------------------- numpy reference (HF maths)
def _gelu_new(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _ln(x, w, b, eps=1e-5):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * w + b


def hf_reference_logits(sd, cfg, ids):
    """GPT-2 forward in float64 numpy from a Hugging Face state dict (Conv1D weights [in, out])."""
    g = {k.removeprefix("transformer."): v.astype(np.float64) for k, v in sd.items()}
    t = ids.shape[-1]
    x = g["wte.weight"][ids] + g["wpe.weight"][np.arange(t)]
    hd = cfg.n_embd // cfg.n_head
    causal = np.tril(np.ones((t, t), bool))
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        h = _ln(x, g[p + "ln_1.weight"], g[p + "ln_1.bias"])
        qkv = h @ g[p + "attn.c_attn.weight"] + g[p + "attn.c_attn.bias"]
        q, k, v = np.split(qkv, 3, -1)
        sh = lambda z: z.reshape(z.shape[0], t, cfg.n_head, hd).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = sh(q), sh(k), sh(v)
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
        s = np.where(causal, s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v
        a = a.transpose(0, 2, 1, 3).reshape(x.shape)
        x = x + a @ g[p + "attn.c_proj.weight"] + g[p + "attn.c_proj.bias"]
        h = _ln(x, g[p + "ln_2.weight"], g[p + "ln_2.bias"])
        h = _gelu_new(h @ g[p + "mlp.c_fc.weight"] + g[p + "mlp.c_fc.bias"])
        x = x + h @ g[p + "mlp.c_proj.weight"] + g[p + "mlp.c_proj.bias"]
    x = _ln(x, g["ln_f.weight"], g["ln_f.bias"])
    return x @ g["wte.weight"].T


def random_hf_state_dict(cfg, seed=0, prefix="transformer."):
    """Random weights in the real Hugging Face GPT-2 layout: HF key names, Conv1D [in, out]."""
    rng = np.random.default_rng(seed)
    c = cfg.n_embd
    r = lambda *s: (rng.normal(0, 0.3, s)).astype(np.float32)  # noqa: E731
    sd = {"wte.weight": r(cfg.vocab_size, c), "wpe.weight": r(cfg.n_positions, c),
          "ln_f.weight": 1 + r(c), "ln_f.bias": r(c)}
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        sd.update({p + "ln_1.weight": 1 + r(c), p + "ln_1.bias": r(c),
                   p + "attn.c_attn.weight": r(c, 3 * c), p + "attn.c_attn.bias": r(3 * c),
                   p + "attn.c_proj.weight": r(c, c), p + "attn.c_proj.bias": r(c),
                   p + "ln_2.weight": 1 + r(c), p + "ln_2.bias": r(c),
                   p + "mlp.c_fc.weight": r(c, 4 * c), p + "mlp.c_fc.bias": r(4 * c),
                   p + "mlp.c_proj.weight": r(4 * c, c), p + "mlp.c_proj.bias": r(c)})
    return {prefix + k: v for k, v in sd.items()}


# ---------------------------------------------------------------- config
def test_config_presets_and_validation(tmp_path):
    tiny, small = GPT2Config.tiny(), GPT2Config.small()
    assert (tiny.n_layer, tiny.n_embd, tiny.n_head) == (2, 128, 2)
    assert (small.n_layer, small.n_embd, small.n_head, small.vocab_size) == (12, 768, 12, 50257)
    assert GPT2Config.preset("tiny") == tiny
    with pytest.raises(ValueError, match="unknown GPT-2 preset"):
        GPT2Config.preset("huge")
    with pytest.raises(ValueError, match="divisible"):
        GPT2Config(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="positive integer"):
        GPT2Config(n_layer=0)
    path = tmp_path / "config.json"
    CFG.to_json(path)
    assert json.loads(path.read_text())["model_type"] == "gpt2"
    assert GPT2Config.from_json(path) == CFG
    with pytest.raises(ValueError, match="model_type"):
        GPT2Config.from_dict({"model_type": "bert"})


def _count(cfg):
    c = cfg.n_embd
    per_block = 2 * 2 * c + (3 * c * c + 3 * c) + (c * c + c) + (4 * c * c + 4 * c) + (4 * c * c + c)
    return (cfg.vocab_size + cfg.n_positions) * c + cfg.n_layer * per_block + 2 * c


def test_parameter_count_and_gpt2_small_size():
    assert GPT2LMHeadModel(CFG).num_parameters() == _count(CFG)
    # the published size of GPT-2 small (tied head); the model itself is not built to save time
    assert _count(GPT2Config.small()) == 124_439_808


def test_parameter_names_follow_hugging_face(model):
    names = [n for n, _ in model.parameters_and_names()]
    expected = set(random_hf_state_dict(CFG))
    assert set(names) == expected
    assert [p.name for p in model.get_parameters()] == names
    assert model.transformer.h[1].attn.c_attn.weight.shape == (3 * CFG.n_embd, CFG.n_embd)  # [out, in]


# ---------------------------------------------------------------- forward / loss
def test_forward_matches_numpy_reference(model, batch):
    ids, _ = batch
    sd = {}
    for n, p in model.parameters_and_names():
        a = p.asnumpy()
        if n.endswith(".weight") and any(k in n for k in ("c_attn", "c_proj", "c_fc")):
            a = a.T  # our [out, in] -> HF Conv1D [in, out]
        sd[n] = a
    ref = hf_reference_logits(sd, CFG, ids)
    got = model(Tensor(ids), Tensor(np.ones_like(ids, np.float32))).asnumpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_loss_is_masked_mean_token_nll(model, batch):
    ids, mask = batch
    logits = model(Tensor(ids), Tensor(mask)).asnumpy().astype(np.float64)
    lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    want = []
    for b in range(B):
        n = int(mask[b].sum())
        want.append(-np.mean([lp[b, t, ids[b, t + 1]] for t in range(n - 1)]))
    got = model.loss(Tensor(ids), Tensor(mask)).asnumpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    single = [float(model.loss_single(Tensor(ids[b]), Tensor(mask[b])).asnumpy()) for b in range(B)]
    np.testing.assert_allclose(single, got, rtol=1e-6)


def test_padding_and_future_tokens_are_invisible(model, batch):
    ids, mask = batch
    base = model(Tensor(ids), Tensor(mask)).asnumpy()
    ids2 = ids.copy()
    ids2[1, 6:] = (ids2[1, 6:] + 7) % CFG.vocab_size   # change padded tokens only
    ids2[0, 7] = (ids2[0, 7] + 3) % CFG.vocab_size      # change a future token of row 0
    out = model(Tensor(ids2), Tensor(mask)).asnumpy()
    np.testing.assert_allclose(out[1, :6], base[1, :6], atol=1e-6)
    np.testing.assert_allclose(out[0, :7], base[0, :7], atol=1e-6)
    assert np.abs(out[0, 7:] - base[0, 7:]).max() > 1e-4   # ...but it does change later positions
    np.testing.assert_allclose(model.loss(Tensor(ids2), Tensor(mask)).asnumpy()[1],
                               model.loss(Tensor(ids), Tensor(mask)).asnumpy()[1], rtol=1e-6)


def test_vmap_per_example_gradients_in_graph_mode(model, batch):
    ids, mask = batch
    params = ms.ParameterTuple(model.trainable_params())
    grad_one = ms.grad(model.loss_single, grad_position=None, weights=params)

    @ms.jit
    def per_example(i, m):
        return ops.vmap(grad_one, in_axes=(0, 0))(i, m)

    pe = per_example(Tensor(ids), Tensor(mask))
    assert len(pe) == len(params)
    for b in (0, 1):
        single = grad_one(Tensor(ids[b]), Tensor(mask[b]))
        for g_all, g_one in zip(pe, single):
            np.testing.assert_allclose(g_all.asnumpy()[b], g_one.asnumpy(), atol=2e-6, rtol=1e-4)
    # examples differ, so their gradients must differ
    assert np.abs(pe[0].asnumpy()[0] - pe[0].asnumpy()[1]).max() > 1e-6


def test_probes_give_book_keeping_gradients(model, batch):
    ids, mask = batch
    probes = model.zero_probes(B, T)
    assert len(probes) == len(model.tap_names()) == 6 * CFG.n_layer + 1
    assert model.tap_names()[1] == "transformer.h.0.attn.c_attn"
    loss, saved = model.loss(Tensor(ids), Tensor(mask), probes)
    np.testing.assert_allclose(loss.asnumpy(), model.loss(Tensor(ids), Tensor(mask)).asnumpy(), atol=1e-6)

    def total(pr, i, m):
        lo, _ = model.loss(i, m, pr)
        return lo.sum()

    g_out = ms.jit(ms.grad(total, grad_position=0))(ms.mutable(probes), Tensor(ids), Tensor(mask))
    names = [p.name for p in model.trainable_params()]
    grad_one = ms.grad(model.loss_single, grad_position=None, weights=model.trainable_params())
    ex = 2
    ref = dict(zip(names, grad_one(Tensor(ids[ex]), Tensor(mask[ex]))))
    for k, tap in enumerate(model.tap_names()):
        g = g_out[k].asnumpy()[ex]
        a = saved[k].asnumpy()[ex]
        np.testing.assert_allclose(g.sum(0), ref[tap + ".bias"].asnumpy(), atol=1e-6)
        w = ref[tap + ".weight"].asnumpy()
        if w.ndim == 2:
            np.testing.assert_allclose(g.T @ a, w, atol=1e-6)
        else:  # LayerNorm: weight grad = sum_t g_t * x_hat_t
            np.testing.assert_allclose((g * a).sum(0), w, atol=1e-6)


@pytest.mark.parametrize("shape", ["per_example", "scalar"])
def test_probes_constant_over_tokens_keep_the_forward_and_give_bias_gradients(model, batch, shape):
    """A probe of shape [B, 1, d] (bias-only taps) or [1, 1, 1] (taps with nothing trained) is
    added to the bias before the broadcast: the forward must stay bit-identical, and a [B, 1, d]
    probe's gradient must be each example's bias gradient (the sum over tokens of the per-token
    probe gradient)."""
    ids, mask = batch
    full = model.zero_probes(B, T)
    if shape == "per_example":
        small = tuple(ops.zeros((B, 1, s[-1]), ms.float32) for s in model.probe_shapes(B, T))
    else:
        small = tuple(ops.zeros((1, 1, 1), ms.float32) for _ in model.probe_shapes(B, T))
    plain = model(Tensor(ids), Tensor(mask)).asnumpy()
    logits, _ = model(Tensor(ids), Tensor(mask), small)
    np.testing.assert_array_equal(logits.asnumpy(), plain)

    def total(pr, i, m):
        lo, _ = model.loss(i, m, pr)
        return lo.sum()

    grad = ms.jit(ms.grad(total, grad_position=0))
    g_full = grad(ms.mutable(full), Tensor(ids), Tensor(mask))
    g_small = grad(ms.mutable(small), Tensor(ids), Tensor(mask))
    largest = 0.0
    for gf, gs in zip(g_full, g_small):
        want = gf.asnumpy().sum(1, keepdims=True)
        if shape == "scalar":
            want = want.sum((0, 2), keepdims=True)
        np.testing.assert_allclose(gs.asnumpy(), want, atol=1e-6, rtol=1e-5)
        largest = max(largest, float(np.abs(want).max()))
    assert largest > 1e-4   # the comparison is not between zeros


# ---------------------------------------------------------------- generation
def test_generate_greedy_matches_stepwise_argmax(model):
    prompts = [[1, 2, 3, 4], [5, 6]]
    out = generate(model, prompts, max_new_tokens=4)
    for p, o in zip(prompts, out):
        seq = list(p)
        for _ in range(4):
            x = np.array([seq], np.int32)
            logits = model(Tensor(x), Tensor(np.ones_like(x, np.float32))).asnumpy()
            seq.append(int(logits[0, -1].argmax()))
        assert o == seq[len(p):]
    s1 = generate(model, prompts, 4, top_k=5, seed=3)
    assert s1 == generate(model, prompts, 4, top_k=5, seed=3)
    assert all(len(o) == 4 for o in s1)
    with pytest.raises(ValueError, match="n_positions"):
        generate(model, prompts, CFG.n_positions)


# ---------------------------------------------------------------- checkpoints
from finetune.models import checkpoint as ckpt  # noqa: E402
from finetune.models import peft  # noqa: E402


def _write_hf_dir(path, cfg, sd):
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**cfg.to_dict(), "n_ctx": cfg.n_positions}))
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})


def _ones(ids):
    return Tensor(np.ones_like(ids, np.float32))


@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_load_real_hf_layout_matches_reference(tmp_path, batch, prefix):
    ids, _ = batch
    sd = random_hf_state_dict(CFG, seed=3, prefix=prefix)
    extra = dict(sd)
    extra[prefix + "h.0.attn.bias"] = np.tril(np.ones((1, 1, CFG.n_positions, CFG.n_positions), np.float32))
    extra["lm_head.weight"] = sd[prefix + "wte.weight"].copy()   # tied head, as HF may store it
    _write_hf_dir(tmp_path / "m", CFG, extra)
    model = ckpt.from_pretrained(tmp_path / "m")
    assert model.config == CFG
    ref = hf_reference_logits(sd, CFG, ids)
    np.testing.assert_allclose(model(Tensor(ids), _ones(ids)).asnumpy(), ref, rtol=1e-4, atol=1e-4)


def test_safetensors_and_ckpt_round_trip(tmp_path, batch, model):
    from safetensors.numpy import load_file

    ids, mask = batch
    want = model(Tensor(ids), Tensor(mask)).asnumpy()
    f = ckpt.save_pretrained(model, tmp_path / "st")
    saved = load_file(f)
    assert saved["transformer.h.0.attn.c_attn.weight"].shape == (CFG.n_embd, 3 * CFG.n_embd)  # HF [in, out]
    assert set(saved) == set(random_hf_state_dict(CFG))
    again = ckpt.from_pretrained(tmp_path / "st", seed=99)
    np.testing.assert_array_equal(again(Tensor(ids), Tensor(mask)).asnumpy(), want)

    ckpt.save_pretrained(model, tmp_path / "ck", fmt="ckpt")
    other = ckpt.from_pretrained(tmp_path / "ck", seed=98)
    for (n1, p1), (n2, p2) in zip(model.parameters_and_names(), other.parameters_and_names()):
        assert n1 == n2
        np.testing.assert_array_equal(p1.asnumpy(), p2.asnumpy())


def test_checkpoint_mismatches_are_clear_errors(tmp_path):
    sd = random_hf_state_dict(CFG, seed=4)
    m = GPT2LMHeadModel(CFG)
    broken = dict(sd)
    del broken["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(ckpt.CheckpointError, match=r"missing 1 key.*h\.1\.mlp\.c_fc\.bias"):
        ckpt.load_hf_state_dict(m, broken)
    broken = dict(sd, **{"transformer.h.0.attn.c_attn.weight": sd["transformer.h.0.attn.c_attn.weight"].T})
    with pytest.raises(ckpt.CheckpointError, match=r"c_attn\.weight: shape .*Conv1D"):
        ckpt.load_hf_state_dict(m, broken)
    with pytest.raises(ckpt.CheckpointError, match="unexpected 1 key"):
        ckpt.load_hf_state_dict(m, dict(sd, **{"transformer.h.9.ln_1.weight": np.ones(16, np.float32)}))
    with pytest.raises(ckpt.CheckpointError, match="lm_head"):
        ckpt.load_hf_state_dict(m, dict(sd, **{"lm_head.weight": sd["transformer.wte.weight"] + 1}))
    # a file made for another config
    _write_hf_dir(tmp_path / "m", CFG, sd)
    other = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=61, n_positions=24))
    with pytest.raises(ckpt.CheckpointError, match="unexpected"):
        ckpt.load_safetensors(other, tmp_path / "m" / "model.safetensors")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "config.json").write_text(json.dumps(CFG.to_dict()))
    (tmp_path / "p" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ckpt.CheckpointError, match="pickle"):
        ckpt.from_pretrained(tmp_path / "p")
    with pytest.raises(ckpt.CheckpointError, match="neither a preset"):
        ckpt.from_pretrained(tmp_path / "nowhere")


# ---------------------------------------------------------------- LoRA / BiTFiT
def _params(model):
    return {n: p.asnumpy().copy() for n, p in model.parameters_and_names()}


def _sgd_step(model, ids, mask, lr=0.5):
    from mindspore import nn

    opt = nn.SGD(model.trainable_params(), learning_rate=lr)

    def total(i, m):
        return model.loss(i, m).mean()

    _, grads = ms.value_and_grad(total, None, opt.parameters)(Tensor(ids), Tensor(mask))
    opt(grads)


def test_lora_starts_at_base_and_merge_unmerge_is_exact(batch):
    ids, mask = batch
    model = GPT2LMHeadModel(CFG, seed=2)
    base = model(Tensor(ids), Tensor(mask)).asnumpy()
    w0 = model.transformer.h[0].attn.c_attn.weight.asnumpy().copy()
    names = peft.apply_lora(model, r=4, alpha=8, targets=("c_attn", r"attn\.c_proj"))
    assert names == [f"transformer.h.{i}.attn.{k}" for i in range(2) for k in ("c_attn", "c_proj")]
    np.testing.assert_array_equal(model(Tensor(ids), Tensor(mask)).asnumpy(), base)  # B = 0
    tn = peft.trainable_parameter_names(model)
    assert len(tn) == 8 and all(peft.is_adapter_name(n) for n in tn)
    assert [p.name for p in model.trainable_params()] == tn
    rng = np.random.default_rng(0)
    for _, layer in peft.lora_layers(model):
        layer.lora_B.set_data(Tensor(rng.normal(0, 0.5, layer.lora_B.shape).astype(np.float32)))
    adapted = model(Tensor(ids), Tensor(mask)).asnumpy()
    assert np.abs(adapted - base).max() > 1e-3
    peft.merge_lora(model)
    np.testing.assert_allclose(model(Tensor(ids), Tensor(mask)).asnumpy(), adapted, atol=1e-4)
    assert not np.array_equal(model.transformer.h[0].attn.c_attn.weight.asnumpy(), w0)
    peft.unmerge_lora(model)
    np.testing.assert_array_equal(model.transformer.h[0].attn.c_attn.weight.asnumpy(), w0)
    np.testing.assert_allclose(model(Tensor(ids), Tensor(mask)).asnumpy(), adapted, atol=1e-6)
    with pytest.raises(peft.AdapterError, match="no Dense layer matches"):
        peft.apply_lora(GPT2LMHeadModel(CFG), targets=("q_proj",))


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_training_step_changes_only_trainable_and_adapter_round_trip(tmp_path, batch, method):
    ids, mask = batch
    model = GPT2LMHeadModel(CFG, seed=6)
    if method == "lora":
        peft.apply_lora(model, r=2, alpha=4, targets=("c_attn", "c_fc"))
        expect = {n for n, _ in model.parameters_and_names() if peft.is_adapter_name(n)}
        # B = 0 means A gets no gradient on the first step; a second step moves A too
        steps = 2
    else:
        peft.apply_bitfit(model)
        expect = {n for n, _ in model.parameters_and_names() if n.endswith(".bias")}
        steps = 1
    assert set(peft.trainable_parameter_names(model)) == expect
    before = _params(model)
    for _ in range(steps):
        _sgd_step(model, ids, mask)
    after = _params(model)
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    assert changed == expect
    saved = peft.save_adapter(model, tmp_path / "adapter.safetensors")
    assert set(saved) == expect
    fresh = GPT2LMHeadModel(CFG, seed=6)
    peft.load_adapter(fresh, tmp_path / "adapter.safetensors")
    np.testing.assert_array_equal(fresh(Tensor(ids), Tensor(mask)).asnumpy(),
                                  model(Tensor(ids), Tensor(mask)).asnumpy())
    wrong = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=61, n_positions=24))
    with pytest.raises(peft.AdapterError, match="shape"):
        peft.load_adapter(wrong, tmp_path / "adapter.safetensors")


def test_weights_written_after_compilation_reach_compiled_graphs(batch):
    """MindSpore keeps compiled graphs on the old tensor after Parameter.set_data; loads and LoRA
    merges must write in place so graphs built earlier compute with the new weights."""
    ids, _ = batch
    model = GPT2LMHeadModel(CFG, seed=8)
    fwd = ms.jit(lambda_free_forward(model))
    fwd(Tensor(ids), _ones(ids))                       # compile with the initial weights
    sd = random_hf_state_dict(CFG, seed=9)
    ckpt.load_hf_state_dict(model, sd)
    np.testing.assert_allclose(fwd(Tensor(ids), _ones(ids)).asnumpy(),
                               hf_reference_logits(sd, CFG, ids), rtol=1e-4, atol=1e-4)

    peft.apply_lora(model, r=2, alpha=4, targets=("c_fc",))
    for _, layer in peft.lora_layers(model):
        layer.lora_B.set_data(Tensor(np.full(layer.lora_B.shape, 0.3, np.float32)))
    prompts = [list(ids[0, :5]), list(ids[1, :3])]
    before = generate(model, prompts, 4)               # compiled with the LoRA branch
    want = model(Tensor(ids), _ones(ids)).asnumpy()
    peft.merge_lora(model)
    assert generate(model, prompts, 4) == before       # recompiled: no double-counted update
    np.testing.assert_allclose(model(Tensor(ids), _ones(ids)).asnumpy(), want, atol=1e-4)


def lambda_free_forward(model):
    def forward(i, m):
        return model(i, m)
    return forward


def test_sharded_and_half_precision_safetensors(tmp_path, batch):
    from safetensors.numpy import save_file

    ids, _ = batch
    sd = random_hf_state_dict(CFG, seed=12)
    keys = sorted(sd)
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CFG.to_dict()))
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for fname, ks in halves.items():
        save_file({k: sd[k].astype(np.float16) for k in ks}, str(d / fname))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, ks in halves.items() for k in ks}}))
    model = ckpt.from_pretrained(d)
    ref = hf_reference_logits({k: v.astype(np.float16) for k, v in sd.items()}, CFG, ids)
    np.testing.assert_allclose(model(Tensor(ids), _ones(ids)).asnumpy(), ref, rtol=1e-4, atol=1e-4)
