"""Data-parallel DP fine-tuning (finetune.dp.distributed).

Fast tests check the pieces in one process (exact transport encoding, sharding, shared generators).
The slow test launches 2 CPU workers with ``msrun`` on a tiny GPT-2 and checks that both ranks end
with identical weights, that the 2-worker run equals a 1-process run on the same global batches
(noise seed fixed), and that one step's noise variance is the table's, not halved.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from finetune.dp import distributed as dist_mod  # noqa: E402
from finetune.dp.distributed import Distributed  # noqa: E402

ROOT = Path(dist_mod.__file__).resolve().parents[1]


# ------------------------------------------------------------------------------- fast, 1 process
def test_exact_transport_encoding_round_trips_every_bit_pattern():
    rng = np.random.default_rng(0)
    world = 3
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 5e-324, 1.7976931348623157e308, 1 / 3])
    rows = [np.concatenate([special, rng.normal(size=50) * 10.0 ** rng.integers(-300, 300, 50)])
            for _ in range(world)]
    rows[1][3] = np.float64(-1e-310)  # subnormal
    words = [r.view(np.uint64) for r in rows]
    # what an all-reduce of every rank's buffer returns
    summed = sum(Distributed._encode(w, r, world) for r, w in enumerate(words))
    got = Distributed._decode(summed, world)
    for r in range(world):
        assert got[r].tobytes() == words[r].tobytes()


def test_single_process_collectives_are_identity_and_shard_covers_batch():
    d = Distributed(0, 1)
    x = np.array([1.5, -2.0, 3.25])
    np.testing.assert_array_equal(d.allreduce_sum_f64(x), x)
    assert d.broadcast_bytes(b"12345678", 8) == b"12345678"
    d.check_same("anything", b"x")
    idx = np.array([3, 8, 9, 20, 31])
    parts = [dist_mod.shard(idx, Distributed(r, 2)) for r in range(2)]
    assert sorted(np.concatenate(parts).tolist()) == idx.tolist()
    assert parts[0].tolist() == [3, 9, 31] and parts[1].tolist() == [8, 20]
    with pytest.raises(dist_mod.DistributedError):
        Distributed(2, 2)


def test_shared_generators():
    d = Distributed(0, 1)
    a, b = d.shared_rng(seed=5), d.shared_rng(seed=5)
    assert (a.bit_generator.random_raw(4) == b.bit_generator.random_raw(4)).all()
    with pytest.raises(ValueError, match="needs a seed"):
        d.shared_rng()
    with pytest.raises(ValueError, match="cannot be seeded"):
        d.shared_rng(seed=1, secure=True)
    s1 = dist_mod.SharedSecureRandom(b"k" * 32, b"n" * 16)
    s2 = dist_mod.SharedSecureRandom(b"k" * 32, b"n" * 16)
    w = s1.random_raw(1000)
    assert (w == s2.random_raw(1000)).all() and w.dtype == np.uint64
    assert 0.45 < float((w >> np.uint64(63)).mean()) < 0.55
    sec = d.shared_rng(secure=True)  # keyed from os.urandom: differs between calls
    assert not (sec.random_raw(4) == d.shared_rng(secure=True).random_raw(4)).all()


def test_reduce_sum_hook_sums_before_the_noise_is_added_once():
    """DPOptimizer(reduce_sum=...) with a stand-in "two identical workers" reduction (2 x): the
    update is (2 S + C Z) / E[B] -- the noise once, after the reduction, not 2 C Z -- and the step
    statistics are the reduced ones."""
    import mindspore as ms
    from mindspore import Tensor, nn

    from accountant.noise import Gaussian
    from finetune.dp.optimizer import DPOptimizer

    ms.set_context(mode=ms.GRAPH_MODE)
    rs = np.random.RandomState(0)
    w0, b0 = rs.randn(3, 8).astype(np.float32), rs.randn(3).astype(np.float32)
    x = rs.randn(6, 8).astype(np.float32)
    mask = np.array([1, 1, 1, 1, 1, 0], np.float32)  # the last row is padding: not counted

    class Net(nn.Cell):
        def __init__(self):
            super().__init__()
            self.fc = nn.Dense(8, 3, weight_init=Tensor(w0), bias_init=Tensor(b0))

        def construct(self, x):
            return (self.fc(x) ** 2).sum(-1)  # per-example loss [B]

    class Table:
        geometry = "l2"
        noise = Gaussian(0.8)

    def delta(reduce_sum, add_noise=True):
        net = Net()
        params = net.trainable_params()
        dp = DPOptimizer(nn.SGD(params, learning_rate=1.0), net, Table(), max_grad_norm=0.5,
                         expected_batch_size=4.0, seed=9, reduce_sum=reduce_sum,
                         add_noise=add_noise, per_example="vmap")
        stats = dp.step([([x], mask)])
        now = np.concatenate([p.asnumpy().ravel() for p in params]).astype(np.float64)
        return np.concatenate([w0.ravel(), b0]).astype(np.float64) - now, stats

    seen = []
    d1, s1 = delta(None)
    d2, s2 = delta(lambda v: seen.append(v.size) or 2.0 * v)
    clean, _ = delta(None, add_noise=False)  # lr * S / E[B]
    assert seen == [d1.size + 3]               # clipped sum + (loss sum, count, clipped count)
    assert s1.batch_size == 5 and s2.batch_size == 10
    assert s2.loss == pytest.approx(s1.loss) and s2.clipped_fraction == s1.clipped_fraction
    assert np.abs(clean).max() > 1e-2
    np.testing.assert_allclose(d2 - d1, clean, atol=1e-6)  # one extra S, no extra noise
    assert np.abs(d1 - clean).max() > 1e-2                  # and the noise is really there
    with pytest.raises(TypeError, match="reduce_sum"):
        DPOptimizer(nn.SGD(Net().trainable_params()), Net(), None, private=False,
                    expected_batch_size=1.0, reduce_sum=3)


# ------------------------------------------------------------------------------- slow, msrun
WORKER = r'''
"""Worker for the data-parallel DP test: run under msrun (N workers) or plainly (1 process)."""
import json, sys
import numpy as np
import mindspore as ms
from mindspore import nn
from accountant.noise import Gaussian
from finetune.dp.distributed import Distributed, DistributedDPOptimizer, shard
from finetune.train import train_distributed
from finetune.models.gpt2 import GPT2Config, GPT2LMHeadModel
from finetune.models.peft import apply_lora
from finetune.dp.sampling import PoissonSampler, micro_batches

out = sys.argv[1]
ms.set_context(mode=ms.GRAPH_MODE)
dist = Distributed.from_env()
cfg = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=61, n_positions=24)


class Table:  # stand-in exposing what DPOptimizer reads: the noise law and the geometry
    geometry = "l2"

    def __init__(self, sigma):
        self.noise = Gaussian(sigma)


rng = np.random.default_rng(0)
N, T = 64, 12
ids = rng.integers(0, cfg.vocab_size, (N, T)).astype(np.int32)
mask = np.ones((N, T), np.float32)
mask[::3, 8:] = 0.0
q, steps, C = 0.25, 3, 0.5

# A: three DP-LoRA steps (book-keeping) with the noise seed fixed
model = GPT2LMHeadModel(cfg, seed=1)
apply_lora(model, r=4, alpha=8, targets=("c_attn", "c_fc"))
opt = nn.SGD(model.trainable_params(), learning_rate=0.5)
dp = DistributedDPOptimizer(opt, model, Table(0.7), dist=dist, seed=123, max_grad_norm=C,
                            expected_batch_size=q * N, per_example="auto")
sampler = PoissonSampler(N, q, steps, rng=dp.rng)
sizes = []
for idx in sampler:
    mine = shard(idx, dist)
    sizes.append([int(len(idx)), int(len(mine))])
    stats = dp.step([([ids[m.indices], mask[m.indices]], m.mask) for m in micro_batches(mine, 4)])
dist.assert_in_sync(model.get_parameters())
res = {"world": dist.world_size, "sizes": sizes, "batch": stats.batch_size, "loss": stats.loss}

# B: one noise-only step on all weights: update = -lr * C * Z / E[B]
model2 = GPT2LMHeadModel(cfg, seed=2)
flat = lambda m: np.concatenate([p.asnumpy().ravel() for p in m.trainable_params()]).astype(np.float64)
before = flat(model2)
sigma, C2, eb = 1.3, 2.0, 5.0
opt2 = nn.SGD(model2.trainable_params(), learning_rate=1.0)
dp2 = DistributedDPOptimizer(opt2, model2, Table(sigma), dist=dist, seed=7, max_grad_norm=C2,
                             expected_batch_size=eb, per_example="vmap")
dp2.step([])
z = (before - flat(model2)) * eb / C2
res["noise_var_ratio"] = float(z.var() / sigma ** 2)
res["noise_n"] = int(z.size)
dist.assert_in_sync(model2.get_parameters())

# B2: the same in secure mode: ChaCha20 keyed by rank 0's os.urandom, shared with the workers
model5 = GPT2LMHeadModel(cfg, seed=2)
opt5 = nn.SGD(model5.trainable_params(), learning_rate=1.0)
dp5 = DistributedDPOptimizer(opt5, model5, Table(sigma), dist=dist, secure=True, max_grad_norm=C2,
                             expected_batch_size=eb, per_example="vmap")
dp5.step([])
z5 = (before - flat(model5)) * eb / C2
res["secure_var_ratio"] = float(z5.var() / sigma ** 2)
dist.assert_in_sync(model5.get_parameters())

# C: the whole loop, non-private (no table needed)
model3 = GPT2LMHeadModel(cfg, seed=3)
apply_lora(model3, r=2, alpha=4)
r3 = train_distributed(model3, ids, mask, private=False, sampling_rate=q, steps=2, lr=0.01,
                       micro_batch_size=4, seed=11, progress=False, dist=dist, check_sync_every=1)
res["loop_steps"] = r3.metrics["steps"]
res["loop_workers"] = r3.metrics["workers"]

# D: the whole loop with a certified table: ledger charged at the global rate, same on every rank
from accountant.table import load_table
model4 = GPT2LMHeadModel(cfg, seed=4)
apply_lora(model4, r=2, alpha=4)
r4 = train_distributed(model4, ids, mask, table=load_table(sys.argv[2]), lr=0.01,
                       micro_batch_size=4, seed=5, progress=False, dist=dist)
res["dp_steps"] = r4.metrics["steps"]
res["dp_epsilon"] = r4.metrics["epsilon_spent"]
res["dp_rate"] = r4.metrics["sampling_rate"]

np.savez(f"{out}/rank{dist.rank}_of{dist.world_size}.npz",
         **{"A." + n: p.asnumpy() for n, p in model.parameters_and_names()},
         **{"C." + n: p.asnumpy() for n, p in model3.parameters_and_names()},
         **{"D." + n: p.asnumpy() for n, p in model4.parameters_and_names()}, _z=z, _z5=z5)
with open(f"{out}/rank{dist.rank}_of{dist.world_size}.json", "w") as f:
    json.dump(res, f)
'''


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow
def test_two_msrun_workers_match_one_process_and_add_noise_once(tmp_path):
    msrun = shutil.which("msrun", path=_env()["PATH"])
    if msrun is None:
        pytest.skip("msrun not found")
    from accountant.certify import calibrate
    from accountant.noise import Gaussian
    from accountant.table import write_certified_table

    q, steps = 0.25, 3
    sigma, _ = calibrate(lambda s: Gaussian(s), 2.0, 1e-5, q, steps, geometry="l2")
    table = tmp_path / "g.npz"
    write_certified_table(table, Gaussian(sigma), eps_target=2.0, delta=1e-5, sampling_rate=q,
                          steps=steps, geometry="l2", family="gaussian", params={"sigma": sigma})
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    out = tmp_path / "out"
    out.mkdir()
    one = subprocess.run([sys.executable, str(script), str(out), str(table)], env=_env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([msrun, "--worker_num=2", "--local_worker_num=2",
                          f"--master_port={_free_port()}", f"--log_dir={tmp_path / 'log'}",
                          "--join=True", str(script), str(out), str(table)],
                         env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    logs = "".join(p.read_text(errors="replace")[-2000:] for p in (tmp_path / "log").glob("worker_*.log"))
    assert two.returncode == 0, logs

    r1 = json.loads((out / "rank0_of1.json").read_text())
    ra = [json.loads((out / f"rank{r}_of2.json").read_text()) for r in range(2)]
    assert all(r["world"] == 2 for r in ra) and r1["world"] == 1
    # the same global Poisson batches, split between the ranks without loss or overlap
    for s1, s0, s_1 in zip(r1["sizes"], ra[0]["sizes"], ra[1]["sizes"]):
        assert s1[0] == s0[0] == s_1[0] == s1[1] == s0[1] + s_1[1]
    assert ra[0]["batch"] == ra[1]["batch"] == r1["batch"]
    assert ra[0]["loop_steps"] == 2 and ra[0]["loop_workers"] == 2
    # certified run: all table steps taken, the global rate charged, the same epsilon everywhere
    assert r1["dp_steps"] == ra[0]["dp_steps"] == ra[1]["dp_steps"] == steps
    assert r1["dp_rate"] == ra[0]["dp_rate"] == q
    assert 0 < ra[0]["dp_epsilon"] == ra[1]["dp_epsilon"] == r1["dp_epsilon"] <= 2.0

    p1 = np.load(out / "rank0_of1.npz")
    pa = [np.load(out / f"rank{r}_of2.npz") for r in range(2)]
    keys = [k for k in p1.files if not k.startswith("_")]
    assert any("lora_B" in k for k in keys)
    for k in keys:
        np.testing.assert_array_equal(pa[0][k], pa[1][k])            # replicas identical
        np.testing.assert_allclose(pa[0][k], p1[k], atol=1e-6, rtol=1e-5)  # = 1-process run
    moved = [k for k in keys if k.startswith("A.") and "lora_B" in k]
    assert all(np.abs(p1[k]).max() > 1e-3 for k in moved)          # training did happen

    # noise: identical draw on both ranks, the 1-process draw, and the table's variance (not 1/2)
    np.testing.assert_array_equal(pa[0]["_z"], pa[1]["_z"])
    np.testing.assert_allclose(pa[0]["_z"], p1["_z"], rtol=1e-6, atol=1e-6)
    n = ra[0]["noise_n"]
    assert n > 5000
    assert abs(ra[0]["noise_var_ratio"] - 1.0) < 5 * np.sqrt(2.0 / n)
    # secure mode: one shared draw on both ranks, fresh per launch, with the table's variance
    np.testing.assert_array_equal(pa[0]["_z5"], pa[1]["_z5"])
    assert not np.allclose(pa[0]["_z5"], p1["_z5"])
    assert abs(ra[0]["secure_var_ratio"] - 1.0) < 5 * np.sqrt(2.0 / n)


@pytest.mark.slow
def test_cli_under_msrun_releases_once_and_matches_one_process(tmp_path):
    """``msrun --worker_num=2 ... python -m finetune ...`` (the documented command) trains ONE model:
    one set of outputs (rank 0), the ledger charged at the global rate with the epsilon of a
    1-process run of the same steps, and the final adapter of that 1-process run."""
    msrun = shutil.which("msrun", path=_env()["PATH"])
    if msrun is None:
        pytest.skip("msrun not found")
    from safetensors.numpy import load_file

    from accountant.certify import certify
    from accountant.ledger import PrivacyLedger
    from accountant.mechanism import Mechanism
    from accountant.noise import Gaussian
    from accountant.table import write_certified_table
    from finetune.data import generate_records, write_jsonl

    q, steps, sigma = 0.1, 4, 1.0
    noise = Gaussian(sigma)
    cert = certify(Mechanism(noise, 1.0, "l2", q, steps), 1e-5)
    write_certified_table(tmp_path / "g.npz", noise, eps_target=cert.epsilon, delta=1e-5,
                          sampling_rate=q, steps=steps, geometry="l2", certificate=cert,
                          gaussian_sigma=sigma)
    write_jsonl(generate_records(120, seed=0), tmp_path / "data.jsonl")
    flags = ["--table", "g.npz", "--method", "lora", "--model", "tiny", "--data", "data.jsonl",
             "--seq-len", "24", "--micro-batch", "8", "--lr", "0.01", "--seed", "3", "--quiet",
             "--log-private-stats"]

    one = subprocess.run([sys.executable, "-m", "finetune", *flags, "--out", "one"], env=_env(),
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([msrun, "--worker_num=2", "--local_worker_num=2",
                          f"--master_port={_free_port()}", "--log_dir=log", "--join=True",
                          "python", "-m", "finetune", *flags, "--out", "two"],
                         env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    logs = {p.name: p.read_text(errors="replace") for p in (tmp_path / "log").glob("*.log")}
    assert two.returncode == 0, "".join(t[-2000:] for t in logs.values())

    # exactly one set of outputs: rank 0 writes, rank 1 and the scheduler do not
    assert sorted(logs) == ["scheduler.log", "worker_0.log", "worker_1.log"]
    wrote = [name for name, text in logs.items() if "; wrote two" in text]
    assert wrote == ["worker_0.log"]
    assert "rank 0 writes the outputs" in logs["worker_1.log"]
    assert "steps, epsilon" not in logs["scheduler.log"]  # the scheduler trained nothing
    # the same files as one process writes (the last training checkpoint included)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()) == \
        ["adapter.safetensors", "checkpoint.safetensors", "ledger.json", "metrics.json"]
    assert not (tmp_path / "log" / "two").exists()

    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    l1 = PrivacyLedger.from_json((tmp_path / "one" / "ledger.json").read_text())
    l2 = PrivacyLedger.from_json((tmp_path / "two" / "ledger.json").read_text())
    assert m1["workers"] == 1 and m2["workers"] == 2
    assert m1["steps"] == m2["steps"] == l2.steps == steps
    # the ledger charges the table's (global) rate q, exactly as one process does
    assert m2["sampling_rate"] == q
    entries = json.loads((tmp_path / "two" / "ledger.json").read_text())["entries"]
    assert {e["mechanism"]["sampling_rate"] for e in entries} == {q}
    assert m2["epsilon_spent"] == l1.epsilon() == l2.epsilon() > 0
    assert m2["mean_batch_size"] == m1["mean_batch_size"]  # the same global Poisson batches

    a1 = load_file(str(tmp_path / "one" / "adapter.safetensors"))
    a2 = load_file(str(tmp_path / "two" / "adapter.safetensors"))
    assert sorted(a1) == sorted(a2) and any(k.endswith("lora_B") for k in a1)
    assert all(np.abs(a1[k]).max() > 1e-3 for k in a1 if k.endswith("lora_B"))  # it trained
    for k in a1:
        np.testing.assert_allclose(a2[k], a1[k], rtol=1e-5, atol=1e-6, err_msg=k)
