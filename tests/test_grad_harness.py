"""Per-example gradient harness: every covered layer type, both MindSpore execution modes, both
clipping geometries, book-keeping and vmap, with a padding row.

Reference (float64): each example's gradient on its own (a batch of one, ``ms.grad``, cast to
float64), its norm in the geometry, the clip factor ``min(1, C (1 - margin) / ||g_i||)`` and the
clipped sum ``sum_i c_i g_i`` over the real rows.  ``PerExampleGradients`` must return these
norms and sums to float32 round-off in graph *and* PyNative mode (docs/soundness.md: both modes
give the same numbers).  Layers applied more than once (shared weights) are not exact under
book-keeping: ``auto`` must pick vmap and say why, ``bookkeeping`` must refuse.  Last,
``make_private`` must learn a separable problem in both modes.
"""
from contextlib import nullcontext

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn, ops  # noqa: E402

from finetune import make_private  # noqa: E402
from helpers import Clf, apply_llama_method  # noqa: E402
from finetune.dp.per_example import CLIP_MARGIN, PerExampleGradients, SharedLayerError, \
    register_dense  # noqa: E402

B, T, D, K = 4, 3, 6, 3
MASK = np.array([1, 1, 0, 1], np.float32)       # row 2 is padding
MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}


def _w(rs, *shape, scale=1.0):
    return Tensor((scale * rs.randn(*shape)).astype(np.float32))


class RegisteredDense(nn.Cell):
    """A user layer computing ``x W^T + b`` (attributes ``kernel`` / ``offset``), registered."""

    def __init__(self, n_in, n_out, rs):
        super().__init__()
        self.kernel = ms.Parameter(_w(rs, n_out, n_in), name="kernel")
        self.offset = ms.Parameter(_w(rs, n_out), name="offset")

    def construct(self, x):
        return ops.dense(x, self.kernel, self.offset)


register_dense(RegisteredDense, weight="kernel", bias="offset")


class _TokenCE(nn.Cell):
    """Per-example mean token cross-entropy of ``logits(x)`` [B]."""

    def construct(self, x, y):
        o = self.logits(x)
        return ops.cross_entropy(o.reshape(-1, K), y.reshape(-1), reduction="none").reshape(y.shape).mean(-1)


class Covered(_TokenCE):
    """Every covered layer type of a plain Cell in one net: a registered layer inside a
    SequentialCell, a bias-free Dense wide enough for the ghost norm (T (in + out) < in out), a
    LayerNorm, and a Dense with bias whose per-example gradient is materialised."""

    def __init__(self):
        super().__init__()
        rs = np.random.RandomState(0)
        self.body = nn.SequentialCell([RegisteredDense(D, D, rs), nn.Tanh()])
        self.wide = nn.Dense(D, 12, weight_init=_w(rs, 12, D, scale=0.5), has_bias=False)
        self.ln = nn.LayerNorm((12,))
        self.ln.gamma.set_data(Tensor(1 + 0.3 * rs.randn(12).astype(np.float32)))
        self.ln.beta.set_data(_w(rs, 12, scale=0.3))
        self.out = nn.Dense(12, K, weight_init=_w(rs, K, 12, scale=0.5), bias_init=_w(rs, K))

    def logits(self, x):
        return self.out(self.ln(self.wide(self.body(x))))


class SharedCall(_TokenCE):
    """One Dense applied twice per forward (a shared layer)."""

    def __init__(self):
        super().__init__()
        rs = np.random.RandomState(4)
        self.block = nn.Dense(D, D, weight_init=_w(rs, D, D, scale=0.6), bias_init=_w(rs, D))
        self.out = nn.Dense(D, K, weight_init=_w(rs, K, D), bias_init=_w(rs, K))

    def logits(self, x):
        return self.out(ops.tanh(self.block(ops.tanh(self.block(x)))))


