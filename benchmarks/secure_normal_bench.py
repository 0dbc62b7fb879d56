"""Cost of the Gaussian noise of one GPT-2-small full fine-tuning step (124,439,808 coordinates),
drawn in 4M-value chunks as the optimizer draws it, from three samplers:

* PCG64 + numpy's ziggurat (``Gaussian.sample`` with a seeded Generator, the experiment path);
* the former secure sampler: ChaCha20, inverse CDF (``ndtri``) of 106-bit uniforms and a sign bit,
  three 64-bit words a draw (``Noise.sample``, the generic secure path, still used by other laws);
* the secure ziggurat: ChaCha20 words into ``accountant.randomness.standard_normal`` (about 1.01
  words a draw), what ``Gaussian.sample`` now uses with ``secure=True``.

    python benchmarks/secure_normal_bench.py [--n 124439808] [--chunk 4194304] [--repeats 3] [--json]

Each sampler is timed ``--repeats`` times, interleaved so machine load hits all alike; the best
(least disturbed) time is reported with its ratio to PCG64.  Raw ChaCha20 words for the same count
are timed too: the floor any sampler on this source pays.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from accountant.noise import Gaussian, Noise
from accountant.randomness import SecureRandom, make_rng, standard_normal

GPT2_SMALL = 124_439_808
CHUNK = 4 * 1024 * 1024


def _chunked(draw, n, chunk):
    def run():
        out = np.empty(chunk)
        for k in range(0, n, chunk):
            m = min(chunk, n - k)
            out[:m] = draw(m)
    return run


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=GPT2_SMALL)
    p.add_argument("--chunk", type=int, default=CHUNK)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    gauss, seeded, secure = Gaussian(1.0), make_rng(), SecureRandom()
    runs = {
        "PCG64, numpy ziggurat": lambda m: gauss.sample(m, seeded),
        "ChaCha20, inverse CDF (former)": lambda m: Noise.sample(gauss, m, secure),
        "ChaCha20, ziggurat (now)": lambda m: standard_normal(secure, m),
        "ChaCha20 raw words only": lambda m: secure.random_raw(m),
    }
    timers = {name: _chunked(draw, a.n, a.chunk) for name, draw in runs.items()}
    standard_normal(secure, 1000)              # compile once before timing
    best = {name: float("inf") for name in timers}
    for _ in range(a.repeats):
        for name, run in timers.items():
            s = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - s)
    ref = best["PCG64, numpy ziggurat"]
    result = {"n": a.n, "chunk": a.chunk, "repeats": a.repeats, "seconds": best,
              "ratio_to_pcg64": {k: v / ref for k, v in best.items()},
              "former_over_now": best["ChaCha20, inverse CDF (former)"] / best["ChaCha20, ziggurat (now)"]}
    if a.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{a.n:,} standard normal draws in chunks of {a.chunk:,} (best of {a.repeats})")
        for name, t in best.items():
            print(f"  {name:34s} {t:7.3f} s   ratio to PCG64 {t / ref:5.2f}")
        print(f"  former secure / new secure: {result['former_over_now']:.2f}x")
    return result


if __name__ == "__main__":
    main()
