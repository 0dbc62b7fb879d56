"""Throughput of data-parallel DP fine-tuning: 2 msrun workers vs 1 process, measured in one run.

    python benchmarks/distributed_bench.py [--steps 8] [--batch 64] [--micro 16] [--method lora]

Both runs train the tiny GPT-2 (2 layers, width 128, vocabulary 5000, sequence 64) with DP-SGD
(book-keeping per-example gradients, L2 clipping, Gaussian noise of a stand-in table: timing does
not depend on the certificate) on the same synthetic token data with the same expected global batch
(Poisson sampling, rate = batch / dataset size). The first step (graph compilation) is excluded;
the launch time of msrun is reported separately. Prints seconds per step, examples per second and
the throughput ratio (2 workers / 1 process). On a machine with few cores that other jobs share the
ratio is bounded by the free cores, not by the algorithm.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def worker(args) -> None:
    sys.path.insert(0, ROOT)
    import mindspore as ms
    import numpy as np
    from mindspore import nn

    from accountant.noise import Gaussian
    from finetune.dp.distributed import Distributed, DistributedDPOptimizer, shard
    from finetune.models.gpt2 import GPT2Config, GPT2LMHeadModel
    from finetune.models.peft import apply_bitfit, apply_lora
    from finetune.dp.sampling import PoissonSampler, micro_batches

    ms.set_context(mode=ms.GRAPH_MODE)
    if args.threads:
        ms.set_context(runtime_num_threads=args.threads)
    dist = Distributed.from_env()
    cfg = GPT2Config.tiny()

    class Table:  # noise law and geometry only (what the optimizer reads)
        geometry = "l2"
        noise = Gaussian(1.0)

    n, seq = args.dataset, args.seq
    data = np.random.default_rng(0).integers(0, cfg.vocab_size, (n, seq)).astype(np.int32)
    mask = np.ones((n, seq), np.float32)
    model = GPT2LMHeadModel(cfg, seed=0)
    apply_lora(model, r=8, alpha=16) if args.method == "lora" else apply_bitfit(model)
    opt = nn.Adam(model.trainable_params(), learning_rate=1e-3)
    q = args.batch / n
    dp = DistributedDPOptimizer(opt, model, Table(), dist=dist, seed=0, max_grad_norm=1.0,
                                expected_batch_size=args.batch, per_example="bookkeeping")
    sampler = PoissonSampler(n, q, args.steps + 1, rng=dp.rng)
    times, sizes = [], []
    for idx in sampler:
        start = time.perf_counter()
        mine = shard(idx, dist)
        dp.step([([data[m.indices], mask[m.indices]], m.mask) for m in micro_batches(mine, args.micro)])
        times.append(time.perf_counter() - start)
        sizes.append(len(idx))
    dist.assert_in_sync(model.trainable_params())
    size = sum(int(np.prod(p_.shape)) for p_ in model.trainable_params()) + 3
    t0 = time.perf_counter()
    for _ in range(10):
        dist.allreduce_sum_f64(np.ones(size))
    reduce_s = (time.perf_counter() - t0) / 10
    if dist.is_main:
        per_step = float(np.mean(times[1:]))
        with open(args.out, "w") as f:
            json.dump({"workers": dist.world_size, "first_step_s": times[0], "seconds_per_step": per_step,
                       "examples_per_s": float(np.mean(sizes[1:])) / per_step,
                       "mean_global_batch": float(np.mean(sizes[1:])),
                       "allreduce_ms": 1e3 * reduce_s, "coordinates": size - 3}, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="timed steps after the compile step")
    p.add_argument("--batch", type=int, default=64, help="expected global batch (Poisson)")
    p.add_argument("--micro", type=int, default=16, help="micro-batch size per worker")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--dataset", type=int, default=2048)
    p.add_argument("--method", choices=("lora", "bitfit"), default="lora")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2,
                   help="alternating 1-process / N-worker runs (default 2); ratios per repeat")
    p.add_argument("--threads", type=int, default=0,
                   help="MindSpore runtime threads per process (default: MindSpore's choice)")
    p.add_argument("--out", help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    # workers are started as "distributed_bench.py worker ..." (a positional word: msrun would
    # take an option such as --worker for an abbreviation of its own --worker_num)
    is_worker = bool(argv) and argv[0] == "worker"
    args = p.parse_args(argv[1:] if is_worker else argv)
    if is_worker:
        worker(args)
        return 0

    import numpy as np

    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    msrun = shutil.which("msrun", path=env["PATH"])
    if msrun is None:
        sys.stderr.write("distributed_bench: error: msrun not found (install mindspore)\n")
        return 2
    common = [__file__, "worker", "--steps", str(args.steps), "--batch", str(args.batch),
              "--micro", str(args.micro), "--seq", str(args.seq), "--dataset", str(args.dataset),
              "--method", args.method, "--threads", str(args.threads)]
    runs = []  # (workers, result, wall seconds), alternating so that background load hits both
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for w in (1, args.workers):
                out = os.path.join(tmp, f"w{w}_{rep}.json")
                if w == 1:
                    cmd = [sys.executable, *common, "--out", out]
                else:
                    cmd = [msrun, f"--worker_num={w}", f"--local_worker_num={w}",
                           f"--master_port={_free_port()}", f"--log_dir={os.path.join(tmp, 'log')}",
                           "--join=True", *common, "--out", out]
                print(f"repeat {rep + 1}/{args.repeats}: {w} worker(s) ...", flush=True)
                t0 = time.perf_counter()
                r = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if r.returncode != 0:
                    sys.stderr.write(r.stderr[-3000:])
                    return 1
                with open(out) as f:
                    runs.append((w, json.load(f), wall))
    print(f"\nDP-{args.method} tiny GPT-2, seq {args.seq}, expected global batch {args.batch}, "
          f"micro-batch {args.micro}, {os.cpu_count()} CPU cores visible, "
          f"threads/process {args.threads or 'default'}")
    print(f"{'workers':>8} {'s/step':>9} {'examples/s':>11} {'first step s':>13} {'wall s':>8} "
          f"{'sum-exchange ms':>16}")
    for w, r, wall in runs:
        print(f"{w:>8} {r['seconds_per_step']:>9.3f} {r['examples_per_s']:>11.1f} "
              f"{r['first_step_s']:>13.1f} {wall:>8.1f} {r['allreduce_ms']:>16.2f}")
    print(f"({runs[0][1]['coordinates']} trained coordinates exchanged per step; 'wall' includes "
          f"process start, msrun launch and compilation)")
    try:
        print(f"load average after the runs: {os.getloadavg()[0]:.1f}")
    except OSError:
        pass
    ratios = [runs[2 * i + 1][1]["examples_per_s"] / runs[2 * i][1]["examples_per_s"]
              for i in range(args.repeats)]
    print(f"throughput ratio ({args.workers} workers / 1 process), per repeat: "
          + ", ".join(f"{x:.2f}" for x in ratios) + f"; median {float(np.median(ratios)):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
