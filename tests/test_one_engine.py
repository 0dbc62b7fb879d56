"""One training engine under every path: the CLI and a make_private script give the same run,
checkpoints cross between them, a shuffled pipeline is refused everywhere, and make_private is the
front door (random-access sources, save/resume, cheap epsilon, secure default, logging)."""
import json
import logging
import threading
import time
import warnings

import numpy as np
import pytest

import mindspore as ms
from mindspore import nn

from accountant.certify import certify
from accountant.ledger import PrivacyLedger
from accountant.mechanism import Mechanism
from accountant.noise import Gaussian
from accountant.randomness import KnownSeedWarning, SecureRandom
from accountant.table import load_table, write_certified_table
from finetune import make_private
from finetune.data import generate_records, write_jsonl
from finetune.engine import EngineConfigError
from helpers import Clf

STEPS, Q, DELTA = 4, 0.1, 1e-5
ARGS = ("--seq-len", "24", "--micro-batch", "8", "--method", "lora", "--quiet", "--seed", "0")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("one_engine")
    write_jsonl(generate_records(120, seed=0), d / "data.jsonl")
    cert = certify(Mechanism(Gaussian(1.0), 1.0, "l2", Q, STEPS), DELTA)
    write_certified_table(d / "t.npz", Gaussian(1.0), eps_target=cert.epsilon, delta=DELTA,
                          sampling_rate=Q, steps=STEPS, geometry="l2", certificate=cert,
                          gaussian_sigma=1.0)
    return d


def _argv(files, out):
    return ["--table", str(files / "t.npz"), "--model", "tiny", "--data", str(files / "data.jsonl"),
            "--out", str(out), *ARGS]


def _cli(argv, stop_after=None):
    """``python -m finetune`` in this process; ``stop_after=k`` interrupts it after k steps as a
    signal would (the loop checks the event after every step)."""
    from finetune import __main__ as cli

    if stop_after is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", KnownSeedWarning)
            return cli.main(argv)

    class Event(threading.Event):
        left = stop_after

        def rearm(self):
            Event.left -= 1
            if Event.left == 0:
                self.set()

    class Stopper:
        event, exit_code = Event(), 130

    args = cli._parser().parse_args(argv)
    with warnings.catch_warnings(), pytest.raises(cli.Interrupted, match=f"after {stop_after} steps"):
        warnings.simplefilter("ignore", KnownSeedWarning)
        cli.run(args, cli._given_flags(argv), Stopper())


def _script_model_and_data(files):
    """What the CLI builds for ``ARGS``: tiny GPT-2 (init seed 0), the corpus split, LoRA on c_attn."""
    from finetune.data import load_dataset
    from finetune.models import checkpoint, peft
    from finetune.models.tokenizer import load_tokenizer

    model = checkpoint.from_pretrained("tiny", seed=0)
    data = load_dataset(files / "data.jsonl", load_tokenizer(model.config.vocab_size), seq_len=24,
                        val_fraction=None, seed=0)
    peft.apply_lora(model, r=8, alpha=16.0, targets=("c_attn",), seed=0)
    return model, data


def _script_engine(files, **kw):
    model, data = _script_model_and_data(files)
    opt = nn.Adam(list(model.trainable_params()), learning_rate=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KnownSeedWarning)
        engine = make_private(model, opt, dataset_size=len(data.train.ids),
                              noise=load_table(files / "t.npz"), seed=0, micro_batch_size=8, **kw)
    return model, data, engine


def _adapter(model):
    from finetune.models.peft import is_adapter_name

    return {n: p.asnumpy() for n, p in model.parameters_and_names() if is_adapter_name(n)}


def _saved_adapter(out):
    from safetensors.numpy import load_file

    return load_file(str(out / "adapter.safetensors"))


def _assert_same_weights(saved, model):
    mine = _adapter(model)
    assert len(saved) == len(mine) > 0
    for name, value in mine.items():
        key = next(k for k in saved if k.endswith(name) or name.endswith(k))
        np.testing.assert_array_equal(saved[key], value, err_msg=name)


@pytest.fixture(scope="module")
def reference(files):
    out = files / "reference"
    ms.set_context(mode=ms.GRAPH_MODE)
    assert _cli(_argv(files, out)) == 0
    return out


def test_cli_and_a_make_private_script_end_bit_identical(files, reference):
    ms.set_context(mode=ms.GRAPH_MODE)
    model, data, engine = _script_engine(files)
    for batch in engine.batches(data.train.ids, data.train.mask):
        engine.step(batch)
    _assert_same_weights(_saved_adapter(reference), model)
    cli_ledger = json.loads((reference / "ledger.json").read_text())
    mine = json.loads(engine.guard.ledger.to_json())
    assert cli_ledger["entries"] == mine["entries"] and sum(e["count"] for e in mine["entries"]) == STEPS
    assert cli_ledger["epsilon_spent"] == mine["epsilon_spent"] == engine.epsilon()


