"""Cost of differential privacy in finetune, measured side by side in one run.

    python benchmarks/finetune_bench.py [--steps 20] [--gpt2-small] [--no-memory]

1. Tiny GPT-2 (2 layers, width 128, vocabulary 5000, sequence 64, batch 16), one optimizer step:
   DP-BiTFiT vs non-private BiTFiT and DP-LoRA vs non-private LoRA.  Step times are medians over
   ``--steps`` steps after compilation, with the configurations interleaved round by round in one
   process so machine load affects all alike.  Two non-private baselines: the same pipeline with DP
   switched off (``--no-dp``: plain summed gradient, no clipping, no noise) and a fused MindSpore
   train step (gradient and optimizer update in one compiled graph), the usual non-private loop.
   The DP steps use book-keeping (the automatic choice) and, for reference, vmap.
2. Noise for 1e7 coordinates: exact float64 draws from a table (Gaussian law; a tabulated law
   through the compiled inverse-CDF lookup; the secure ChaCha20 source) vs MindSpore's
   ``ops.standard_normal`` (float32).
3. Peak resident memory of each training configuration, each measured in its own subprocess.
4. ``--gpt2-small``: GPT-2 small (124M, random init, sequence 64, batch 8), DP-LoRA (book-keeping)
   vs non-private LoRA: step time after compilation and peak memory, one subprocess each.
5. ``--checkpoint`` (only this section): the cost of one training checkpoint
   (``finetune.checkpointing``: trained weights, optimizer state, ledger and generator state in one
   checksummed safetensors file, written atomically with fsync) and of loading it back, for the
   tiny model and GPT-2 small, per method (``--checkpoint-methods``), next to the default interval
   (5 minutes).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TINY = dict(preset="tiny", seq=64, batch=16)
SMALL = dict(preset="small", seq=64, batch=8)
CONFIGS = {  # name -> (method, mode); mode: dp (book-keeping), dp-vmap, nodp (pipeline), fused
    "DP-BiTFiT": ("bitfit", "dp"),
    "DP-BiTFiT (vmap)": ("bitfit", "dp-vmap"),
    "BiTFiT no-DP pipeline": ("bitfit", "nodp"),
    "BiTFiT fused": ("bitfit", "fused"),
    "DP-LoRA": ("lora", "dp"),
    "DP-LoRA (vmap)": ("lora", "dp-vmap"),
    "LoRA no-DP pipeline": ("lora", "nodp"),
    "LoRA fused": ("lora", "fused"),
}


def _table(expected_batch: float, n: int):
    """A certified Gaussian l2 table (sigma 1) for rate expected_batch / n, 1000 steps, and its path."""
    from accountant.certify import certify
    from accountant.mechanism import Mechanism
    from accountant.noise import Gaussian
    from accountant.table import write_certified_table

    q = expected_batch / n
    noise = Gaussian(1.0)
    cert = certify(Mechanism(noise, 1.0, "l2", q, 1000), 1e-5)
    path = os.path.join(tempfile.mkdtemp(prefix="bench_"), "gauss.npz")
    table = write_certified_table(path, noise, eps_target=cert.epsilon, delta=1e-5, sampling_rate=q,
                                  steps=1000, geometry="l2", certificate=cert, gaussian_sigma=1.0)
    return table, path


class _Runner:
    """One training configuration; ``step()`` runs one optimizer step on a fixed full batch."""

    def __init__(self, method: str, mode: str, spec: dict, table, seed: int = 0):
        import mindspore as ms
        from mindspore import Tensor, nn

        from finetune.dp.optimizer import DPOptimizer
        from finetune.models.gpt2 import GPT2Config, GPT2LMHeadModel
        from finetune.models.peft import apply_bitfit, apply_lora

        self.model = GPT2LMHeadModel(GPT2Config.preset(spec["preset"]), seed=seed)
        if method == "lora":
            apply_lora(self.model, r=8, alpha=16.0, targets=("c_attn",))
        else:
            apply_bitfit(self.model)
        params = self.model.trainable_params()
        self.n_params = int(sum(int(np.prod(p.shape)) for p in params))
        opt = nn.Adam(params, learning_rate=1e-4)
        rs = np.random.RandomState(seed)
        b, t = spec["batch"], spec["seq"]
        self.ids = rs.randint(0, self.model.config.vocab_size, (b, t)).astype(np.int32)
        self.mask = np.ones((b, t), np.float32)
        self.rows = np.ones(b, np.float32)
        self.mode = mode
        if mode == "fused":
            model = self.model

            class Fused(nn.Cell):
                def __init__(self):
                    super().__init__(auto_prefix=False)
                    self.model = model
                    self.opt = opt
                    self.grad = ms.value_and_grad(self.loss, grad_position=None,
                                                  weights=ms.ParameterTuple(params))

                def loss(self, ids, mask):
                    return self.model.loss(ids, mask).mean()

                def construct(self, ids, mask):
                    value, grads = self.grad(ids, mask)
                    self.opt(grads)
                    return value

            self.fused = Fused()
            self.t_ids, self.t_mask = Tensor(self.ids), Tensor(self.mask)
        else:
            self.dp = DPOptimizer(opt, self.model, table if mode != "nodp" else None,
                                  max_grad_norm=1.0, expected_batch_size=float(b),
                                  per_example="vmap" if mode == "dp-vmap" else "auto",
                                  seed=seed, private=mode != "nodp")

    def step(self) -> float:
        start = time.perf_counter()
        if self.mode == "fused":
            self.fused(self.t_ids, self.t_mask).asnumpy()
        else:
            self.dp.step([([self.ids, self.mask], self.rows)])
        return time.perf_counter() - start


def _rss_mb() -> float:
    from finetune.train import peak_rss_mb

    return peak_rss_mb()


def _worker(name: str, spec_name: str, steps: int, table_path: str) -> None:
    """Subprocess: build one configuration, compile, run ``steps`` steps, print JSON.

    The table is loaded, not certified, here: certification's own peak memory would otherwise
    dominate the process's peak RSS."""
    import mindspore as ms

    from accountant.table import load_table

    ms.set_context(mode=ms.GRAPH_MODE)
    spec = TINY if spec_name == "tiny" else SMALL
    method, mode = CONFIGS[name]
    table = load_table(table_path) if mode.startswith("dp") else None
    base = _rss_mb()
    runner = _Runner(method, mode, spec, table)
    first = runner.step()
    times = [runner.step() for _ in range(steps)]
    print(json.dumps({"name": name, "first_step_s": first, "median_step_s": float(np.median(times)),
                      "peak_rss_mb": _rss_mb(), "rss_before_model_mb": base,
                      "trainable": runner.n_params}))


