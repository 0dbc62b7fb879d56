"""The DP engine leaves nothing data-derived in the user's objects.

Book-keeping needs each covered layer's input activation and a zero "probe" on its output.  They
live in buffers owned by the engine, never in the user's network: after training,
``save_checkpoint(net)`` holds exactly the names the net had before, no saved array and no
Parameter contains a training row (exact or float32-rounded, raw or layer-normalised), the net's
classes are unchanged and it still runs at any batch size with the outputs it had before wrapping.
"""
import os

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn, ops  # noqa: E402

from accountant.certify import certify  # noqa: E402
from accountant.mechanism import Mechanism  # noqa: E402
from accountant.noise import Gaussian  # noqa: E402
from accountant.table import write_certified_table  # noqa: E402
from finetune.dp.optimizer import DPOptimizer  # noqa: E402
from finetune.dp.per_example import register_dense  # noqa: E402

B, T, D, H, K = 4, 3, 6, 5, 3
MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    noise = Gaussian(1.0)
    cert = certify(Mechanism(noise, 1.0, "l2", 0.25, 4), 1e-5)
    return write_certified_table(tmp_path_factory.mktemp("t") / "g.npz", noise,
                                 eps_target=cert.epsilon, delta=1e-5, sampling_rate=0.25, steps=4,
                                 geometry="l2", certificate=cert, gaussian_sigma=1.0)


class MyDense(nn.Cell):
    """A user layer computing x W^T + b, registered for book-keeping."""

    def __init__(self, n_in, n_out, seed):
        super().__init__()
        rs = np.random.RandomState(seed)
        self.w = ms.Parameter(Tensor(rs.randn(n_out, n_in).astype(np.float32)), name="w")
        self.b = ms.Parameter(Tensor(rs.randn(n_out).astype(np.float32)), name="b")

    def construct(self, x):
        return ops.dense(x, self.w, self.b)


register_dense(MyDense, weight="w", bias="b")


def _dense(n_in, n_out, rs):
    return nn.Dense(n_in, n_out, weight_init=Tensor(rs.randn(n_out, n_in).astype(np.float32)),
                    bias_init=Tensor(rs.randn(n_out).astype(np.float32)))


class _CE(nn.Cell):
    """Per-example mean token cross-entropy of ``head(x)`` [B]."""

    def loss(self, o, y):
        ce = ops.cross_entropy(o.reshape(-1, K), y.reshape(-1), reduction="none")
        return ce.reshape(y.shape).mean(-1)


class DenseFirst(_CE):
    def __init__(self):
        super().__init__()
        rs = np.random.RandomState(0)
        self.fc = _dense(D, H, rs)
        self.out = _dense(H, K, rs)

    def construct(self, x, y):
        return self.loss(self.out(ops.tanh(self.fc(x))), y)


class LayerNormFirst(_CE):
    def __init__(self):
        super().__init__()
        rs = np.random.RandomState(1)
        self.ln = nn.LayerNorm((D,))
        self.fc = _dense(D, K, rs)

    def construct(self, x, y):
        return self.loss(self.fc(self.ln(x)), y)


class CustomFirst(_CE):
    """The registered layer first, inside a SequentialCell (children held in a list too)."""

    def __init__(self):
        super().__init__()
        rs = np.random.RandomState(2)
        self.body = nn.SequentialCell([MyDense(D, H, 3), nn.Tanh()])
        self.out = _dense(H, K, rs)

    def construct(self, x, y):
        return self.loss(self.out(self.body(x)), y)


NETS = {"dense": DenseFirst, "layernorm": LayerNormFirst, "custom": CustomFirst}


def _distinctive(n, seed=7):
    """Rows no weight would hold by chance: large offsets, many digits."""
    rs = np.random.RandomState(seed)
    x = (1000.0 + 37.0 * rs.randn(n, T, D)).astype(np.float32)
    y = rs.randint(0, K, (n, T)).astype(np.int32)
    return x, y


def _candidate_rows(x):
    """Training rows as a layer could store them: raw, and normalised over the features."""
    raw = x.reshape(-1, x.shape[-1]).astype(np.float64)
    centred = raw - raw.mean(-1, keepdims=True)
    xhat = centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-5)
    return np.concatenate([raw, xhat])