class SharedWeight(_TokenCE):
    """Two Dense layers holding one weight Parameter (tied weights), each applied once."""

    def __init__(self):
        super().__init__()
        rs = np.random.RandomState(5)
        self.first = nn.Dense(D, D, weight_init=_w(rs, D, D, scale=0.6), bias_init=_w(rs, D))
        self.second = nn.Dense(D, D, weight_init="zeros", bias_init=_w(rs, D))
        self.second.weight = self.first.weight
        self.out = nn.Dense(D, K, weight_init=_w(rs, K, D), bias_init=_w(rs, K))

    def logits(self, x):
        return self.out(ops.tanh(self.second(ops.tanh(self.first(x)))))


SHARED = {"shared_call": SharedCall, "shared_weight": SharedWeight}


class Embedded(nn.Cell):
    """A user's Cell with a plain ``nn.Embedding`` (repeated ids inside an example) and a Dense."""

    def __init__(self):
        super().__init__()
        rs = np.random.RandomState(8)
        self.emb = nn.Embedding(7, D, embedding_table=_w(rs, 7, D))
        self.out = nn.Dense(D, K, weight_init=_w(rs, K, D), bias_init=_w(rs, K))

    def construct(self, ids, y):
        o = self.out(ops.tanh(self.emb(ids)))
        return ops.cross_entropy(o.reshape(-1, K), y.reshape(-1), reduction="none").reshape(y.shape).mean(-1)


def _batch(seed=11):
    rs = np.random.RandomState(seed)
    return [rs.randn(B, T, D).astype(np.float32), rs.randint(0, K, (B, T)).astype(np.int32)]


class _Sum(nn.Cell):
    def __init__(self, loss):
        super().__init__(auto_prefix=False)
        self.loss = loss

    def construct(self, *inputs):
        return self.loss(*inputs).sum()


def _reference(loss, params, inputs):
    """Each example's gradient alone (a batch of one), float64: [example][parameter]."""
    grad = ms.grad(_Sum(loss), grad_position=None, weights=ms.ParameterTuple(params))
    return [[g.asnumpy().astype(np.float64) for g in grad(*[Tensor(x[i:i + 1]) for x in inputs])]
            for i in range(len(inputs[0]))]


def _norm(grads, geometry):
    flat = np.concatenate([g.reshape(-1) for g in grads])
    return np.abs(flat).sum() if geometry == "l1" else np.sqrt((flat ** 2).sum())


def _check(pe, inputs, single, geometry, mask=MASK):
    """PerExampleGradients against the float64 reference: norms, clipped sums, padding rows."""
    names = [p.name for p in pe.params]
    want_norms = np.array([_norm(g, geometry) for g in single])
    real = mask > 0
    clip = float(np.median(want_norms[real]))      # some rows clipped, some not
    assert (want_norms[real] > clip).any() and (want_norms[real] < clip).any()
    grads, losses, norms = pe.clipped_sum(inputs, mask, clip)
    norms, losses = norms.asnumpy(), losses.asnumpy()
    np.testing.assert_allclose(norms[real], want_norms[real], rtol=1e-4, err_msg=f"{geometry} norms")
    assert (norms[~real] == 0).all() and (losses[~real] == 0).all()
    factors = np.minimum(1.0, clip * (1 - CLIP_MARGIN) / want_norms) * mask
    for k, g in enumerate(grads):
        want = sum(factors[i] * single[i][k] for i in range(len(single)))
        np.testing.assert_allclose(g.asnumpy(), want, rtol=2e-4, atol=2e-5 * np.abs(want).max() + 1e-9,
                                   err_msg=f"{geometry} clipped sum of {names[k]}")


@pytest.fixture(params=list(MODES))
def mode(request):
    ms.set_context(mode=MODES[request.param])
    return request.param