def _spawn(name: str, spec_name: str, steps: int, table) -> dict:
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", name, "--spec", spec_name,
                        "--steps", str(steps), "--table", table[1]],
                       capture_output=True, text=True, timeout=3600)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"worker {name} failed:\n{r.stderr[-2000:]}")
    return json.loads(lines[-1])


def bench_tiny(steps: int, table) -> dict:
    import mindspore as ms
    from tqdm import tqdm

    ms.set_context(mode=ms.GRAPH_MODE)
    runners = {}
    for name in tqdm(CONFIGS, desc="compiling tiny GPT-2 configurations"):
        method, mode = CONFIGS[name]
        runners[name] = _Runner(method, mode, TINY, table)
        runners[name].step()  # compile
    times = {name: [] for name in CONFIGS}
    for _ in tqdm(range(steps), desc="interleaved timing rounds"):
        for name, r in runners.items():
            times[name].append(r.step())
    return {name: float(np.median(t)) for name, t in times.items()}, \
        {name: r.n_params for name, r in runners.items()}


def bench_noise(n: int = 10 ** 7, repeats: int = 3) -> dict:
    import mindspore as ms
    from mindspore import ops

    from accountant.noise import Gaussian
    from accountant.randomness import make_rng
    from accountant.table import tabulate

    ms.set_context(mode=ms.GRAPH_MODE)
    gauss = Gaussian(1.0)
    tab = tabulate(gauss)  # the same law on the 2^-53 lattice: drawn by the compiled lookup

    def best(fn):
        fn()  # warm-up (numba / kernel compilation)
        out = []
        for _ in range(repeats):
            s = time.perf_counter()
            fn()
            out.append(time.perf_counter() - s)
        return min(out)

    rng = make_rng(seed=0)
    srng = make_rng(secure=True)
    res = {
        "ops.standard_normal (float32)": best(lambda: ops.standard_normal((n,)).asnumpy()),
        "table, Gaussian law, float64": best(lambda: gauss.sample(n, rng)),
        "table, tabulated law, compiled lookup, float64": best(lambda: tab.sample(n, rng)),
        "table, tabulated law, secure ChaCha20": best(lambda: tab.sample(n, srng)),
    }
    z = tab.sample(n, rng)
    edge = float(tab.edges[-1])
    res["_tail_check"] = {"tail_mass_each_side": float(tab.tail_mass),
                          "observed_fraction_beyond_last_edge": float(np.mean(np.abs(z) > edge)) / 2}
    return res