def _contains_row(array, rows) -> bool:
    """Does any window of ``array`` (flattened) equal a row, exactly or after float32 rounding?"""
    flat = np.asarray(array, np.float64).reshape(-1)
    d = rows.shape[1]
    if flat.size < d:
        return False
    if flat.size <= 200_000:
        windows = np.lib.stride_tricks.sliding_window_view(flat, d)
    elif flat.size % d == 0:
        windows = flat.reshape(-1, d)
    else:
        return False
    for r in rows:
        r32 = r.astype(np.float32).astype(np.float64)
        tol = 1e-6 * np.abs(r32) + 1e-6
        if np.any(np.all(np.abs(windows - r32) <= tol, axis=1)):
            return True
    return False


def _structure(net):
    return [(n, type(c)) for n, c in net.cells_and_names()]


def _scan_user_objects(net, rows, tmp_path, names_before):
    """The checkpoint and every Parameter of ``net``: same names, no training row."""
    path = os.path.join(str(tmp_path), "user.ckpt")
    ms.save_checkpoint(net, path)
    saved = ms.load_checkpoint(path)
    assert sorted(saved) == sorted(names_before)
    assert sorted(n for n, _ in net.parameters_and_names()) == sorted(names_before)
    for name, p in saved.items():
        assert not _contains_row(p.asnumpy(), rows), f"training row in saved {name}"
    for name, p in net.parameters_and_names():
        assert not _contains_row(p.asnumpy(), rows), f"training row in Parameter {name}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", NETS)
def test_training_leaves_no_row_in_the_users_net(kind, mode, table, tmp_path):
    ms.set_context(mode=MODES[mode])
    net = NETS[kind]()
    names = [n for n, _ in net.parameters_and_names()]
    structure = _structure(net)
    x, y = _distinctive(3 * B)
    dp = DPOptimizer(nn.SGD(net.trainable_params(), learning_rate=0.01), net, table,
                     max_grad_norm=1.0, expected_batch_size=B, seed=0)
    assert dp.method == "bookkeeping"
    mask = np.ones(B, np.float32)
    for step in range(2):
        rows = slice(step * B, (step + 1) * B)
        dp.step([([x[rows], y[rows]], mask)])
    _scan_user_objects(net, _candidate_rows(x), tmp_path, names)
    assert _structure(net) == structure
    # the engine itself still works after the checks (its buffers are its own)
    dp.step([([x[-B:], y[-B:]], mask)])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", NETS)
def test_wrapped_net_runs_at_any_batch_size_with_the_same_outputs(kind, mode, table):
    ms.set_context(mode=MODES[mode])
    net = NETS[kind]()
    x, y = _distinctive(2 * B + 3, seed=9)
    before = net(Tensor(x), Tensor(y)).asnumpy()
    dp = DPOptimizer(nn.SGD(net.trainable_params(), learning_rate=0.0), net, table,
                     max_grad_norm=1.0, expected_batch_size=B, seed=0)
    dp.step([([x[:B], y[:B]], np.ones(B, np.float32))])
    np.testing.assert_array_equal(net(Tensor(x), Tensor(y)).asnumpy(), before)
    np.testing.assert_array_equal(net(Tensor(x[:1]), Tensor(y[:1])).asnumpy(), before[:1])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_gpt2_peft_training_leaves_no_row_in_the_model(method, mode, table, tmp_path):
    from finetune.models.gpt2 import GPT2Config, GPT2LMHeadModel
    from finetune.models.peft import apply_bitfit, apply_lora

    ms.set_context(mode=MODES[mode])
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=97, n_positions=16)
    model = GPT2LMHeadModel(cfg, seed=0)
    if method == "lora":
        apply_lora(model, r=2, alpha=4.0, targets=("c_attn",))
    else:
        apply_bitfit(model)
    names = [n for n, _ in model.parameters_and_names()]
    structure = _structure(model)
    rs = np.random.RandomState(3)
    ids = rs.randint(0, cfg.vocab_size, (2 * B, 8)).astype(np.int32)
    mask = np.ones_like(ids, dtype=np.float32)
    before = model.loss(Tensor(ids), Tensor(mask)).asnumpy()
    dp = DPOptimizer(nn.SGD(model.trainable_params(), learning_rate=0.0), model, table,
                     max_grad_norm=1.0, expected_batch_size=B, seed=0)
    assert dp.method == "bookkeeping"
    dp.step([([ids[:B], mask[:B]], np.ones(B, np.float32))])
    assert _structure(model) == structure
    np.testing.assert_array_equal(model.loss(Tensor(ids), Tensor(mask)).asnumpy(), before)
    # data-derived rows of a GPT-2 step: the token ids and their input embeddings
    emb = (model.transformer.wte.weight.asnumpy()[ids[:B]]
           + model.transformer.wpe.weight.asnumpy()[np.arange(8)]).reshape(-1, cfg.n_embd)
    _scan_user_objects(model, np.concatenate([_candidate_rows(emb[None])]), tmp_path, names)
    for name, p in model.parameters_and_names():
        assert not _contains_row(p.asnumpy(), ids[:B].astype(np.float64)), name