def test_covered_layers_equal_float64_single_example_gradients(mode):
    net = Covered()
    names = [p.name for p in net.trainable_params()]
    assert names == ["body.0.kernel", "body.0.offset", "wide.weight", "ln.gamma", "ln.beta", "out.weight",
                     "out.bias"]
    inputs = _batch()
    single = _reference(net, net.trainable_params(), inputs)
    for geometry in ("l2", "l1"):
        for method in ("bookkeeping", "vmap"):
            pe = PerExampleGradients(net, geometry=geometry, method=method)
            assert pe.method == method
            _check(pe, inputs, single, geometry)
    auto = PerExampleGradients(net, method="auto")
    assert auto.method == "bookkeeping" and "covered layer" in auto.method_reason


def test_plain_embedding_gets_bookkeeping_equal_to_float64_single_example_gradients(mode):
    net = Embedded()
    rs = np.random.RandomState(13)
    inputs = [rs.randint(0, 4, (B, T)).astype(np.int32), rs.randint(0, K, (B, T)).astype(np.int32)]
    single = _reference(net, net.trainable_params(), inputs)
    auto = PerExampleGradients(net, method="auto")
    assert auto.method == "bookkeeping", auto.method_reason
    for geometry in ("l2", "l1"):
        for method in ("bookkeeping", "vmap"):
            _check(PerExampleGradients(net, geometry=geometry, method=method), inputs, single, geometry)


@pytest.mark.parametrize("kind", SHARED)
def test_shared_layers_get_vmap_under_auto_and_are_refused_by_bookkeeping(kind, mode):
    net = SHARED[kind]()
    inputs = _batch(seed=12)
    single = _reference(net, net.trainable_params(), inputs)
    said = pytest.warns(UserWarning, match="exactly once") if kind == "shared_call" else nullcontext()
    with said:   # found at the first call (a layer run twice) or at construction (one weight, two layers)
        auto = PerExampleGradients(net, geometry="l2", method="auto")
        _check(auto, inputs, single, "l2")
    assert auto.method == "vmap" and "shared" in auto.method_reason, auto.method_reason
    with pytest.raises(SharedLayerError, match="shared") as info:
        PerExampleGradients(net, method="bookkeeping").clipped_sum(inputs, MASK, 1.0)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# the tapped GPT-2 (every parameter: Linear, LayerNorm, position and tied token embedding)
# ---------------------------------------------------------------------------------------------
def _tiny_gpt2():
    from finetune.models.gpt2 import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=41, n_positions=12), seed=3)


class _GPT2Loss(nn.Cell):
    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, ids, mask):
        return self.model.loss(ids, mask)


@pytest.mark.parametrize("gpt2_mode", [pytest.param("graph", marks=pytest.mark.slow), "pynative"])
def test_gpt2_taps_equal_float64_single_example_gradients(gpt2_mode):
    """(Graph mode is slow here; tests/test_dp_engine.py checks the tapped GPT-2 in both modes.)"""
    ms.set_context(mode=MODES[gpt2_mode])
    model = _tiny_gpt2()
    params = list(model.trainable_params())
    rs = np.random.RandomState(6)
    ids = rs.randint(0, 8, (B, 7)).astype(np.int32)           # repeated ids inside an example
    tokens = np.ones((B, 7), np.float32)
    tokens[1, 5:] = 0.0                                        # padded tokens
    single = _reference(_GPT2Loss(model), params, [ids, tokens])
    for geometry in ("l2", "l1"):
        pe = PerExampleGradients(model, params, geometry=geometry, method="auto")
        assert pe.method == "bookkeeping"
        _check(pe, [ids, tokens], single, geometry)


@pytest.mark.slow
@pytest.mark.parametrize("geometry", ["l2", "l1"])
def test_gpt2_vmap_equals_float64_single_example_gradients(geometry, mode):
    model = _tiny_gpt2()
    params = list(model.trainable_params())
    rs = np.random.RandomState(7)
    ids = rs.randint(0, 41, (B, 7)).astype(np.int32)
    tokens = np.ones((B, 7), np.float32)
    single = _reference(_GPT2Loss(model), params, [ids, tokens])
    _check(PerExampleGradients(model, params, geometry=geometry, method="vmap"), [ids, tokens], single,
           geometry)