def test_resume_crosses_between_the_cli_and_make_private(files, reference, tmp_path):
    """CLI interrupted after 1 step -> make_private(resume=) takes 1 step and saves -> CLI --resume
    finishes: the weights and the ledger equal the uninterrupted CLI run."""
    from finetune import checkpointing
    from finetune.run_dir import CHECKPOINT_NAME, staging_path

    ms.set_context(mode=ms.GRAPH_MODE)
    out = tmp_path / "run"
    _cli(_argv(files, out), stop_after=1)
    ckpt = staging_path(out) / CHECKPOINT_NAME
    model, data, engine = _script_engine(files, resume=ckpt)
    assert engine.guard.steps_taken == 1 and engine.guard.ledger.steps == 1
    batches = engine.batches(data.train.ids, data.train.mask)
    engine.step(next(batches))
    with pytest.raises(EngineConfigError, match="exists"):
        engine.save(ckpt)                                    # never a silent overwrite
    engine.save(ckpt, extra={"run": engine.checkpoint_state["run"]}, overwrite=True)
    assert checkpointing.load_checkpoint(ckpt)[1]["engine"]["guard"]["steps_taken"] == 2
    ms.set_context(mode=ms.GRAPH_MODE)
    assert _cli(["--resume", str(out), "--quiet"]) == 0
    mine, ref = _saved_adapter(out), _saved_adapter(reference)
    assert set(mine) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(mine[k], ref[k], err_msg=k)
    assert (json.loads((out / "ledger.json").read_text())["entries"]
            == json.loads((reference / "ledger.json").read_text())["entries"])

    # and the CLI's checkpoint read by a script ends where the CLI ends
    out2 = tmp_path / "run2"
    _cli(_argv(files, out2), stop_after=2)
    model, data, engine = _script_engine(files, resume=staging_path(out2) / CHECKPOINT_NAME)
    for batch in engine.batches(data.train.ids, data.train.mask):
        engine.step(batch)
    _assert_same_weights(_saved_adapter(reference), model)


def test_resume_refuses_another_configuration(files, tmp_path):
    from finetune.engine import CheckpointMismatch

    net, engine = _clf_engine(steps=3)
    x, y = _clf_data()
    engine.step(next(engine.batches(x, y)))
    engine.save(tmp_path / "c.safetensors")
    with pytest.raises(CheckpointMismatch, match="another run"):
        _clf_engine(steps=3, noise_multiplier=2.0, resume=tmp_path / "c.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatch):
        _clf_engine(steps=3, resume=tmp_path / "junk.safetensors")


# ---------------------------------------------------------------------------------------------
# a shuffled, batched pipeline is refused on every documented path
# ---------------------------------------------------------------------------------------------
def test_a_shuffle_batch_pipeline_is_refused_on_every_path(files):
    import mindspore.dataset as mds
    from mindspore.train import Model

    from finetune.dp.release_guard import SamplingMismatch
    from finetune.federated.client import OrganisationClient, build_model
    from finetune.train import train

    x, y = _clf_data()
    pipeline = mds.NumpySlicesDataset({"x": x, "y": y}, shuffle=True).shuffle(64).batch(16)
    _, engine = _clf_engine(steps=2)
    with pytest.raises(EngineConfigError, match="mindspore.dataset pipeline"):
        engine.batches(pipeline)
    with pytest.raises(EngineConfigError, match="mindspore.dataset pipeline"):
        engine.dataset(pipeline)
    with pytest.raises(SamplingMismatch, match="engine.dataset"):
        Model(engine.train_network()).train(1, pipeline, callbacks=[engine.callback()],
                                            dataset_sink_mode=False)
    assert engine.guard.steps_taken == 0
    ids = np.zeros((40, 8), np.int32)
    tokens = mds.NumpySlicesDataset({"ids": ids}, shuffle=True).batch(8)
    with pytest.raises(EngineConfigError, match="mindspore.dataset pipeline"):
        train(None, tokens, None, table=load_table(files / "t.npz"), progress=False)
    with pytest.raises(EngineConfigError, match="mindspore.dataset pipeline"):
        OrganisationClient(build_model("tiny", "lora", 0), tokens, None, local_steps=1,
                           record_table=load_table(files / "t.npz"))


# ---------------------------------------------------------------------------------------------
# make_private as the front door (a small classifier)
# ---------------------------------------------------------------------------------------------
N = 200


def _clf_data():
    rs = np.random.RandomState(0)
    x = rs.randn(N, 4).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int32)


