"""Inference latency of a merged LoRA adapter vs the base model (the overhead a served model pays).

    python benchmarks/merge_latency.py [--models llama-tiny llama-100m] [--batch 16] [--seq 128]
                                       [--rounds 20] [--rank 8]

For each model: random-init weights, LoRA (rank ``--rank``) on all seven projections
(q/k/v/o/gate/up/down), the adapter's B set non-zero (as after training), then merged into the
weights (``finetune.models.peft.merge_lora``) and copied into a plain model without LoRA cells (what
``python -m finetune.export --merge`` writes and a server loads).
The base model and the merged model are separate objects with the same shapes, each forward compiled
once with ``ms.jit``; then ``--rounds`` rounds, each timing one forward of the base and one of the
merged model back to back (order alternating), so machine load affects both alike. Reported: median
seconds per forward and the ratio merged / base (expected ~1.00: a merged adapter is an ordinary
weight). For reference the unmerged adapted model (the extra low-rank products) is timed too, before
the rounds (not interleaved, so only indicative).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import mindspore as ms
from mindspore import Tensor

from finetune.models import peft
from finetune.models.checkpoint import from_pretrained
from finetune.models.gpt2 import assign_parameter

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _compiled(model):
    def forward(ids, mask):
        return model(ids, mask)
    return ms.jit(forward)


def measure(name: str, batch: int, seq: int, rounds: int, rank: int) -> dict:
    base = from_pretrained(name, seed=0)
    adapted = from_pretrained(name, seed=0)
    peft.apply_lora(adapted, r=rank, alpha=2.0 * rank, targets=TARGETS)
    rng = np.random.default_rng(0)
    for _, layer in peft.lora_layers(adapted):
        assign_parameter(layer.lora_B, rng.normal(0.0, 0.01, layer.lora_B.shape))
    unmerged = _compiled(adapted)
    ids = Tensor(rng.integers(0, base.config.vocab_size, (batch, seq)).astype(np.int32))
    mask = Tensor(np.ones((batch, seq), np.float32))
    t_unmerged = []
    for _ in range(max(3, rounds // 4) + 1):
        t0 = time.perf_counter()
        before = unmerged(ids, mask).asnumpy()
        t_unmerged.append(time.perf_counter() - t0)
    peft.merge_lora(adapted)
    # what --merge writes and a server loads: a plain model (no LoRA cells) with the merged weights
    merged = from_pretrained(name, seed=1)
    weights = dict(adapted.parameters_and_names())
    for n, p in merged.parameters_and_names():
        assign_parameter(p, weights[n].asnumpy())
    del adapted, weights, unmerged
    fns = {"base": _compiled(base), "merged": _compiled(merged)}
    after = fns["merged"](ids, mask).asnumpy()              # compile (and check the merge)
    fns["base"](ids, mask).asnumpy()
    times = {"base": [], "merged": []}
    for i in range(rounds):
        for key in (("base", "merged") if i % 2 == 0 else ("merged", "base")):
            t0 = time.perf_counter()
            fns[key](ids, mask).asnumpy()
            times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "batch": batch, "seq": seq, "rounds": rounds, "rank": rank,
            "base_s": med["base"], "merged_s": med["merged"], "ratio": med["merged"] / med["base"],
            "unmerged_s": statistics.median(t_unmerged[1:]),
            "merge_max_abs_logit_diff": float(np.abs(after - before).max())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["llama-tiny", "llama-100m"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print the results as one JSON line at the end")
    a = p.parse_args(argv)
    results = []
    for name in a.models:
        r = measure(name, a.batch, a.seq, a.rounds, a.rank)
        results.append(r)
        print(f"{name}: batch {a.batch}, seq {a.seq}: base {r['base_s'] * 1e3:.1f} ms, merged "
              f"{r['merged_s'] * 1e3:.1f} ms, ratio merged/base {r['ratio']:.3f} (unmerged LoRA "
              f"{r['unmerged_s'] * 1e3:.1f} ms; merge changes logits by {r['merge_max_abs_logit_diff']:.1e})",
              flush=True)
    if a.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
