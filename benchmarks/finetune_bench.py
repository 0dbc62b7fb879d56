"""Cost of differential privacy in finetune, measured side by side in one run.

    python benchmarks/finetune_bench.py [--steps 20] [--gpt2-small [--json]] [--no-memory]
    python benchmarks/finetune_bench.py --llama [--llama-steps 3] [--llama-rounds 2] [--json]

1. Tiny GPT-2 (2 layers, width 128, vocabulary 5000, sequence 64, batch 16), one optimizer step:
   DP-BiTFiT, DP-LoRA and DP full fine-tuning vs their non-private counterparts.  Step times are
   medians over ``--steps`` steps after compilation, with the configurations interleaved round by
   round in one process so machine load affects all alike.  Two non-private baselines: the same
   pipeline with DP switched off (``--no-dp``: plain summed gradient, no clipping, no noise) and a
   fused MindSpore train step (gradient and optimizer update in one compiled graph), the usual
   non-private loop.  The DP steps use book-keeping (the automatic choice) and, for reference, vmap.
2. Noise for 1e7 coordinates: exact float64 draws from a table (Gaussian law; a tabulated law
   through the compiled inverse-CDF lookup; the secure ChaCha20 source) vs MindSpore's
   ``ops.standard_normal`` (float32).
3. Peak resident memory of each training configuration, each measured in its own subprocess, and
   the cost of PyNative mode (tiny model, DP and fused, one subprocess each).
4. ``--gpt2-small``: GPT-2 small (124M, random init, sequence 128, logical batch 16 in one
   micro-batch), BiTFiT, LoRA (rank 8, attention projections) and full fine-tuning: DP with
   book-keeping vs the fused non-private step, step time and peak memory, one subprocess each, and
   a profile of one DP step by phase (forward; backward to the taps; per-example norms; clipped
   sum; device-to-host copy; float64 noise draw (in a background thread, overlapped with the
   device work) and what the step still waited for it; noise addition; host-to-device copy;
   optimizer update).  The device phases are differences of separately compiled prefixes of the
   step (forward; + backward; + norms; the whole clipped sum).  ``--json`` prints, as the last
   line, ``{"bitfit": {"time_ratio": .., "memory_ratio": .., ...}, "lora": {...}, "full": {...}}``.
   Each DP step is also timed through ``make_private``'s engine (``engine.step`` on the batches of
   ``engine.batches``, rate 1 so the batch is the same 16 examples): its ratio to the bare
   ``DPOptimizer`` step is the engine's overhead.
5. ``--llama`` (only this section): the ~100M Llama preset (``llama-100m``: 12 layers, width 640,
   GQA 10/5 heads, vocabulary 32000, random init), sequence 128, batch 16 in one micro-batch; LoRA
   (rank 8, q/v projections), norm-only (RMSNorm gains) and full fine-tuning, the DP step
   (book-keeping) vs the fused non-private step, one subprocess each (peak memory is its own), in
   rounds whose order alternates; then the merged LoRA adapter's forward latency vs the base model
   (``benchmarks/merge_latency.py``).
6. ``--checkpoint`` (only this section): the cost of one training checkpoint
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
SMALL = dict(preset="small", seq=128, batch=16)
LLAMA = dict(preset="llama-100m", seq=128, batch=16)
SPECS = {"tiny": TINY, "small": SMALL, "llama100m": LLAMA,
         "tiny128": dict(preset="tiny", seq=SMALL["seq"], batch=SMALL["batch"]),  # the small shape
         "llama-tiny128": dict(preset="llama-tiny", seq=LLAMA["seq"], batch=LLAMA["batch"])}
METHODS = ("bitfit", "lora", "full")
CONFIGS = {  # name -> (method, mode); mode: dp (book-keeping), dp-vmap, nodp (pipeline), fused
    "DP-BiTFiT": ("bitfit", "dp"),
    "DP-BiTFiT (vmap)": ("bitfit", "dp-vmap"),
    "BiTFiT no-DP pipeline": ("bitfit", "nodp"),
    "BiTFiT fused": ("bitfit", "fused"),
    "DP-LoRA": ("lora", "dp"),
    "DP-LoRA (vmap)": ("lora", "dp-vmap"),
    "LoRA no-DP pipeline": ("lora", "nodp"),
    "LoRA fused": ("lora", "fused"),
    "DP-full": ("full", "dp"),
    "full no-DP pipeline": ("full", "nodp"),
    "full fused": ("full", "fused"),
    "DP-BiTFiT (make_private)": ("bitfit", "engine"),
    "DP-LoRA (make_private)": ("lora", "engine"),
    "DP-full (make_private)": ("full", "engine"),
    "DP-norm-only": ("norm_only", "dp"),            # Llama family (no biases: BiTFiT's analogue)
    "norm-only fused": ("norm_only", "fused"),
}
LABEL = {"bitfit": "BiTFiT", "lora": "LoRA", "full": "full", "norm_only": "norm-only"}
LLAMA_METHODS = ("lora", "norm_only", "full")


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
        from finetune.models.checkpoint import from_pretrained
        from finetune.models.peft import apply_bitfit, apply_lora, apply_norm_only

        self.model = from_pretrained(spec["preset"], seed=seed)
        llama = spec["preset"].startswith("llama")
        if method == "lora":   # the attention projections (Hu et al.: W_q and W_v for Llama-style)
            apply_lora(self.model, r=8, alpha=16.0, targets=("q_proj", "v_proj") if llama else ("c_attn",))
        elif method == "bitfit":
            apply_bitfit(self.model)
        elif method == "norm_only":
            apply_norm_only(self.model)
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
        elif mode == "engine":   # the same DP step through the engine (q = 1: the whole batch)
            import warnings

            from finetune import make_private

            with warnings.catch_warnings():  # a seeded benchmark, not a release
                warnings.simplefilter("ignore")
                self.engine = make_private(self.model, opt, dataset_size=b, batch_size=b, steps=1000,
                                           noise_multiplier=1.0, target_delta=1e-5, seed=seed,
                                           micro_batch_size=b)
            self.dp = self.engine.optimizer
            self.batches = self.engine.batches(self.ids, self.mask)
        else:
            self.dp = DPOptimizer(opt, self.model, table if mode != "nodp" else None,
                                  max_grad_norm=1.0, expected_batch_size=float(b),
                                  per_example="vmap" if mode == "dp-vmap" else "auto",
                                  seed=seed, private=mode != "nodp")

    def step(self) -> float:
        start = time.perf_counter()
        if self.mode == "fused":
            self.fused(self.t_ids, self.t_mask).asnumpy()
        elif self.mode == "engine":
            self.engine.step(next(self.batches))
        else:
            self.dp.step([([self.ids, self.mask], self.rows)])
        return time.perf_counter() - start


def _rss_mb() -> float:
    from finetune.train import peak_rss_mb

    return peak_rss_mb()


def _median_timings(samples):
    keys = sorted({k for t in samples for k in t})
    return {k: float(np.median([t.get(k, 0.0) for t in samples])) for k in keys}


def _device_profile(runner, reps: int = 2) -> dict:
    """Device phases of one DP step, as differences of compiled prefixes of the step."""
    import mindspore as ms
    from mindspore import Tensor, nn

    from finetune.dp.per_example import _TapLoss

    clip_cell = runner.dp.grads._cell  # the engine's compiled clipped sum (book-keeping, tapped)
    probes = runner.dp.grads._probes
    model = runner.model
    positions = tuple(range(2, 2 + len(probes)))

    class Forward(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.model = model

        def construct(self, inputs, mask):
            return (self.model.loss(*inputs) * mask).sum()

    class ToTaps(nn.Cell):
        def __init__(self, with_norms):
            super().__init__(auto_prefix=False)
            self.tap_loss = _TapLoss(model)
            self.grad = ms.value_and_grad(self.tap_loss, grad_position=positions, has_aux=True)
            self.core = clip_cell.core
            self.with_norms = with_norms

        def construct(self, inputs, probes, mask):
            (_, losses, saved), probe_grads = self.grad(inputs, mask, *probes)
            if self.with_norms:
                gs, acts, vectors = self.core.prepare(probe_grads, saved)
                return self.core.norms(gs, acts, vectors, mask)
            return probe_grads, saved

    inputs = ms.mutable((Tensor(runner.ids), Tensor(runner.mask)))
    rows, clip = Tensor(runner.rows), Tensor(np.float32(1.0))
    cells = {"forward": lambda f=Forward(): f(inputs, rows),
             "to_taps": lambda f=ToTaps(False): f(inputs, probes, rows),
             "norms": lambda f=ToTaps(True): f(inputs, probes, rows),
             "clipped_sum": lambda: clip_cell(inputs, probes, rows, clip)}
    out = {}
    for name, fn in cells.items():
        _sync(fn())  # compile
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            _sync(fn())
            times.append(time.perf_counter() - start)
        out[name] = float(np.median(times))
    return {"forward": out["forward"],
            "backward_to_taps": out["to_taps"] - out["forward"],
            "per_example_norms": out["norms"] - out["to_taps"],
            "clipped_sum": out["clipped_sum"] - out["norms"]}


def _sync(out):
    """Wait for a (possibly nested) result to be computed."""
    if isinstance(out, (tuple, list)):
        for o in out:
            _sync(o)
    elif hasattr(out, "asnumpy"):
        out.asnumpy()


def _worker(name: str, spec_name: str, steps: int, table_path: str, pynative: bool = False,
            profile: bool = False) -> None:
    """Subprocess: build one configuration, compile, run ``steps`` steps, print JSON.

    The table is loaded, not certified, here: certification's own peak memory would otherwise
    dominate the process's peak RSS.  Peak memory is read before the (optional) profile, whose
    extra compiled graphs would otherwise count."""
    import mindspore as ms

    from accountant.table import load_table

    ms.set_context(mode=ms.PYNATIVE_MODE if pynative else ms.GRAPH_MODE)
    spec = SPECS[spec_name]
    method, mode = CONFIGS[name]
    table = load_table(table_path) if mode.startswith("dp") else None
    base = _rss_mb()
    runner = _Runner(method, mode, spec, table)
    first = runner.step()
    times, phases = [], []
    for _ in range(steps):
        times.append(runner.step())
        if mode.startswith("dp"):
            phases.append(dict(runner.dp.last_timings))
    out = {"name": name, "first_step_s": first, "median_step_s": float(np.median(times)),
           "peak_rss_mb": _rss_mb(), "rss_before_model_mb": base, "trainable": runner.n_params}
    if phases:
        out["host_phases"] = _median_timings(phases)
    if profile and mode == "dp":
        out["device_phases"] = _device_profile(runner)
    print(json.dumps(out))


def _spawn(name: str, spec_name: str, steps: int, table, pynative: bool = False,
           profile: bool = False) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--spec", spec_name,
           "--steps", str(steps), "--table", table[1]]
    cmd += ["--pynative"] if pynative else []
    cmd += ["--profile"] if profile else []
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"worker {name} failed:\n{r.stderr[-2000:]}")
    return json.loads(lines[-1])


def _print_ratios(label: str, width: int, method: str, dp: dict, base: dict) -> tuple[float, float]:
    """Print one method's DP vs non-private line; return (time ratio, memory ratio)."""
    t_ratio = dp["median_step_s"] / base["median_step_s"]
    m_ratio = dp["peak_rss_mb"] / base["peak_rss_mb"]
    t_target, m_target = TARGETS[method]
    print(f"  {label:{width}s} ({dp['trainable']} trainable)  DP {dp['median_step_s']:7.2f} s, "
          f"{dp['peak_rss_mb']:7.0f} MB   non-private {base['median_step_s']:7.2f} s, "
          f"{base['peak_rss_mb']:7.0f} MB   ratio time {t_ratio:5.2f} (target <= {t_target})  "
          f"memory {m_ratio:5.2f} (target <= {m_target})   [first steps incl. compile: "
          f"{dp['first_step_s']:.0f} s / {base['first_step_s']:.0f} s]", flush=True)
    return t_ratio, m_ratio


