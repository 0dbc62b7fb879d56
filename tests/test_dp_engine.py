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

ms = pytest.importorskip("mindspore")
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