# ---------------------------------------------------------------------------------------------
# make_private learns
# ---------------------------------------------------------------------------------------------
def Linear2():
    return Clf(10, 2)


def test_make_private_learns_a_separable_problem(mode):
    """A 2-class linear problem, default per_example ('auto': book-keeping): accuracy > 0.9 in both
    modes (a run that trains on noise only stays near 0.5)."""
    rs = np.random.RandomState(0)
    x = rs.randn(512, 10).astype(np.float32)
    w = rs.randn(10).astype(np.float32)
    y = (x @ w > 0).astype(np.int32)
    net = Linear2()
    engine = make_private(net, nn.SGD(net.trainable_params(), learning_rate=1.0), dataset_size=len(x),
                          batch_size=64, epochs=2, noise_multiplier=1.0, target_delta=1e-5,
                          micro_batch_size=32, verbose=False)
    assert engine.optimizer.method == "bookkeeping"
    for batch in engine.batches(x, y):
        engine.step(batch)
    logits = x @ net.fc.weight.asnumpy().T + net.fc.bias.asnumpy()
    accuracy = float((logits.argmax(1) == y).mean())
    assert accuracy > 0.9, accuracy


# ---------------------------------------------------------------------------------------------
# the tapped Llama family: every parameter (linear with and without bias, RMSNorm gains, untied or
# tied token embedding) under full fine-tuning, LoRA on all seven projections, norm-only tuning
# and Houlsby adapters
# ---------------------------------------------------------------------------------------------
def _llama_configs():
    from finetune.models.llama import LlamaConfig

    return {"llama-gqa-untied": LlamaConfig(model_type="llama", vocab_size=37, hidden_size=16,
                                            intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
                                            num_key_value_heads=2, max_position_embeddings=16),
            "qwen2-tied-qkv-bias": LlamaConfig(model_type="qwen2", vocab_size=37, hidden_size=16,
                                               intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                                               num_key_value_heads=2, max_position_embeddings=16, qkv_bias=True,
                                               tie_word_embeddings=True)}


LLAMA_METHODS = ("full", "lora", "norm_only", "houlsby")


def _tiny_llama(name, method, seed=2):
    """A tiny Llama-family model with ``method`` applied; the zero-initialised halves of LoRA and
    the adapters get random values so that every trained parameter has a non-trivial gradient."""
    from finetune.models.llama import LlamaForCausalLM

    model = apply_llama_method(LlamaForCausalLM(_llama_configs()[name], seed=seed), method, r=2, size=3)
    rs = np.random.RandomState(seed)
    for p in model.trainable_params():
        if p.name.endswith("lora_B") or ".adapter_up." in p.name or p.name.endswith("layernorm.weight"):
            p.set_data(_w(rs, *p.shape, scale=0.3) + (1.0 if p.name.endswith("layernorm.weight") else 0.0))
    return model


def _token_batch(seed, rows=B, vocab=8):
    rs = np.random.RandomState(seed)
    ids = rs.randint(0, vocab, (rows, 6)).astype(np.int32)      # repeated ids inside an example
    tokens = np.ones((rows, 6), np.float32)
    tokens[1, 4:] = 0.0                                        # padded tokens
    return ids, tokens


# > 20 s each on a shared 2-core machine: the default run keeps the case with the most roles
LLAMA_CASES = [pytest.param(name, method, m, marks=[] if (name, method, m) == (
    "qwen2-tied-qkv-bias", "full", "pynative") else [pytest.mark.slow], id=f"{name}-{method}-{m}")
    for name in ("llama-gqa-untied", "qwen2-tied-qkv-bias") for method in LLAMA_METHODS
    for m in ("pynative", "graph")]