# ---------------------------------------------------------------------------------------------
# book-keeping for every GPT-2 parameter (full fine-tuning)
# ---------------------------------------------------------------------------------------------
def _tiny_gpt2(seed=0):
    from finetune.models.gpt2 import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=41, n_positions=12)
    return GPT2LMHeadModel(cfg, seed=seed)


def _gpt2_batch(cfg, b=4, t=9, seed=5):
    """Token ids with repeats inside an example (the lookup norm's [id_t = id_t'] term) and one
    padded example (its padding must contribute nothing)."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(0, 6, (b, t)).astype(np.int32)       # a small id range: many repeats
    ids[1] = rs.randint(0, cfg.vocab_size, t)
    mask = np.ones((b, t), np.float32)
    mask[2, 6:] = 0.0
    return ids, mask


def _single_gpt2_grads(model, params, ids, mask):
    g = ms.grad(_SumLoss(model), grad_position=None, weights=ms.ParameterTuple(params))
    return [[o.asnumpy().astype(np.float64) for o in g(Tensor(ids[i:i + 1]), Tensor(mask[i:i + 1]))]
            for i in range(len(ids))]


class _SumLoss(nn.Cell):
    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, ids, mask):
        return self.model.loss(ids, mask).sum()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("geometry", ["l2", "l1"])
def test_full_gpt2_bookkeeping_equals_single_example_gradients(geometry, mode):
    """Every GPT-2 parameter, the tied embedding counted once (lookup + head part, cross term)."""
    from finetune.dp.per_example import PerExampleGradients

    ms.set_context(mode=MODES[mode])
    model = _tiny_gpt2()
    params = list(model.trainable_params())
    assert any(p is model.transformer.wte.weight for p in params)
    ids, mask = _gpt2_batch(model.config)
    single = _single_gpt2_grads(model, params, ids, mask)
    flat = [np.concatenate([g.reshape(-1) for g in gi]) for gi in single]
    want_norms = np.array([np.abs(f).sum() if geometry == "l1" else np.sqrt((f ** 2).sum())
                           for f in flat])
    pe = PerExampleGradients(model, params, geometry=geometry, method="bookkeeping")
    rows = np.ones(len(ids), np.float32)
    # no clipping: the sum of the per-example gradients
    grads, _, norms = pe.clipped_sum([ids, mask], rows, float("inf"))
    np.testing.assert_allclose(norms.asnumpy(), want_norms, rtol=2e-5)
    for k, g in enumerate(grads):
        want = sum(single[i][k] for i in range(len(ids)))
        np.testing.assert_allclose(g.asnumpy(), want, rtol=2e-4, atol=2e-6, err_msg=params[k].name)
    # clipping at a norm below every example's: sum_i c_i g_i with c_i = C (1 - margin) / ||g_i||
    clip = 0.5 * float(want_norms.min())
    rows[3] = 0.0  # a padding row contributes nothing
    grads, _, norms = pe.clipped_sum([ids, mask], rows, clip)
    c = clip * (1 - 1e-4) / want_norms * rows
    for k, g in enumerate(grads):
        want = sum(c[i] * single[i][k] for i in range(len(ids)))
        np.testing.assert_allclose(g.asnumpy(), want, rtol=2e-4, atol=2e-7, err_msg=params[k].name)


# ---------------------------------------------------------------------------------------------
# the faster step: sum kept on the device, noise drawn in a background thread
# ---------------------------------------------------------------------------------------------
def _param_values(net):
    return [p.asnumpy().copy() for p in net.trainable_params()]


@pytest.mark.parametrize("mode", MODES)
def test_device_sum_equals_host_float64_sum_of_micro_batches(mode, table):
    """The clipped sum accumulated on the device (float32) equals the previous host float64
    accumulation of the micro-batches' clipped sums to float32 round-off."""
    from finetune.dp.per_example import PerExampleGradients

    ms.set_context(mode=MODES[mode])
    net = DenseFirst()
    x, y = _distinctive(3 * B, seed=11)
    x = (x - 1000.0) / 37.0
    masks = [np.ones(B, np.float32), np.ones(B, np.float32), np.array([1, 1, 0, 0], np.float32)]
    reference = PerExampleGradients(DenseFirst(), geometry="l2")
    want = None
    for k, m in enumerate(masks):
        part = [g.asnumpy().astype(np.float64) for g in
                reference.clipped_sum([x[k * B:(k + 1) * B], y[k * B:(k + 1) * B]], m, 1.0)[0]]
        want = part if want is None else [a + b for a, b in zip(want, part)]
    before = _param_values(net)
    dp = DPOptimizer(nn.SGD(net.trainable_params(), learning_rate=1.0), net, table,
                     max_grad_norm=1.0, expected_batch_size=1.0, add_noise=False)
    dp.step([([x[k * B:(k + 1) * B], y[k * B:(k + 1) * B]], m) for k, m in enumerate(masks)])
    got = [b.astype(np.float64) - a for a, b in zip(_param_values(net), before)]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_noise_drawn_in_chunks_fills_every_coordinate_from_the_table_law(table):
    """The noise is drawn per parameter in chunks (large models): every coordinate of every
    parameter is drawn once, from the table's law (a Kolmogorov-Smirnov test that fails for a
    skipped chunk left as uninitialised memory, a repeated chunk, or a wrong scale), and a seed
    reproduces the draw."""
    from scipy import stats

    net = nn.SequentialCell([nn.Dense(150, 40), nn.Dense(40, 3)])
    params = net.trainable_params()

    def draw(seed):
        dp = DPOptimizer(nn.SGD(params, learning_rate=0.1), net, table, max_grad_norm=1.0,
                         expected_batch_size=1.0, seed=seed, prefetch_noise=False)
        dp.NOISE_CHUNK = 7   # not a divisor of any parameter's size
        bufs, _ = dp._draw()
        assert [b.shape for b in bufs] == [(int(np.prod(p.shape)),) for p in params]
        return np.concatenate(bufs)

    z = draw(3)
    assert z.size == 150 * 40 + 40 + 40 * 3 + 3
    assert stats.kstest(z, table.noise.cdf).pvalue > 1e-3
    assert np.unique(z).size == z.size           # no chunk repeated
    np.testing.assert_array_equal(draw(3), z)
    assert not np.array_equal(draw(4), z)


