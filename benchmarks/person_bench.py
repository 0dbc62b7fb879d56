"""Cost of person-level (unit-level) DP-SGD against record-level DP-SGD, side by side in one run.

    python benchmarks/person_bench.py [--steps 10] [--rows-per-unit 4] [--gpt2-small] [--json]

One DP optimizer step (``finetune.dp.optimizer.DPOptimizer``: clipped sum, float64 noise, Adam
update) on a fixed batch of random token ids, GPT-2 with LoRA (rank 8, ``c_attn``):

* ``record``: every row clipped on its own, per-example gradients by book-keeping (the automatic
  choice);
* ``person``: the same rows as units of ``--rows-per-unit`` rows (unit-major), each unit's summed
  gradient clipped as one (``rows_per_unit``), also by book-keeping (the norm of a unit's summed
  gradient from its rows' activations and output gradients, no per-unit gradient materialised);
* ``record (vmap)`` and ``person (vmap)``: the same two with vmap per-example gradients (for
  person: vmap, then a segment sum per unit), the fallback for layers without a book-keeping rule.

Tiny GPT-2 (sequence 64, batch 16): step times are medians over ``--steps`` steps after
compilation, the configurations interleaved round by round in one process so machine load affects
all alike.  ``--gpt2-small``: GPT-2 small (124M, sequence 128, batch ``--small-batch``, units of
``--small-rows-per-unit``), each configuration in its own subprocess, one after the other (three
compiled GPT-2 small graphs in one process, two of them vmap, exceeded 16 GB), with its peak
resident memory.  Prints the ratios person / record with book-keeping and with vmap; ``--json``
prints them as the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CONFIGS = ("record", "person", "record (vmap)", "person (vmap)")


class _Noise:
    """The noise source DPOptimizer reads from a table: Gaussian sigma 1, l2 clipping."""

    def __init__(self):
        from accountant.noise import Gaussian

        self.noise, self.geometry = Gaussian(1.0), "l2"


def _runner(config: str, preset: str, seq: int, batch: int, m: int, seed: int = 0):
    from mindspore import nn

    from finetune.dp.optimizer import DPOptimizer
    from finetune.models.gpt2 import GPT2Config, GPT2LMHeadModel
    from finetune.models.peft import apply_lora

    model = GPT2LMHeadModel(GPT2Config.preset(preset), seed=seed)
    apply_lora(model, r=8, alpha=16.0, targets=("c_attn",))
    opt = nn.Adam(model.trainable_params(), learning_rate=1e-4)
    person = config.startswith("person")
    dp = DPOptimizer(opt, model, _Noise(), max_grad_norm=1.0,
                     expected_batch_size=float(batch // m if person else batch),
                     per_example="vmap" if config.endswith("(vmap)") else "bookkeeping", seed=seed,
                     rows_per_unit=m if person else None)
    rs = np.random.RandomState(seed)
    ids = rs.randint(0, model.config.vocab_size, (batch, seq)).astype(np.int32)
    micro = [([ids, np.ones((batch, seq), np.float32)], np.ones(batch, np.float32))]

    def step() -> float:
        start = time.perf_counter()
        dp.step(micro)
        return time.perf_counter() - start
    return step, dp.method


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _worker(config: str, preset: str, seq: int, batch: int, m: int, steps: int) -> dict:
    """One configuration alone: median step seconds after compilation and peak memory."""
    step, method = _runner(config, preset, seq, batch, m)
    step()
    seconds = float(np.median([step() for _ in range(steps)]))
    return {"seconds": seconds, "method": method, "peak_rss_mb": _rss_mb()}


def bench_separate(preset: str, seq: int, batch: int, m: int, steps: int) -> dict:
    """Each configuration in its own subprocess (sequentially): times and peak memory."""
    import subprocess

    out = {}
    for c in CONFIGS:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", c, "--preset", preset, "--seq", str(seq),
               "--batch", str(batch), "--rows-per-unit", str(m), "--steps", str(steps)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"person_bench: {c} on GPT-2 {preset} failed (exit {res.returncode}): "
                             f"{(res.stderr.strip().splitlines() or ['killed'])[-1]}")
        out[c] = json.loads(res.stdout.strip().splitlines()[-1])
    med = {c: out[c]["seconds"] for c in CONFIGS}
    return {"model": preset, "seq": seq, "batch_rows": batch, "rows_per_unit": m,
            "methods": {c: out[c]["method"] for c in CONFIGS}, "seconds": med,
            "peak_rss_mb": {c: out[c]["peak_rss_mb"] for c in CONFIGS},
            "person_over_record": med["person"] / med["record"],
            "person_over_record_vmap": med["person (vmap)"] / med["record (vmap)"]}


def bench(preset: str, seq: int, batch: int, m: int, steps: int) -> dict:
    """Median step seconds of each configuration and the ratios, interleaved round by round."""
    runners = {c: _runner(c, preset, seq, batch, m) for c in CONFIGS}
    for step, _ in runners.values():   # compile
        step()
    times = {c: [] for c in CONFIGS}
    for _ in range(steps):
        for c, (step, _) in runners.items():
            times[c].append(step())
    med = {c: float(np.median(v)) for c, v in times.items()}
    return {"model": preset, "seq": seq, "batch_rows": batch, "rows_per_unit": m,
            "methods": {c: runners[c][1] for c in CONFIGS}, "seconds": med,
            "person_over_record": med["person"] / med["record"],
            "person_over_record_vmap": med["person (vmap)"] / med["record (vmap)"]}


def _show(r: dict) -> None:
    print(f"GPT-2 {r['model']}, LoRA r8, {r['batch_rows']} rows x {r['seq']} tokens, person units of "
          f"{r['rows_per_unit']} rows:")
    for c in CONFIGS:
        mem = f", peak {r['peak_rss_mb'][c]:.0f} MB" if "peak_rss_mb" in r else ""
        print(f"  {c:<14} {r['seconds'][c]:8.4f} s/step  ({r['methods'][c]}{mem})")
    print(f"  person / record = {r['person_over_record']:.2f}x (book-keeping), "
          f"{r['person_over_record_vmap']:.2f}x (vmap)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration (default 10)")
    p.add_argument("--rows-per-unit", type=int, default=4, help="rows per person unit (default 4)")
    p.add_argument("--gpt2-small", action="store_true", help="also GPT-2 small (slow)")
    p.add_argument("--small-steps", type=int, default=3, help="timed GPT-2 small steps (default 3)")
    p.add_argument("--small-batch", type=int, default=4, help="GPT-2 small rows per step (default 4)")
    p.add_argument("--small-rows-per-unit", type=int, default=2,
                   help="GPT-2 small rows per person unit (default 2)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    p.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--preset", default="tiny", help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=16, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name, v in (("--steps", args.steps), ("--rows-per-unit", args.rows_per_unit),
                    ("--small-steps", args.small_steps), ("--small-batch", args.small_batch)):
        if v < 1:
            p.error(f"{name} must be >= 1")
    if 16 % args.rows_per_unit or args.small_batch % args.small_rows_per_unit:
        p.error("--rows-per-unit must divide 16 and --small-rows-per-unit --small-batch")
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.preset, args.seq, args.batch, args.rows_per_unit,
                                 args.steps)))
        return 0
    results = [bench("tiny", 64, 16, args.rows_per_unit, args.steps)]
    _show(results[-1])
    if args.gpt2_small:
        results.append(bench_separate("small", 128, args.small_batch, args.small_rows_per_unit,
                                      args.small_steps))
        _show(results[-1])
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
