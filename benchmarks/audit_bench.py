"""Speed of ``accountant.audit`` on the configuration issue 14 names: d = 1e8 coordinates, Poisson
rate q = 0.01, T = 1000 steps, delta = 1e-10, target under one minute per configuration.

    python benchmarks/audit_bench.py [--dimension 100000000] [--only lmo|laplace] [--workers N]

Audits (one run each, the machine is shared: wall and CPU seconds are both printed, with the load
average, so a slow run on a busy machine can be told from a slow code path):
1. the published LMO-DP configuration (examples/lmo_published.json, the Exponential's lambda read as
   a scale, as its sampler draws it);
2. Laplace noise calibrated by the one-coordinate analysis to the claimed epsilon 0.3 (b = 5.7954).
For each: time, the lower bound and the k attaining it, the one-coordinate value, the Gaussian
limit and, per k, the bound of each neighbouring relation.
"""
import argparse
import json
import os
import pathlib
import time
import warnings

warnings.simplefilter("ignore")

from accountant.audit import audit  # noqa: E402
from accountant.mechanism import Mechanism  # noqa: E402
from accountant.noise import LMO, Laplace  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
Q, T, DELTA, CLAIM = 0.01, 1000, 1e-10, 0.3
LAPLACE_B = 5.7954          # calibrate(Laplace, 0.3, 1e-10, 0.01, 1000): the one-coordinate reading


def configurations(only):
    out = []
    if only in (None, "lmo"):
        cfg = json.loads((ROOT / "examples" / "lmo_published.json").read_text())
        out.append(("LMO-DP published (lambda as scale)", LMO.from_published(cfg, exp_lambda_as_scale=True)))
    if only in (None, "laplace"):
        out.append((f"Laplace b={LAPLACE_B} (1-coord. calibrated)", Laplace(LAPLACE_B)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dimension", type=int, default=100_000_000, help="coordinates d (default 1e8)")
    ap.add_argument("--only", choices=("lmo", "laplace"), help="run one configuration only")
    ap.add_argument("--workers", type=int, help="threads over k (default: the audit's, up to 2)")
    args = ap.parse_args()
    audit(Mechanism(Laplace(1.0), 1.0, "l2", Q, T), 1, DELTA)        # compile / load numba caches
    rows = []
    for name, noise in configurations(args.only):
        load = os.getloadavg()[0]
        wall, cpu = time.perf_counter(), time.process_time()
        extra = {} if args.workers is None else {"workers": args.workers}
        res = audit(Mechanism(noise, 1.0, "l2", Q, T), args.dimension, DELTA, claimed_epsilon=CLAIM, **extra)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rows.append((name, wall, cpu, load, res))
        print(f"\n{name}: d = {args.dimension:,}, q = {Q}, T = {T}, delta = {DELTA:g}")
        print(f"  {'k':>10s} {'remove':>9s} {'add':>9s}")
        for r in res.per_k:
            print(f"  {r['k']:10,d} {r['remove']:9.5f} {r['add']:9.5f}")
    print(f"\n{'configuration':40s} {'wall s':>7s} {'cpu s':>7s} {'load':>5s} {'lower':>8s} {'k':>11s} "
          f"{'1-coord':>8s} {'Gauss lim':>9s} {'< 60 s':>6s}")
    for name, wall, cpu, load, res in rows:
        print(f"{name:40s} {wall:7.1f} {cpu:7.1f} {load:5.1f} {res.lower_bound:8.5f} {res.k:11,d} "
              f"{res.one_coordinate:8.5f} {res.gaussian_limit:9.5f} {'yes' if wall < 60 else 'NO':>6s}")


if __name__ == "__main__":
    main()