def test_background_noise_draws_the_same_noise_in_the_same_order(table):
    """Seeded runs with and without the background draw: identical weights, generator states."""
    from accountant.randomness import make_rng
    from finetune.dp.sampling import PoissonSampler, micro_batches

    ms.set_context(mode=ms.GRAPH_MODE)
    x, y = _distinctive(24, seed=13)
    x = (x - 1000.0) / 37.0
    out = {}
    for prefetch in (False, True):
        net = DenseFirst()
        rng = make_rng(seed=4)  # shared by the sampler and the noise, as in finetune.train
        dp = DPOptimizer(nn.SGD(net.trainable_params(), learning_rate=0.1), net, table,
                         max_grad_norm=1.0, expected_batch_size=6.0, rng=rng, prefetch_noise=prefetch)
        sampler = PoissonSampler(24, 0.25, 3, rng=rng)
        for idx in sampler:
            dp.step([([x[m.indices], y[m.indices]], m.mask) for m in micro_batches(idx, B)])
        out[prefetch] = (_param_values(net), rng.bit_generator.state)
        if prefetch:
            assert dp.last_timings["noise_draw"] > 0
    for a, b in zip(out[False][0], out[True][0]):
        np.testing.assert_array_equal(a, b)
    assert out[False][1] == out[True][1]


def test_interrupted_step_rewinds_the_noise_generator(table):
    """A step interrupted during the device work releases nothing and leaves a seeded generator
    where it was (a resumed run then draws the noise an uninterrupted run draws)."""
    from accountant.randomness import make_rng

    ms.set_context(mode=ms.GRAPH_MODE)
    net = DenseFirst()
    x, y = _distinctive(B, seed=3)
    rng = make_rng(seed=8)
    dp = DPOptimizer(nn.SGD(net.trainable_params(), learning_rate=0.1), net, table,
                     max_grad_norm=1.0, expected_batch_size=B, rng=rng)
    before, weights = rng.bit_generator.state, _param_values(net)

    def batches():
        yield [x, y], np.ones(B, np.float32)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dp.step(batches())
    assert rng.bit_generator.state == before and dp.steps_taken == 0
    for a, b in zip(weights, _param_values(net)):
        np.testing.assert_array_equal(a, b)
    dp.step([([x, y], np.ones(B, np.float32))])  # the next step starts from a clean sum
    assert dp.steps_taken == 1