def bench_checkpoint(specs=("tiny", "small"), methods=("bitfit", "lora", "full"),
                     repeats: int = 3) -> dict:
    """Seconds to write and to load one checkpoint of a DP run (median of ``repeats``), its size,
    and the share of the default 5-minute checkpoint interval it costs."""
    import mindspore as ms
    from mindspore import nn

    from finetune import checkpointing
    from finetune.dp.guard import PrivacyGuard
    from finetune.dp.optimizer import DPOptimizer
    from finetune.dp.sampling import PoissonSampler
    from finetune.models import peft
    from finetune.models.checkpoint import from_pretrained
    from finetune.train import DEFAULT_CHECKPOINT_SECONDS, _restore, loop_state

    ms.set_context(mode=ms.GRAPH_MODE)
    print("\n== one training checkpoint: write (atomic, fsync) and load, median of "
          f"{repeats} ==")
    out = {}
    table, _ = _table(16, 1000)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "checkpoint.safetensors")
        for spec in specs:
            for method in methods:
                model = from_pretrained(spec, seed=0)  # a preset: tiny or small
                if method == "lora":
                    peft.apply_lora(model, r=8, alpha=16.0, targets=("c_attn",), seed=0)
                elif method == "bitfit":
                    peft.apply_bitfit(model)
                params = list(model.trainable_params())
                guard = PrivacyGuard(table, dataset_size=1000)
                dp = DPOptimizer(nn.Adam(params, learning_rate=1e-3), model, table,
                                 expected_batch_size=16.0, guard=guard, seed=0)
                sampler = PoissonSampler(1000, table.sampling_rate, table.steps, rng=dp.rng)
                history = {"times": [0.1] * 100, "losses": [1.0] * 100, "batch_sizes": [16] * 100}
                writes, loads = [], []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    arrays, state = loop_state(dp, sampler, history, table.steps)
                    checkpointing.save_checkpoint(path, arrays, state)
                    writes.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    _restore(dp, sampler, checkpointing.load_checkpoint(path))
                    loads.append(time.perf_counter() - t0)
                size = os.path.getsize(path) / 2 ** 20
                w, r = float(np.median(writes)), float(np.median(loads))
                n = sum(int(np.prod(p.shape)) for p in params)
                out[f"{spec}/{method}"] = {"write_s": w, "load_s": r, "size_mb": size,
                                           "trained_parameters": n}
                print(f"  {spec:5s} {method:6s} {n / 1e6:8.2f} M trained  file {size:8.1f} MB"
                      f"  write {w:7.3f} s  load {r:7.3f} s  = {100 * w / DEFAULT_CHECKPOINT_SECONDS:.2f}%"
                      f" of the {DEFAULT_CHECKPOINT_SECONDS / 60:.0f}-minute interval")
                del model, dp, arrays, state
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration (default 20)")
    p.add_argument("--gpt2-small", action="store_true", help="also one GPT-2 small comparison (slow)")
    p.add_argument("--small-steps", type=int, default=3, help="timed GPT-2 small steps (default 3)")
    p.add_argument("--small-vmap", action="store_true",
                   help="with --gpt2-small, also DP-LoRA with vmap (needs ~12 GB)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory runs")
    p.add_argument("--no-timing", action="store_true",
                   help="skip the interleaved tiny timing and the noise draws")
    p.add_argument("--checkpoint", action="store_true",
                   help="only the checkpoint cost section (tiny and GPT-2 small)")
    p.add_argument("--checkpoint-methods", default="bitfit,lora,full",
                   help="methods for --checkpoint (default bitfit,lora,full)")
    p.add_argument("--checkpoint-specs", default="tiny,small",
                   help="models for --checkpoint (default tiny,small)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", default="tiny", help=argparse.SUPPRESS)
    p.add_argument("--table", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.spec, args.steps, args.table)
        return 0
    if args.checkpoint:
        bench_checkpoint([s for s in args.checkpoint_specs.split(",") if s],
                         [m for m in args.checkpoint_methods.split(",") if m])
        return 0

    tables = {"tiny": _table(TINY["batch"], 1000), "small": _table(SMALL["batch"], 1000)}
    if not args.no_timing:
        bench_timing(args, tables)
    if not args.no_memory:
        print("\n== peak resident memory, one subprocess per configuration (tiny) ==")
        for name in CONFIGS:
            r = _spawn(name, "tiny", 3, tables["tiny"])
            print(f"  {name:28s} peak RSS {r['peak_rss_mb']:8.0f} MB   (before building the model: "
                  f"{r['rss_before_model_mb']:.0f} MB)")
    if args.gpt2_small:
        bench_small(args, tables)
    return 0