def bench_llama(args, table) -> dict:
    """Llama (``--llama-spec``, default the ~100M preset at sequence 128, batch 16): for LoRA (rank 8,
    q/v), norm-only and full fine-tuning, the DP step (book-keeping) and the fused non-private step,
    each in its own subprocess (so peak memory is its own: two ~10 GB processes at once would not fit
    a 24 GB machine), back to back in ``--llama-rounds`` rounds whose order alternates (DP first, then
    non-private first, ...); the step time is the median over rounds of each run's median. Then the
    merged adapter's inference latency vs the base model (``benchmarks/merge_latency.py``)."""
    spec = SPECS[args.llama_spec]
    print(f"\n== Llama ({spec['preset']}, random init, seq {spec['seq']}, batch {spec['batch']}, one "
          "micro-batch): DP (book-keeping) vs fused non-private step, one subprocess each, "
          f"{args.llama_rounds} round(s) of {args.llama_steps} steps, order alternating ==", flush=True)
    summary = {}
    for method in LLAMA_METHODS:
        label = LABEL[method]
        runs = {"dp": [], "base": []}
        try:
            for i in range(args.llama_rounds):     # order alternates round by round
                order = (("dp", f"DP-{label}"), ("base", f"{label} fused"))
                for key, name in (order if i % 2 == 0 else order[::-1]):
                    runs[key].append(_spawn(name, args.llama_spec, args.llama_steps, table))
                    r = runs[key][-1]      # printed at once: a later worker may be killed for memory
                    print(f"    {name:18s} median step {r['median_step_s']:7.2f} s, peak RSS "
                          f"{r['peak_rss_mb']:7.0f} MB (first step incl. compile {r['first_step_s']:.0f} s)",
                          flush=True)
        except RuntimeError as e:   # e.g. killed for memory: say so, measure the other methods
            print(f"  {label}: failed ({str(e).strip()[-300:]})", flush=True)
            summary[method] = {"time_ratio": None, "memory_ratio": None, "error": str(e)[-300:]}
            continue
        dp, base = ({"median_step_s": float(np.median([r["median_step_s"] for r in rs])),
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "trainable": rs[0]["trainable"],
                     "first_step_s": rs[0]["first_step_s"], "host_phases": rs[0].get("host_phases", {})}
                    for rs in (runs["dp"], runs["base"]))
        t_ratio, m_ratio = _print_ratios(label, 9, method, dp, base)
        host = dp.get("host_phases", {})
        print("            DP step phases (s): " + "  ".join(f"{k} {v:.3f}" for k, v in host.items()),
              flush=True)
        summary[method] = {"time_ratio": round(t_ratio, 4), "memory_ratio": round(m_ratio, 4),
                           "dp_step_s": dp["median_step_s"], "nonprivate_step_s": base["median_step_s"],
                           "dp_peak_rss_mb": dp["peak_rss_mb"], "nonprivate_peak_rss_mb": base["peak_rss_mb"],
                           "trainable": dp["trainable"], "dp_phases_s": host, "steps": args.llama_steps,
                           "rounds": args.llama_rounds}
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "merge_latency.py"), "--models", spec["preset"],
           "--batch", str(spec["batch"]), "--seq", str(spec["seq"]), "--rounds", str(args.merge_rounds),
           "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("[")]
    if r.returncode != 0 or not lines:
        print(f"  merged-adapter latency: failed ({r.stderr.strip()[-300:]})")
        summary["merged_latency"] = {"ratio": None}
    else:
        m = json.loads(lines[-1])[0]
        print(f"  merged LoRA adapter (rank {m['rank']}, all seven projections) vs base, {m['rounds']} "
              f"alternating rounds: base {m['base_s']:.3f} s, merged {m['merged_s']:.3f} s, ratio "
              f"{m['ratio']:.3f} (target <= 1.02)", flush=True)
        summary["merged_latency"] = m
    return summary


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

    import warnings

    from finetune import make_private
    from finetune.models import peft
    from finetune.models.checkpoint import from_pretrained
    from finetune.train import DEFAULT_CHECKPOINT_SECONDS

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
                with warnings.catch_warnings():  # a seeded benchmark, not a release
                    warnings.simplefilter("ignore")
                    engine = make_private(model, nn.Adam(params, learning_rate=1e-3),
                                          dataset_size=1000, noise=table, seed=0)
                history = {"history": {"losses": [1.0] * 100, "batch_sizes": [16] * 100}}
                writes, loads = [], []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    engine.save(path, extra=history, overwrite=True)
                    writes.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    engine._resume(path)     # what make_private(..., resume=path) loads
                    loads.append(time.perf_counter() - t0)
                size = os.path.getsize(path) / 2 ** 20
                w, r = float(np.median(writes)), float(np.median(loads))
                n = sum(int(np.prod(p.shape)) for p in params)
                out[f"{spec}/{method}"] = {"write_s": w, "load_s": r, "size_mb": size,
                                           "trained_parameters": n}
                print(f"  {spec:5s} {method:6s} {n / 1e6:8.2f} M trained  file {size:8.1f} MB"
                      f"  write {w:7.3f} s  load {r:7.3f} s  = {100 * w / DEFAULT_CHECKPOINT_SECONDS:.2f}%"
                      f" of the {DEFAULT_CHECKPOINT_SECONDS / 60:.0f}-minute interval")
                del model, engine
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration (default 20)")
    p.add_argument("--gpt2-small", action="store_true", help="also one GPT-2 small comparison (slow)")
    p.add_argument("--small-steps", type=int, default=3, help="timed GPT-2 small steps (default 3)")
    p.add_argument("--small-methods", default=",".join(METHODS),
                   help=f"GPT-2 small methods to measure (default {','.join(METHODS)})")
    p.add_argument("--small-spec", default="small", choices=("small", "tiny128"),
                   help="model of the --gpt2-small section: GPT-2 small (default) or, as a quick "
                        "check of the same shapes, the tiny model at sequence 128 and batch 16")
    p.add_argument("--json", action="store_true",
                   help="with --gpt2-small, print the ratios as one JSON object on the last line")
    p.add_argument("--no-profile", action="store_true", help="skip the device-phase profile")
    p.add_argument("--profile-spec", default="tiny", choices=("tiny", "small"),
                   help="model whose device phases are profiled, in a process of its own "
                        "(default tiny: four more compiled GPT-2 small graphs are slow to build "
                        "and large)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory runs")
    p.add_argument("--no-pynative", action="store_true", help="skip the PyNative-mode cost")
    p.add_argument("--no-timing", action="store_true",
                   help="skip the interleaved tiny timing and the noise draws")
    p.add_argument("--checkpoint", action="store_true",
                   help="only the checkpoint cost section (tiny and GPT-2 small)")
    p.add_argument("--checkpoint-methods", default="bitfit,lora,full",
                   help="methods for --checkpoint (default bitfit,lora,full)")
    p.add_argument("--checkpoint-specs", default="tiny,small",
                   help="models for --checkpoint (default tiny,small)")
    p.add_argument("--llama", action="store_true",
                   help="only the Llama section: LoRA, norm-only and full on the ~100M Llama preset "
                        "(seq 128, batch 16), DP vs non-private, and the merged adapter's latency")
    p.add_argument("--llama-steps", type=int, default=3,
                   help="timed steps per Llama run (default 3)")
    p.add_argument("--llama-rounds", type=int, default=2,
                   help="runs of each Llama configuration, DP and non-private alternating (default 2)")
    p.add_argument("--llama-spec", default="llama100m", choices=("llama100m", "llama-tiny128"),
                   help="model of --llama: the ~100M preset (default) or, as a quick check of the same "
                        "shapes, llama-tiny")
    p.add_argument("--merge-rounds", type=int, default=8,
                   help="alternating base/merged forward rounds of --llama's latency (default 8)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", default="tiny", help=argparse.SUPPRESS)
    p.add_argument("--table", help=argparse.SUPPRESS)
    p.add_argument("--pynative", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.spec, args.steps, args.table, args.pynative, args.profile)
        return 0
    if args.checkpoint:
        result = bench_checkpoint([s for s in args.checkpoint_specs.split(",") if s],
                                  [m for m in args.checkpoint_methods.split(",") if m])
        if args.json:
            print(json.dumps(result))
        return 0
    if args.llama:
        spec = SPECS[args.llama_spec]
        result = bench_llama(args, _table(spec["batch"], 1000))
        if args.json:
            print(json.dumps(result))
        return 0
    methods = [m.strip() for m in args.small_methods.split(",") if m.strip()]
    bad = sorted(set(methods) - set(METHODS))
    if bad:
        p.error(f"--small-methods: unknown {bad}; choose from {list(METHODS)}")

    tables = {"tiny": _table(TINY["batch"], 1000), "small": _table(SMALL["batch"], 1000)}
    tables["tiny128"] = tables["small"]
    summary = None
    if args.gpt2_small:
        # first, while this process is still small: the tiny sections below leave MindSpore's
        # memory pool of this process at a few GB, and DP full fine-tuning of GPT-2 small needs
        # 22 GB of a 24 GB machine in its worker (measured: the worker was killed otherwise)
        summary = bench_small(args, tables, methods)
    if not args.no_timing:
        bench_timing(args, tables)
    if not args.no_memory:
        print("\n== peak resident memory, one subprocess per configuration (tiny) ==")
        for name in CONFIGS:
            r = _spawn(name, "tiny", 3, tables["tiny"])
            print(f"  {name:28s} peak RSS {r['peak_rss_mb']:8.0f} MB   (before building the model: "
                  f"{r['rss_before_model_mb']:.0f} MB)")
    if not args.no_pynative:
        bench_pynative(tables)
    if summary is not None and args.json:
        print(json.dumps(summary))
    return 0


def bench_pynative(tables) -> None:
    print("\n== PyNative mode (tiny, 5 steps after the first, one subprocess each) vs graph mode ==")
    for method in METHODS:
        label = LABEL[method]
        row = {}
        for name in (f"DP-{label}", f"{label} fused"):
            for pyn in (False, True):
                row[(name, pyn)] = _spawn(name, "tiny", 5, tables["tiny"], pynative=pyn)["median_step_s"]
        dp_g, dp_p = row[(f"DP-{label}", False)], row[(f"DP-{label}", True)]
        np_g, np_p = row[(f"{label} fused", False)], row[(f"{label} fused", True)]
        print(f"  {label:7s} DP {1e3 * dp_g:7.1f} ms graph, {1e3 * dp_p:7.1f} ms PyNative "
              f"(x{dp_p / dp_g:4.1f});  fused {1e3 * np_g:7.1f} / {1e3 * np_p:7.1f} ms;  "
              f"DP/non-private in PyNative {dp_p / np_p:5.2f}")


def bench_timing(args, tables) -> None:
    print("== tiny GPT-2 (2 x 128, vocab 5000, seq 64, batch 16), median step time, interleaved ==")
    med, sizes = bench_tiny(args.steps, tables["tiny"][0])
    for name, t in med.items():
        print(f"  {name:28s} {1e3 * t:8.1f} ms   ({sizes[name]} trainable)")
    for m, target in (("BiTFiT", 1.10), ("LoRA", 1.20), ("full", 1.50)):
        dp, dpv = med[f"DP-{m}"], med.get(f"DP-{m} (vmap)")
        for base in ("no-DP pipeline", "fused"):
            b = med[f"{m} {base}"]
            vm = f"   vmap {dpv / b:5.2f}" if dpv is not None else ""
            print(f"  ratio DP-{m} / {m} {base:15s}: book-keeping {dp / b:5.2f}{vm}"
                  f"   (GPT-2 small target <= {target})")
        print(f"  ratio DP-{m} through make_private / DPOptimizer direct: "
              f"{med[f'DP-{m} (make_private)'] / dp:5.2f}")

    print("\n== noise for 1e7 coordinates (best of 3) ==")
    noise = bench_noise()
    tail = noise.pop("_tail_check")
    ref = noise["ops.standard_normal (float32)"]
    for name, t in noise.items():
        print(f"  {name:48s} {1e3 * t:8.1f} ms   ratio to ops.standard_normal {t / ref:5.2f}")
    print(f"  tails: table mass beyond the last edge {tail['tail_mass_each_side']:.3g} per side, "
          f"observed {tail['observed_fraction_beyond_last_edge']:.3g}")


TARGETS = {"bitfit": (1.10, 1.10), "lora": (1.20, 1.15), "full": (1.50, 1.30), "norm_only": (1.10, 1.10)}
PHASES = ("forward", "backward_to_taps", "per_example_norms", "clipped_sum", "d2h", "noise_draw",
          "noise_wait", "noise_add", "h2d", "update")


def bench_small(args, tables, methods) -> dict:
    which = args.small_spec
    model = "GPT-2 small (124M, random init" if which == "small" else "tiny GPT-2 (2 x 128"
    print(f"\n== {model}, seq {SMALL['seq']}, logical batch {SMALL['batch']}, "
          "one micro-batch), DP (book-keeping) vs fused non-private step, one subprocess each ==")
    summary = {}
    for method in methods:
        label = LABEL[method]
        try:
            dp = _spawn(f"DP-{label}", which, args.small_steps, tables[which])
            base = _spawn(f"{label} fused", which, args.small_steps, tables[which])
        except RuntimeError as e:  # e.g. killed for memory: say so, measure the other methods
            print(f"  {label}: failed ({str(e).strip()[-300:]})")
            summary[method] = {"time_ratio": None, "memory_ratio": None, "error": str(e)[-300:]}
            continue
        if not args.no_profile:  # its own process: extra graphs never count in the peak above
            spec = args.profile_spec
            try:
                prof = _spawn(f"DP-{label}", spec, 2, tables[spec], profile=True)
                dp["device_phases"] = prof["device_phases"]
                dp["profile_spec"] = spec
            except RuntimeError as e:
                print(f"  ({label}: device-phase profile on {spec} failed: {str(e)[:200]})")
        t_ratio, m_ratio = _print_ratios(label, 7, method, dp, base)
        host = dp.get("host_phases", {})
        phases = {"device (forward, backward, norms, clipped sum)": host.get("clipped_sum", 0.0)}
        for k in ("d2h", "noise_draw", "noise_wait", "noise_add", "h2d", "update"):
            if k in host:
                phases[k] = host[k]
        print("          DP step phases (s): " + "  ".join(f"{k} {v:.3f}" for k, v in phases.items()))
        print("          (noise_draw runs in a background thread during the device phases; "
              "noise_wait is what the step still waited for it)")
        split = dp.get("device_phases", {})
        if split:
            total = sum(max(v, 0.0) for v in split.values()) or 1.0
            print(f"          device phases on {dp['profile_spec']} (s, share): " + "  ".join(
                f"{k} {v:.3f} ({100 * max(v, 0.0) / total:.0f}%)" for k, v in split.items()))
        summary[method] = {"time_ratio": round(t_ratio, 4), "memory_ratio": round(m_ratio, 4),
                           "dp_step_s": dp["median_step_s"], "nonprivate_step_s": base["median_step_s"],
                           "dp_peak_rss_mb": dp["peak_rss_mb"],
                           "nonprivate_peak_rss_mb": base["peak_rss_mb"],
                           "trainable": dp["trainable"], "profile_s": phases,
                           "device_split_s": split, "device_split_model": dp.get("profile_spec")}
    return summary


if __name__ == "__main__":
    sys.exit(main())