@pytest.mark.parametrize("ghost", [True, False])
def test_ghost_and_materialised_norms_agree_with_single_example_gradients(ghost, monkeypatch):
    """MixOpt picks, per layer, the ghost norm or the materialised per-example gradient by cost;
    both give the single-example norms and the same clipped sum (forced here for every layer)."""
    from finetune.dp import per_example

    ms.set_context(mode=ms.GRAPH_MODE)
    monkeypatch.setattr(per_example.bookkeeping, "_use_ghost", lambda slot, *a: ghost and slot.role in (
        "weight", "lora_A", "lora_B", "wte"))
    model = _tiny_gpt2(seed=1)
    params = list(model.trainable_params())
    ids, mask = _gpt2_batch(model.config, seed=2)
    single = _single_gpt2_grads(model, params, ids, mask)
    want = np.array([np.sqrt(sum((g ** 2).sum() for g in gi)) for gi in single])
    pe = per_example.PerExampleGradients(model, params, geometry="l2", method="bookkeeping")
    rows = np.ones(len(ids), np.float32)
    clip = 0.7 * float(want.min())
    grads, _, norms = pe.clipped_sum([ids, mask], rows, clip)
    assert all(pe._cell.core.ghost[k] == (ghost and pe._cell.core.roles[k] in ("weight", "wte"))
               for k in range(len(params)))
    np.testing.assert_allclose(norms.asnumpy(), want, rtol=2e-5)
    c = clip * (1 - 1e-4) / want
    for k, g in enumerate(grads):
        np.testing.assert_allclose(g.asnumpy(), sum(c[i] * single[i][k] for i in range(len(ids))),
                                   rtol=2e-4, atol=2e-7, err_msg=params[k].name)


_LOG_LEAK_SCRIPT = r"""
import sys
import numpy as np
import mindspore as ms
from mindspore import nn, ops
from accountant.table import load_table
from finetune.dp.optimizer import DPOptimizer

ms.set_context(mode=ms.GRAPH_MODE)

class Net(nn.Cell):
    def __init__(self):
        super().__init__()
        self.fc = nn.Dense(6, 3)
    def construct(self, x, y):
        return ((self.fc(x) - y) ** 2).sum(axis=1)

net = Net()
B = 4
x = np.full((3 * B, 6), 1234.5, np.float32)
y = np.zeros((3 * B, 3), np.float32)
dp = DPOptimizer(nn.SGD(net.trainable_params(), learning_rate=0.1), net, load_table(sys.argv[1]),
                 max_grad_norm=1e9, expected_batch_size=8.0, add_noise=False, seed=0)
for _ in range(2):
    dp.step([([x[k * B:(k + 1) * B], y[k * B:(k + 1) * B]], np.ones(B, np.float32)) for k in range(3)])
print("done")
"""


def test_no_gradient_values_reach_the_log(tmp_path):
    """Summing micro-batches passed plain tuples of Tensors to a compiled Cell: MindSpore treated
    them as constants, recompiled on every call and printed the un-noised clipped sums in a
    warning on stderr (a log is something the code leaves behind).  Run in a subprocess so the
    native logger's stderr is captured."""
    import subprocess
    import sys

    noise = Gaussian(1.0)
    cert = certify(Mechanism(noise, 1.0, "l2", 0.25, 4), 1e-5)
    table_path = tmp_path / "g.npz"
    write_certified_table(table_path, noise, eps_target=cert.epsilon, delta=1e-5, sampling_rate=0.25,
                          steps=4, geometry="l2", certificate=cert, gaussian_sigma=1.0)
    script = tmp_path / "leak.py"
    script.write_text(_LOG_LEAK_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, str(script), str(table_path)], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0 and "done" in r.stdout, r.stderr[-2000:]
    assert "Constant value tensor" not in r.stderr
    assert "value=" not in r.stderr, r.stderr[-2000:]
