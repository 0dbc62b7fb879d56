"""DP machinery of finetune: per-example gradients (vmap and book-keeping), clipping geometry, the
optimizer wrapper (noise from a certified table), Poisson sampling and the privacy guard."""
import math
import os

import numpy as np
import pytest
from scipy import stats

import mindspore as ms
from mindspore import Tensor, nn, ops  # noqa: E402

from accountant.ledger import PrivacyLedger  # noqa: E402
from accountant.noise import Gaussian, Laplace  # noqa: E402
from accountant.randomness import SecureRandom  # noqa: E402
from helpers import certified_table  # noqa: E402
from finetune.dp.optimizer import DPOptimizer, GeometryError  # noqa: E402
from finetune.dp.per_example import PerExampleGradients, SummedGradients  # noqa: E402
from finetune.dp.sampling import PoissonSampler, micro_batches  # noqa: E402
from finetune.dp.guard import PrivacyBudgetExceeded, TableMismatchError, check_table  # noqa: E402
from finetune.dp.release_guard import ReleaseGuard  # noqa: E402

B, T, D, H, K = 4, 5, 6, 7, 3


@pytest.fixture(autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)


_table = certified_table   # a certified table for ``noise`` (its own certified epsilon is the target)


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    d = tmp_path_factory.mktemp("tables")
    return {
        "l2": _table(d / "g.npz", Gaussian(1.5), "l2", 0.25, 6),
        "l1": _table(d / "lap.npz", Laplace(4.0), "l1", 0.25, 6),
        "scalar": _table(d / "s.npz", Gaussian(1.5), "scalar", 0.25, 6),
    }


class Net(nn.Cell):
    """Dense -> tanh -> LayerNorm -> Dense, per-example mean token cross-entropy [B]."""

    def __init__(self, seed=0):
        super().__init__()
        rs = np.random.RandomState(seed)
        self.l1 = nn.Dense(D, H, weight_init=Tensor(rs.randn(H, D).astype(np.float32)),
                           bias_init=Tensor(rs.randn(H).astype(np.float32)))
        self.ln = nn.LayerNorm((H,))
        self.ln.gamma.set_data(Tensor(1 + 0.3 * rs.randn(H).astype(np.float32)))
        self.l2 = nn.Dense(H, K, weight_init=Tensor(rs.randn(K, H).astype(np.float32)),
                           bias_init=Tensor(rs.randn(K).astype(np.float32)))

    def construct(self, x, y):
        o = self.l2(self.ln(ops.tanh(self.l1(x))))
        ce = ops.cross_entropy(o.reshape(-1, K), y.reshape(-1), reduction="none")
        return ce.reshape(y.shape).mean(-1)


def _batch(seed=1, scale=1.0):
    rs = np.random.RandomState(seed)
    return [(scale * rs.randn(B, T, D)).astype(np.float32), rs.randint(0, K, (B, T)).astype(np.int32)]


def _single_grads(net, x, y):
    """Reference: each example's gradient, by plain ms.grad on batches of one (compiled once)."""
    g = ms.grad(_Sum(net), grad_position=None, weights=net.trainable_params())
    return [[o.asnumpy().astype(np.float64) for o in g(Tensor(x[i:i + 1]), Tensor(y[i:i + 1]))]
            for i in range(len(x))]


class _Sum(nn.Cell):
    def __init__(self, inner):
        super().__init__(auto_prefix=False)
        self.inner = inner

    def construct(self, x, y):
        return self.inner(x, y).sum()


def _norm(grads, geometry):
    flat = np.concatenate([g.reshape(-1) for g in grads])
    return np.abs(flat).sum() if geometry == "l1" else np.sqrt((flat ** 2).sum())