def _clf_engine(seed=0, **kw):
    net = Clf()
    opts = dict(dataset_size=N, batch_size=50, noise_multiplier=1.0, target_delta=DELTA, seed=seed,
                micro_batch_size=16)
    opts.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KnownSeedWarning)
        return net, make_private(net, nn.SGD(net.trainable_params(), learning_rate=0.5), **opts)


def _w(net):
    return np.concatenate([p.asnumpy().ravel() for p in net.trainable_params()])


class RowSource:
    """A random-access source as a GeneratorDataset would take it: rows fetched one at a time."""

    def __init__(self, x, y):
        self.x, self.y, self.fetched = x, y, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.fetched += 1
        return self.x[i], self.y[i]


def test_a_random_access_source_trains_like_the_arrays():
    x, y = _clf_data()
    net_a, a = _clf_engine(steps=3)
    for batch in a.batches(x, y):
        a.step(batch)
    source = RowSource(x, y)
    net_b, b = _clf_engine(steps=3)
    for batch in b.batches(source):
        b.step(batch)
    assert 0 < source.fetched <= 3 * N
    np.testing.assert_array_equal(_w(net_a), _w(net_b))
    with pytest.raises(EngineConfigError, match="rows"):
        _clf_engine(steps=3)[1].batches(RowSource(x[:10], y[:10]))


def test_save_and_resume_a_seeded_run_bit_identically(tmp_path):
    x, y = _clf_data()
    full_net, full = _clf_engine(steps=4)
    for batch in full.batches(x, y):
        full.step(batch)
    net, first = _clf_engine(steps=4)
    batches = first.batches(x, y)
    for _ in range(2):
        first.step(next(batches))
    first.save(tmp_path / "run.safetensors")
    resumed_net, resumed = _clf_engine(steps=4, resume=tmp_path / "run.safetensors")
    assert resumed.guard.steps_taken == 2
    for batch in resumed.batches(x, y):
        resumed.step(batch)
    np.testing.assert_array_equal(_w(resumed_net), _w(full_net))
    assert resumed.guard.ledger.to_json() == full.guard.ledger.to_json()


def test_secure_by_default_and_a_secure_resume_is_rekeyed(tmp_path):
    from finetune import checkpointing

    x, y = _clf_data()
    with warnings.catch_warnings():
        warnings.simplefilter("error", KnownSeedWarning)
        net, engine = _clf_engine(seed=None, steps=3)
    assert isinstance(engine.sampler.rng, SecureRandom) and isinstance(engine.optimizer.rng, SecureRandom)
    assert engine.sampler.rng is not engine.optimizer.rng
    engine.step(next(engine.batches(x, y)))
    engine.save(tmp_path / "s.safetensors")
    _, state = checkpointing.load_checkpoint(tmp_path / "s.safetensors")
    assert state["engine"]["sample_rng"] is None and state["engine"]["noise_rng"] is None
    assert "bit_generator" not in json.dumps(state)          # no generator state at all
    seeded_net, seeded = _clf_engine(steps=3)
    seeded.save(tmp_path / "p.safetensors")
    assert "bit_generator" in json.dumps(checkpointing.load_checkpoint(tmp_path / "p.safetensors")[1])
    _, again = _clf_engine(seed=None, steps=3, resume=tmp_path / "s.safetensors")
    assert again.optimizer.secure_rekeys == 1 and again.guard.steps_taken == 1
    net = Clf()
    with pytest.warns(KnownSeedWarning):
        make_private(net, nn.SGD(net.trainable_params(), 0.1), dataset_size=N, batch_size=50,
                     steps=2, noise_multiplier=1.0, target_delta=DELTA, seed=3)


def test_epsilon_is_cheap_every_step_and_never_below_the_ledger():
    x, y = _clf_data()
    _, engine = _clf_engine(steps=6)
    assert engine.epsilon() == 0.0
    for batch in engine.batches(x, y):
        engine.step(batch)
        t0 = time.perf_counter()
        values = [engine.epsilon() for _ in range(200)]
        assert (time.perf_counter() - t0) / 200 < 5e-3       # a dict lookup, not a certificate
        exact = engine.epsilon(exact=True)
        assert exact == pytest.approx(PrivacyLedger.from_json(engine.guard.ledger.to_json()).epsilon())
        assert min(values) >= exact * (1 - 1e-9)
    assert engine.epsilon() == engine.certificate.epsilon


def test_make_private_logs_one_info_line_and_prints_nothing(capsys, caplog):
    with caplog.at_level(logging.INFO, logger="finetune.engine"):
        _clf_engine(steps=2)
    assert capsys.readouterr().out == ""
    lines = [r for r in caplog.records if r.name == "finetune.engine" and r.levelno == logging.INFO]
    assert len(lines) == 1 and "\n" not in lines[0].getMessage()
    assert "epsilon" in lines[0].getMessage()
