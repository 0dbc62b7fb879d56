"""Federated DP fine-tuning (finetune.federated) against centralised DP, side by side in one run.

    python benchmarks/federated_bench.py [--eps 3] [--rounds 10] [--clients 3] [--local-steps 4]

1. A "public" base model: the tiny GPT-2 trained without DP on a public Faker corpus (seed 1), so
   that fine-tuning on the private corpus (seed 0) starts from a model that already speaks the
   template language (a random-init model gives perplexities near the vocabulary size).
2. Two certified Gaussian l2 tables at the same (epsilon, delta), with the documented command
   ``python -m accountant calibrate``: one for the federation (q = client rate 1, T = rounds), one
   for centralised DP-SGD (q = 16 / N, T = steps).
3. Runs, each its own process, one after the other on the same machine:
   federated DP-LoRA and DP-BiTFiT (``python -m finetune.federated``: K organisations, Flower gRPC on
   127.0.0.1, k local steps per round), centralised DP-LoRA and non-private LoRA
   (``python -m finetune``) with about the same number of examples seen.
4. Printed side by side: seconds per round (after the first, which includes graph compilation),
   bytes sent per round (uploads measured on Flower's messages; the full model's size is Flower's
   serialisation of all weights, computed, not run: full fine-tuning does not travel), and
   validation perplexity of every model, with the guarantee each epsilon stands for.

The two epsilons are the same number but not the same promise: client-level DP covers one whole
organisation added or removed, record-level DP one record (docs/federated.md).

    python benchmarks/federated_bench.py --client-memory tiny,small

measures instead the peak resident memory (``VmHWM``, Linux) of one organisation process in a
one-round federation (LoRA, seq-len 32, micro-batch 16) for each model, beside the estimate
``python -m finetune.federated`` uses to refuse client counts the machine cannot hold.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _run(cmd, what):
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, *map(str, cmd)], capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"{what} failed:\n{r.stderr[-3000:]}")
    print(f"  {what}: {time.perf_counter() - start:.0f} s", flush=True)
    return r.stdout


def _calibrate(path, eps, delta, q, steps):
    _run(["-m", "accountant", "calibrate", "--noise", "gaussian", "--eps", eps, "--delta", delta,
          "--sampling-rate", q, "--steps", steps, "--geometry", "l2", "--out", path],
         f"calibrate q={q:.4g} T={steps}")
    from accountant.table import load_table
    t = load_table(path)
    return t.noise.params["sigma"], t.certified_epsilon


def _full_model_bytes(model_dir) -> int:
    """Bytes of one Flower message carrying every weight of the model (ndarrays_to_parameters)."""
    from flwr.common import ndarrays_to_parameters

    from finetune.models import checkpoint
    model = checkpoint.from_pretrained(model_dir)
    arrays = [p.asnumpy() for _, p in model.parameters_and_names()]
    return sum(len(t) for t in ndarrays_to_parameters(arrays).tensors)


def _pretrain(out_dir, data, steps, seq_len, batch=16, seed=0):
    """The public base: the tiny GPT-2, all weights, non-private Adam on the public corpus
    (one fused compiled step: gradient and update in one graph)."""
    import mindspore as ms
    import numpy as np
    from mindspore import Tensor, nn

    from finetune.data import load_dataset
    from finetune.models import checkpoint
    from finetune.models.tokenizer import load_tokenizer

    ms.set_context(mode=ms.GRAPH_MODE)
    model = checkpoint.from_pretrained("tiny", seed=seed)
    ds = load_dataset(data, load_tokenizer(model.config.vocab_size), seq_len=seq_len)
    params = model.trainable_params()
    opt = nn.Adam(params, learning_rate=1e-3)

    class Step(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.model, self.opt = model, opt
            self.grad = ms.value_and_grad(self.loss, grad_position=None, weights=ms.ParameterTuple(params))

        def loss(self, ids, mask):
            return self.model.loss(ids, mask).mean()

        def construct(self, ids, mask):
            value, grads = self.grad(ids, mask)
            self.opt(grads)
            return value

    step = Step()
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        rows = rng.integers(0, len(ds.train), batch)
        step(Tensor(ds.train.ids[rows]), Tensor(ds.train.mask[rows]))
    checkpoint.save_pretrained(model, out_dir)


def _base_perplexity(model_dir, data, seq_len):
    import mindspore as ms

    from finetune.data import load_dataset
    from finetune.models import checkpoint
    from finetune.models.tokenizer import load_tokenizer
    from finetune.train import perplexity

    ms.set_context(mode=ms.GRAPH_MODE)
    model = checkpoint.from_pretrained(model_dir)
    ds = load_dataset(data, load_tokenizer(model.config.vocab_size), seq_len=seq_len)
    return perplexity(model, ds.val.ids, ds.val.mask)


def _peak_kib(pid) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmHWM")), 0)
    except OSError:
        return 0


def client_memory(models) -> None:
    """Peak memory of the organisation process of a one-round, one-organisation federation."""
    from finetune.federated.__main__ import client_memory_bytes
    from finetune.federated.client import build_model

    work = tempfile.mkdtemp(prefix="fedmem_")
    data, table = os.path.join(work, "d.jsonl"), os.path.join(work, "t.npz")
    _run(["-m", "finetune.data", "--n", 200, "--out", data], "corpus")
    _calibrate(table, 3.0, 1e-5, 1.0, 1)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print(f"{'model':8s} {'parameters':>11s} {'client peak':>12s} {'estimate':>9s} {'server peak':>12s}")
    for model in models:
        out = os.path.join(work, f"run_{model}")
        server = subprocess.Popen([sys.executable, "-m", "finetune.federated", "--clients", "1", "--rounds", "1",
                                   "--table", table, "--method", "lora", "--model", model, "--data", data,
                                   "--out", out, "--local-steps", "1", "--seq-len", "32", "--quiet"],
                                  env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        client_kib, server_kib = 0, 0
        while server.poll() is None:
            server_kib = max(server_kib, _peak_kib(server.pid))
            for pid in os.listdir("/proc"):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read()
                except OSError:
                    continue
                if pid.isdigit() and b"finetune.federated.client" in cmd:
                    client_kib = max(client_kib, _peak_kib(pid))
            time.sleep(0.2)
        if server.returncode != 0:
            sys.exit(f"federation on {model} failed:\n{server.stderr.read()[-3000:]}")
        n = sum(int(p.size) for p in build_model(model, "lora", 0).get_parameters())
        print(f"{model:8s} {n:11d} {client_kib * 1024 / 1e9:9.2f} GB {client_memory_bytes(n) / 1e9:6.2f} GB "
              f"{server_kib * 1024 / 1e9:9.2f} GB", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--client-memory", default=None, metavar="MODELS",
                   help="only measure one organisation process's peak memory for these comma-separated "
                        "models (tiny, small or directories)")
    p.add_argument("--eps", type=float, default=3.0, help="target epsilon of both runs (default 3)")
    p.add_argument("--delta", type=float, default=1e-5, help="delta (default 1e-5)")
    p.add_argument("--clients", type=int, default=3, help="organisations K (default 3)")
    p.add_argument("--rounds", type=int, default=10, help="federated rounds (default 10)")
    p.add_argument("--local-steps", type=int, default=4, help="local steps per round (default 4)")
    p.add_argument("--server-lr", type=float, default=1.0, help="server step (default 1)")
    p.add_argument("--n", type=int, default=600, help="records in the private corpus (default 600)")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per example (default 32)")
    p.add_argument("--pretrain-steps", type=int, default=300,
                   help="non-private steps of the public base model (default 300)")
    args = p.parse_args(argv)
    if args.client_memory:
        client_memory([m for m in args.client_memory.split(",") if m])
        return 0

    work = tempfile.mkdtemp(prefix="fedbench_")
    pub, priv = os.path.join(work, "public.jsonl"), os.path.join(work, "private.jsonl")
    base = os.path.join(work, "base")
    print(f"set-up in a temporary folder ({args.n} private records, tiny GPT-2)", flush=True)
    _run(["-m", "finetune.data", "--n", 2000, "--seed", 1, "--out", pub], "public corpus")
    _run(["-m", "finetune.data", "--n", args.n, "--seed", 0, "--val-fraction", 0.2, "--out", priv],
         "private corpus")
    start = time.perf_counter()
    _pretrain(base, pub, args.pretrain_steps, args.seq_len)
    print(f"  public base model ({args.pretrain_steps} non-private full steps): "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    n_train = round(args.n * 0.8)
    batch = 16
    examples = args.clients * args.local_steps * batch * args.rounds
    central_steps = max(1, examples // batch)
    q_central = batch / n_train
    fed_table, cen_table = os.path.join(work, "fed.npz"), os.path.join(work, "central.npz")
    fed_sigma, fed_eps = _calibrate(fed_table, args.eps, args.delta, 1.0, args.rounds)
    cen_sigma, cen_eps = _calibrate(cen_table, args.eps, args.delta, q_central, central_steps)

    runs = {}
    for method in ("lora", "bitfit"):
        out = os.path.join(work, f"fed_{method}")
        _run(["-m", "finetune.federated", "--clients", args.clients, "--rounds", args.rounds,
              "--client-rate", 1.0, "--table", fed_table, "--method", method, "--model", base,
              "--data", priv, "--out", out, "--local-steps", args.local_steps, "--seq-len", args.seq_len,
              "--server-lr", args.server_lr, "--quiet"], f"federated DP-{method}")
        with open(os.path.join(out, "metrics.json")) as f:
            m = json.load(f)
        with open(os.path.join(out, "federation.json")) as f:
            hist = json.load(f)["history"]
        later = [h["seconds"] for h in hist[1:]] or [hist[0]["seconds"]]
        runs[f"federated DP-{method}"] = dict(m, round_s=sum(later) / len(later),
                                              up=m["bytes_up_per_round"], down=m["bytes_down_per_round"])
    for name, extra in (("centralised DP-lora", ["--table", cen_table]),
                        ("centralised no-DP lora", ["--no-dp", "--sampling-rate", q_central,
                                                    "--steps", central_steps])):
        out = os.path.join(work, name.replace(" ", "_"))
        _run(["-m", "finetune", *extra, "--method", "lora", "--model", base, "--data", priv,
              "--out", out, "--seq-len", args.seq_len, "--quiet"], name)
        with open(os.path.join(out, "metrics.json")) as f:
            runs[name] = json.load(f)

    base_ppl = _base_perplexity(base, priv, args.seq_len)
    full_bytes = _full_model_bytes(base)
    k = args.clients
    print()
    print(f"Federation: K={k} organisations, client rate 1, {args.rounds} rounds, {args.local_steps} local "
          f"steps of expected batch {batch}; Gaussian sigma {fed_sigma:.4g} (x clip norm, on the sum; "
          f"the mean gets sigma C / K = {fed_sigma / k:.4g} C per coordinate), certified epsilon "
          f"{fed_eps:.4g} at delta {args.delta:g}")
    print(f"Centralised: q={q_central:.4g}, {central_steps} steps, Gaussian sigma {cen_sigma:.4g}, "
          f"certified epsilon {cen_eps:.4g}; {examples} examples seen in both")
    print()
    print(f"{'bytes per round':32s} {'per client up':>14s} {'all clients up':>15s} {'vs LoRA':>8s}")
    lora_up = runs["federated DP-lora"]["up"] / k
    for name, up in (("LoRA (measured)", lora_up), ("BiTFiT (measured)", runs["federated DP-bitfit"]["up"] / k),
                     ("full model (Flower serialisation)", full_bytes)):
        print(f"{name:32s} {up / 1e3:11.1f} kB {up * k / 1e3:12.1f} kB {up / lora_up:7.2f}x")
    print()
    print(f"{'run':26s} {'guarantee (neighbours)':36s} {'epsilon':>8s} {'val ppl':>9s} {'s/round':>8s}")
    print(f"{'base model (no tuning)':26s} {'-':36s} {'-':>8s} {base_ppl:9.2f} {'-':>8s}")
    for name, m in runs.items():
        fed = name.startswith("federated")
        relation = ("one organisation added/removed" if fed else
                    ("one record added/removed" if m.get("private") else "none"))
        eps = f"{m['epsilon_spent']:.4g}" if m.get("private") else "inf"
        secs = f"{m['round_s']:.2f}" if fed else f"{m['seconds_per_step']:.3f}/st"
        print(f"{name:26s} {relation:36s} {eps:>8s} {m['val_perplexity']:9.2f} {secs:>8s}")
    c, f_ = runs["centralised DP-lora"]["val_perplexity"], runs["federated DP-lora"]["val_perplexity"]
    print(f"\nval perplexity, federated DP-LoRA / centralised DP-LoRA at the same epsilon: {f_ / c:.3f}")
    print(f"(outputs left in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