# ---------------------------------------------------------------------------------------------
# per-example gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["vmap", "bookkeeping"])
def test_per_example_gradients_equal_single_example_gradients(method):
    x, y = _batch()
    net = Net()
    refs = _single_grads(net, x, y)
    pe = PerExampleGradients(net, geometry="l2", method=method)
    assert pe.method == method
    for i in range(B):
        mask = np.zeros(B, np.float32)
        mask[i] = 1
        grads, losses, norms = pe.clipped_sum([x, y], mask, math.inf)
        for got, want in zip(grads, refs[i]):
            np.testing.assert_allclose(got.asnumpy(), want, rtol=1e-4, atol=1e-5)
        assert norms.asnumpy()[i] == pytest.approx(_norm(refs[i], "l2"), rel=1e-4)
    assert [p.name for p in net.trainable_params()] == ["l1.weight", "l1.bias", "ln.gamma", "ln.beta",
                                                        "l2.weight", "l2.bias"]


@pytest.mark.parametrize("geometry", ["l2", "l1"])
def test_bookkeeping_norms_and_sums_equal_vmap(geometry):
    x, y = _batch(seed=3)
    mask = np.array([1, 1, 0, 1], np.float32)
    out = {}
    for method in ("vmap", "bookkeeping"):
        pe = PerExampleGradients(Net(seed=2), geometry=geometry, method=method)
        grads, losses, norms = pe.clipped_sum([x, y], mask, 0.7)
        out[method] = ([g.asnumpy() for g in grads], losses.asnumpy(), norms.asnumpy())
    np.testing.assert_allclose(out["bookkeeping"][2], out["vmap"][2], rtol=2e-5)
    np.testing.assert_allclose(out["bookkeeping"][1], out["vmap"][1], rtol=1e-6)
    for a, b in zip(out["bookkeeping"][0], out["vmap"][0]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert out["vmap"][2][2] == 0.0 and out["vmap"][1][2] == 0.0  # padding row


def test_bookkeeping_equals_vmap_on_gpt2_lora_and_biases():
    """The tapped GPT-2 path: LoRA factors, a frozen-base Linear weight, Linear and LayerNorm
    weights and biases all in one parameter set."""
    from finetune.models.gpt2 import GPT2Config, GPT2LMHeadModel
    from finetune.models.peft import apply_lora

    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=61, n_positions=16)
    model = GPT2LMHeadModel(cfg, seed=0)
    apply_lora(model, r=2, alpha=4.0, targets=("c_attn",))
    rs = np.random.RandomState(0)
    train = ("lora_A", "lora_B", "ln_1.weight", "ln_1.bias", "mlp.c_fc.bias", "h.1.attn.c_proj.weight")
    for name, p in model.parameters_and_names():
        p.requires_grad = any(t in name for t in train)
        if name.endswith("lora_B"):  # non-zero so that lora_A gets a gradient
            p.set_data(Tensor(0.2 * rs.randn(*p.shape).astype(np.float32)))
    params = model.trainable_params()
    assert len(params) == 11
    ids = rs.randint(0, 61, (3, 8)).astype(np.int32)
    am = np.ones((3, 8), np.float32)
    am[1, 5:] = 0
    mask = np.array([1, 1, 1], np.float32)
    out = {}
    for method in ("vmap", "bookkeeping"):
        pe = PerExampleGradients(model, params, method=method)
        assert pe.method == method
        grads, losses, norms = pe.clipped_sum([ids, am], mask, 0.05)
        out[method] = ([g.asnumpy() for g in grads], norms.asnumpy())
    assert np.all(out["vmap"][1] > 0.05)  # clipping is active
    np.testing.assert_allclose(out["bookkeeping"][1], out["vmap"][1], rtol=2e-5)
    for a, b in zip(out["bookkeeping"][0], out["vmap"][0]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    # auto picks book-keeping here, also with the (tied) embeddings trained; vmap for a parameter
    # no rule covers
    assert PerExampleGradients(model, params).method == "bookkeeping"
    emb = [p for n, p in model.parameters_and_names() if n.endswith(("wte.weight", "wpe.weight"))]
    assert PerExampleGradients(model, params + emb).method == "bookkeeping"

    class Scaled(nn.Cell):
        def __init__(self):
            super().__init__()
            self.scale = ms.Parameter(Tensor(np.ones(D, np.float32)), name="scale")

        def construct(self, x, y):
            return (x * self.scale).sum((1, 2))

    assert PerExampleGradients(Scaled()).method == "vmap"
    with pytest.raises(ValueError, match="not covered: scale"):
        PerExampleGradients(Scaled(), method="bookkeeping")


@pytest.mark.parametrize("geometry", ["l2", "l1"])
def test_clipping_bounds_every_example_in_the_table_norm(geometry):
    x, y = _batch(seed=5, scale=3.0)
    net = Net(seed=4)
    refs = _single_grads(net, x, y)
    raw = np.array([_norm(r, geometry) for r in refs])
    clip = float(np.median(raw))  # half the examples are clipped
    pe = PerExampleGradients(net, geometry=geometry)
    for i in range(B):
        mask = np.zeros(B, np.float32)
        mask[i] = 1
        grads, _, _ = pe.clipped_sum([x, y], mask, clip)
        got = [g.asnumpy().astype(np.float64) for g in grads]
        n = _norm(got, geometry)
        assert n <= clip, (i, n, clip)
        if raw[i] > clip:
            assert n == pytest.approx(clip, rel=1e-3)
            # direction is kept: the clipped gradient is the scaled original
            for a, b in zip(got, refs[i]):
                np.testing.assert_allclose(a, b * (n / raw[i]), rtol=2e-3, atol=1e-6)
        else:
            assert n == pytest.approx(raw[i], rel=1e-3)


# ---------------------------------------------------------------------------------------------
# the optimizer wrapper
# ---------------------------------------------------------------------------------------------
def _mean_loss_grad(net, params):
    class Mean(nn.Cell):
        def __init__(self, inner):
            super().__init__(auto_prefix=False)
            self.inner = inner

        def construct(self, x, y):
            return self.inner(x, y).mean()

    return ms.value_and_grad(Mean(net), grad_position=None, weights=ms.ParameterTuple(params))


@pytest.mark.parametrize("opt_name", ["SGD", "Adam", "AdamWeightDecay"])
def test_noise_off_clip_off_equals_plain_optimizer(tables, opt_name):
    make = {"SGD": lambda p: nn.SGD(p, learning_rate=0.1, momentum=0.9),
            "Adam": lambda p: nn.Adam(p, learning_rate=0.05),
            "AdamWeightDecay": lambda p: nn.AdamWeightDecay(p, learning_rate=0.05, weight_decay=0.1)}
    batches = [_batch(seed=s) for s in (11, 12)]
    ref_net, dp_net = Net(seed=6), Net(seed=6)
    ref_opt = make[opt_name](ref_net.trainable_params())
    grad = _mean_loss_grad(ref_net, ref_net.trainable_params())
    for x, y in batches:
        _, g = grad(Tensor(x), Tensor(y))
        ref_opt(g)
    dp = DPOptimizer(make[opt_name](dp_net.trainable_params()), dp_net, tables["l2"],
                     max_grad_norm=math.inf, expected_batch_size=B, add_noise=False, seed=0)
    for x, y in batches:  # two micro-batches of two rows each make one logical batch of B
        dp.step([([x[:2], y[:2]], np.ones(2, np.float32)), ([x[2:], y[2:]], np.ones(2, np.float32))])
    changed = False
    for a, b, p0 in zip(dp_net.trainable_params(), ref_net.trainable_params(),
                        Net(seed=6).trainable_params()):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-5, atol=1e-6)
        changed |= not np.allclose(a.asnumpy(), p0.asnumpy())
    assert changed