@pytest.mark.parametrize("name,method,llama_mode", LLAMA_CASES)
def test_llama_taps_equal_float64_single_example_gradients(name, method, llama_mode):
    """Per-example norms and clipped sums of every trained Llama parameter equal one-example-at-a-
    time gradients (float64), with book-keeping chosen by ``auto``."""
    ms.set_context(mode=MODES[llama_mode])
    model = _tiny_llama(name, method)
    params = list(model.trainable_params())
    ids, tokens = _token_batch(6)
    single = _reference(_GPT2Loss(model), params, [ids, tokens])
    pe = PerExampleGradients(model, params, geometry="l2", method="auto")
    assert pe.method == "bookkeeping", pe.method_reason
    _check(pe, [ids, tokens], single, "l2")
    if llama_mode == "pynative":
        _check(PerExampleGradients(model, params, geometry="l1", method="bookkeeping"), [ids, tokens], single, "l1")


# ---------------------------------------------------------------------------------------------
# units of m rows (person-level DP): the clipped quantity is each unit's summed gradient
# ---------------------------------------------------------------------------------------------
def _check_units(pe, inputs, single, geometry, mask, m):
    """Per-unit norms and clipped sums against the float64 ``||sum_{i in u} G_i||`` of the real
    rows of each unit (units are ``m`` contiguous rows)."""
    names = [p.name for p in pe.params]
    n_units = len(mask) // m
    units = [[sum(mask[i] * single[i][k] for i in range(u * m, (u + 1) * m)) for k in range(len(names))]
             for u in range(n_units)]
    real = mask.reshape(n_units, m).max(1) > 0
    want_norms = np.array([_norm(g, geometry) for g in units])
    clip = float(np.median(want_norms[real]))
    assert (want_norms[real] > clip).any() and (want_norms[real] < clip).any()
    grads, losses, norms = pe.clipped_sum(inputs, mask, clip)
    norms = norms.asnumpy()
    assert norms.shape == (n_units,) and losses.shape == (len(mask),)
    np.testing.assert_allclose(norms[real], want_norms[real], rtol=1e-4, err_msg=f"{geometry} unit norms")
    # the per-row norms differ: a test that unit clipping is not row clipping
    rows = np.array([_norm(g, geometry) for g in single])
    assert not np.allclose(rows[::m][real], want_norms[real], rtol=1e-2)
    factors = np.minimum(1.0, clip * (1 - CLIP_MARGIN) / want_norms) * real
    for k, g in enumerate(grads):
        want = sum(factors[u] * units[u][k] for u in range(n_units))
        np.testing.assert_allclose(g.asnumpy(), want, rtol=2e-4, atol=2e-5 * np.abs(want).max() + 1e-9,
                                   err_msg=f"{geometry} unit clipped sum of {names[k]}")


UNIT_MASK = np.array([1, 1, 0, 1, 1, 1], np.float32)     # 3 units of 2 rows; unit 1 has a padding row


def test_units_of_a_plain_cell_clip_the_summed_gradient(mode):
    """Dense (with and without bias, registered), LayerNorm and nn.Embedding, m = 2: book-keeping and
    vmap grouping both equal the float64 unit gradients."""
    rs = np.random.RandomState(21)
    for net, inputs in ((Covered(), [rs.randn(6, T, D).astype(np.float32), rs.randint(0, K, (6, T)).astype(np.int32)]),
                        (Embedded(), [rs.randint(0, 4, (6, T)).astype(np.int32),
                                      rs.randint(0, K, (6, T)).astype(np.int32)])):
        single = _reference(net, net.trainable_params(), inputs)
        for geometry in ("l2", "l1"):
            for method in ("bookkeeping", "vmap"):
                pe = PerExampleGradients(net, geometry=geometry, method=method, rows_per_unit=2)
                _check_units(pe, inputs, single, geometry, UNIT_MASK, 2)