def bench_timing(args, tables) -> None:
    print("== tiny GPT-2 (2 x 128, vocab 5000, seq 64, batch 16), median step time, interleaved ==")
    med, sizes = bench_tiny(args.steps, tables["tiny"][0])
    for name, t in med.items():
        print(f"  {name:28s} {1e3 * t:8.1f} ms   ({sizes[name]} trainable)")
    for m, target in (("BiTFiT", 1.2), ("LoRA", 1.3)):
        dp, dpv = med[f"DP-{m}"], med[f"DP-{m} (vmap)"]
        for base in ("no-DP pipeline", "fused"):
            b = med[f"{m} {base}"]
            print(f"  ratio DP-{m} / {m} {base:15s}: book-keeping {dp / b:5.2f}   vmap {dpv / b:5.2f}"
                  f"   (target <= {target})")

    print("\n== noise for 1e7 coordinates (best of 3) ==")
    noise = bench_noise()
    tail = noise.pop("_tail_check")
    ref = noise["ops.standard_normal (float32)"]
    for name, t in noise.items():
        print(f"  {name:48s} {1e3 * t:8.1f} ms   ratio to ops.standard_normal {t / ref:5.2f}")
    print(f"  tails: table mass beyond the last edge {tail['tail_mass_each_side']:.3g} per side, "
          f"observed {tail['observed_fraction_beyond_last_edge']:.3g}")


def bench_small(args, tables) -> None:
    print("\n== GPT-2 small (124M, random init, seq 64, batch 8), one subprocess each ==")
    out = {}
    names = ["DP-LoRA", "LoRA no-DP pipeline", "LoRA fused"]
    if args.small_vmap:
        names.insert(1, "DP-LoRA (vmap)")
    for name in names:
        out[name] = _spawn(name, "small", args.small_steps, tables["small"])
        r = out[name]
        print(f"  {name:28s} step {r['median_step_s']:7.2f} s (first incl. compile "
              f"{r['first_step_s']:6.1f} s)   peak RSS {r['peak_rss_mb']:8.0f} MB")
    for base in ("LoRA no-DP pipeline", "LoRA fused"):
        print(f"  ratio DP-LoRA / {base}: time {out['DP-LoRA']['median_step_s'] / out[base]['median_step_s']:.2f}"
              f"   peak memory {out['DP-LoRA']['peak_rss_mb'] / out[base]['peak_rss_mb']:.2f}")
    if args.small_vmap:
        v, b = out["DP-LoRA (vmap)"], out["DP-LoRA"]
        print(f"  book-keeping / vmap: time {b['median_step_s'] / v['median_step_s']:.2f}   "
              f"peak memory {b['peak_rss_mb'] / v['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