class Wide(nn.Cell):
    """A model whose gradient is irrelevant here: all rows are padding, so the update is pure noise."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Dense(100, 200, weight_init="zeros", bias_init="zeros")

    def construct(self, x):
        return self.fc(x).sum(-1)


@pytest.mark.parametrize("geometry", ["l2", "l1"])
def test_noise_of_a_step_matches_the_table(tables, geometry):
    """SGD with lr 1 on an all-padding batch: theta_1 - theta_0 = -C Z / E; Z must follow the table."""
    table = tables[geometry]
    net = Wide()
    clip, expected = 2.0, 8.0
    dp = DPOptimizer(nn.SGD(net.trainable_params(), learning_rate=1.0), net, table,
                     max_grad_norm=clip, expected_batch_size=expected, seed=123)
    x = np.ones((4, 100), np.float32)
    stats_ = dp.step([([x], np.zeros(4, np.float32))])
    assert stats_.batch_size == 0
    z = np.concatenate([-p.asnumpy().reshape(-1) for p in net.trainable_params()]) * expected / clip
    assert z.size == 200 * 100 + 200
    var = table.noise.variance()
    assert np.var(z) == pytest.approx(var, rel=0.05)
    assert stats_.noise_std == pytest.approx(clip * math.sqrt(var))
    # float32 storage of the update rounds z at ~1e-7 relative: far below the KS resolution here
    assert stats.kstest(z, table.noise.cdf).pvalue > 1e-3
    # and a wrong law is detected by the same test
    assert stats.kstest(z * 1.1, table.noise.cdf).pvalue < 1e-3


def test_table_geometry_decides_the_clipping_norm_and_scalar_is_refused(tables):
    net = Net()
    opt = nn.SGD(net.trainable_params(), learning_rate=0.1)
    assert DPOptimizer(opt, net, tables["l2"], expected_batch_size=4).geometry == "l2"
    assert DPOptimizer(opt, net, tables["l1"], expected_batch_size=4).geometry == "l1"
    with pytest.raises(GeometryError, match="scalar certificate covers one real-valued query"):
        DPOptimizer(opt, net, tables["scalar"], expected_batch_size=4)


def test_secure_mode_uses_the_os_keyed_generator(tables):
    net = Wide()
    dp = DPOptimizer(nn.SGD(net.trainable_params(), learning_rate=1.0), net, tables["l2"],
                     max_grad_norm=1.0, expected_batch_size=1.0, secure=True)
    assert isinstance(dp.rng, SecureRandom)
    x = np.ones((4, 100), np.float32)
    dp.step([([x], np.zeros(4, np.float32))])
    first = net.fc.bias.asnumpy().copy()
    dp.step([([x], np.zeros(4, np.float32))])
    assert np.std(first) == pytest.approx(1.5, rel=0.25)
    assert not np.allclose(first, net.fc.bias.asnumpy())
    with pytest.raises(ValueError, match="cannot be seeded"):
        DPOptimizer(nn.SGD(net.trainable_params()), net, tables["l2"], expected_batch_size=1.0,
                    secure=True, seed=1)


def test_non_private_pipeline_uses_plain_summed_gradients(tables):
    x, y = _batch(seed=8)
    a, b = Net(seed=9), Net(seed=9)
    mask = np.array([1, 0, 1, 1], np.float32)
    g1, _, _ = SummedGradients(a).clipped_sum([x, y], mask)
    g2, _, _ = PerExampleGradients(b).clipped_sum([x, y], mask, math.inf)
    for u, v in zip(g1, g2):
        np.testing.assert_allclose(u.asnumpy(), v.asnumpy(), rtol=1e-5, atol=1e-6)
    dp = DPOptimizer(nn.SGD(a.trainable_params()), a, None, expected_batch_size=4, private=False)
    assert dp.noise_std == 0.0 and dp.method == "none"


# ---------------------------------------------------------------------------------------------
# Poisson sampling
# ---------------------------------------------------------------------------------------------
def test_poisson_inclusion_rate_and_nothing_dropped():
    n, q, steps = 500, 0.04, 300
    sampler = PoissonSampler(n, q, steps, seed=7)
    counts = np.zeros(n)
    sizes = []
    for idx in sampler:
        assert np.all(np.diff(idx) > 0)
        counts[idx] += 1
        sizes.append(len(idx))
        packed = micro_batches(idx, 8)
        assert all(m.indices.shape == (8,) for m in packed)
        real = np.concatenate([m.indices[m.mask > 0] for m in packed])
        np.testing.assert_array_equal(real, idx)  # every sampled example exactly once
        assert sum(m.n_real for m in packed) == len(idx)
    total = counts.sum()
    # binomial(n * steps, q): 5 standard deviations
    assert abs(total / (n * steps) - q) < 5 * math.sqrt(q * (1 - q) / (n * steps))
    assert np.var(sizes) > 0  # variable batch size
    # every example's own rate is q too (chi-square over examples)
    chi = ((counts - steps * q) ** 2 / (steps * q * (1 - q))).sum()
    assert stats.chi2.sf(chi, n - 1) > 1e-4
    empty = micro_batches(np.array([], np.int64), 8)
    assert len(empty) == 1 and empty[0].n_real == 0


def test_poisson_is_seeded_or_secure():
    a = [PoissonSampler(100, 0.3, 1, seed=1).sample() for _ in range(2)]
    np.testing.assert_array_equal(a[0], a[1])
    s = PoissonSampler(100, 0.3, 1, secure=True)
    assert isinstance(s.rng, SecureRandom)
    assert 5 < len(s.sample()) < 60


# ---------------------------------------------------------------------------------------------
# table matching and the privacy guard
# ---------------------------------------------------------------------------------------------
def test_mismatched_table_refused(tables):
    t = tables["l2"]
    assert check_table(t, dataset_size=100) == (0.25, 6)
    assert check_table(t, dataset_size=100, steps=3) == (0.25, 3)
    with pytest.raises(TableMismatchError, match="does not match the table's certified rate"):
        check_table(t, dataset_size=100, sampling_rate=0.3)
    with pytest.raises(TableMismatchError, match="certifies only 6 steps"):
        check_table(t, dataset_size=100, steps=7)
    with pytest.raises(TableMismatchError, match="below one example"):
        check_table(t, dataset_size=3)


def test_guard_stops_before_the_budget(tables):
    """The one guard (ReleaseGuard, as make_private builds it for a table) stops before step T + 1,
    and a smaller budget (a table whose claim is below the run's certificate) stops earlier."""
    table = tables["l2"]
    guard = ReleaseGuard.for_table(table, dataset_size=40)
    assert guard.limit == 6 and guard.expected_batch_size == 10
    net = Wide()
    dp = DPOptimizer(nn.SGD(net.trainable_params(), learning_rate=0.1), net, table,
                     expected_batch_size=guard.expected_batch_size, seed=0, guard=guard)
    x = np.ones((2, 100), np.float32)
    for _ in range(6):
        dp.step([([x], np.zeros(2, np.float32))])
    before = net.fc.bias.asnumpy().copy()
    with pytest.raises(PrivacyBudgetExceeded, match="stopping before step 7"):
        dp.step([([x], np.zeros(2, np.float32))])
    np.testing.assert_array_equal(before, net.fc.bias.asnumpy())  # no update leaked
    assert guard.ledger.steps == 6
    assert guard.epsilon_spent() <= table.certified_epsilon * (1 + 1e-9)
    # a smaller budget stops earlier, before exceeding it
    g2 = ReleaseGuard(guard.release, sampling="poisson", relation=guard.relation, steps=6,
                      steps_in_epoch=None, delta=table.delta, budget=guard.budget,
                      expected_batch_size=10, cap=0.6 * table.certified_epsilon)
    assert 0 < g2.limit < 6
    for _ in range(g2.limit):
        g2.record_step()
    assert g2.epsilon_spent() <= 0.6 * table.certified_epsilon * (1 + 1e-9)
    assert g2.epsilon_spent() == pytest.approx(PrivacyLedger.from_json(g2.ledger.to_json()).epsilon())
    assert PrivacyLedger(table.delta).epsilon_after(g2.limit + 1, guard.release) > 0.6 * table.certified_epsilon
    assert g2.stop_reason() is not None and "would be exceeded" in g2.stop_reason()
    with pytest.raises(PrivacyBudgetExceeded):
        g2.check_next()


def test_readme_example_in_docs_runs(tmp_path):
    """The drop-in example of docs/finetune.md runs as written in an empty directory (as a script
    file: graph mode reads a Cell's source) and prints an epsilon within the table's certificate."""
    import pathlib
    import re
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    code = re.search(r"```python\n(.*?)```", (root / "docs" / "finetune.md").read_text(), re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=str(root))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path,
                       env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    found = re.search(r"epsilon spent ([0-9.]+) \(delta ([0-9.e-]+)\)", r.stdout)
    assert found, r.stdout
    eps, delta = float(found.group(1)), float(found.group(2))
    assert 0 < eps <= 1.0 and delta == 1e-5      # 40 steps of a table certified at epsilon 1
    assert (tmp_path / "gaussian.npz").is_file()