@pytest.mark.slow
@pytest.mark.parametrize("ghost", [True, False], ids=["ghost", "materialised"])
@pytest.mark.parametrize("units_mode", ["pynative", "graph"])
def test_units_of_gpt2_clip_the_summed_gradient(units_mode, ghost, monkeypatch):
    """Tied wte (lookup, head and cross term over a unit's tokens), wpe (a unit repeats every
    position: rows summed before squaring), LayerNorm, Dense and bias, then LoRA, with m = 2 and
    m = 3; the ghost norm and the materialised unit gradient both forced for every matrix."""
    from finetune.dp import per_example
    from finetune.models import peft

    ms.set_context(mode=MODES[units_mode])
    monkeypatch.setattr(per_example.bookkeeping, "_use_ghost", lambda slot, in_shapes, out_shapes, l1, m=1: (
        ghost and not l1 and slot.role in ("weight", "lora_A", "lora_B", "wte", "embedding")))
    ids, tokens = _token_batch(9, rows=6)
    for lora in (False, True):
        model = _tiny_gpt2()
        if lora:
            peft.apply_lora(model, r=2, targets=("c_attn", "c_fc"))
            for _, layer in peft.lora_layers(model):
                layer.lora_B.set_data(_w(np.random.RandomState(1), *layer.lora_B.shape, scale=0.3))
        params = list(model.trainable_params())
        single = _reference(_GPT2Loss(model), params, [ids, tokens])
        for m, mask in ((2, UNIT_MASK), (3, np.array([1, 0, 1, 1, 1, 1], np.float32))):
            for method in ("bookkeeping", "vmap") if not lora else ("bookkeeping",):
                pe = PerExampleGradients(model, params, geometry="l2", method=method, rows_per_unit=m)
                _check_units(pe, [ids, tokens], single, "l2", mask, m)


@pytest.mark.slow
@pytest.mark.parametrize("units_mode", ["pynative", "graph"])
def test_units_of_llama_clip_the_summed_gradient(units_mode):
    """RMSNorm gains, linear layers with q/k/v biases, untied and tied token embeddings, m = 2."""
    ms.set_context(mode=MODES[units_mode])
    ids, tokens = _token_batch(10, rows=6)
    for name in ("llama-gqa-untied", "qwen2-tied-qkv-bias"):
        model = _tiny_llama(name, "full")
        params = list(model.trainable_params())
        single = _reference(_GPT2Loss(model), params, [ids, tokens])
        for geometry in ("l2", "l1"):
            pe = PerExampleGradients(model, params, geometry=geometry, method="bookkeeping", rows_per_unit=2)
            _check_units(pe, [ids, tokens], single, geometry, UNIT_MASK, 2)


def test_rows_per_unit_must_divide_the_micro_batch():
    net = Covered()
    with pytest.raises(ValueError, match="positive integer"):
        PerExampleGradients(net, rows_per_unit=0)
    pe = PerExampleGradients(net, rows_per_unit=3)
    with pytest.raises(ValueError, match="whole units"):
        pe.clipped_sum(_batch(), MASK, 1.0)


@pytest.mark.slow     # 34 s on a shared 2-core machine
def test_gpt2_adapters_get_bookkeeping_equal_to_float64_single_example_gradients():
    """Houlsby adapters on GPT-2: the adapter's down and up layers are taps of the adapted
    projection (before: not covered, vmap)."""
    from finetune.models import peft

    model = _tiny_gpt2()
    peft.apply_adapters(model, size=3)
    rs = np.random.RandomState(2)
    for name, p in model.parameters_and_names():
        if ".adapter_up." in name:
            p.set_data(_w(rs, *p.shape, scale=0.3))
    params = list(model.trainable_params())
    ids, tokens = _token_batch(6)
    single = _reference(_GPT2Loss(model), params, [ids, tokens])
    pe = PerExampleGradients(model, params, geometry="l2", method="auto")
    assert pe.method == "bookkeeping", pe.method_reason
    _check(pe, [ids, tokens], single, "l2")
