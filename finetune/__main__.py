"""``python -m finetune``: DP (or non-private) LoRA / BiTFiT / full fine-tuning of GPT-2.

    python -m finetune --table noise.npz --method lora --model tiny --data data.jsonl --out runs/x

Writes to ``--out``: ``adapter.safetensors`` (LoRA / BiTFiT: only the trained tensors) or
``model.safetensors`` + ``config.json`` (full), ``ledger.json`` (the privacy ledger) and
``metrics.json``.  User mistakes end with a one-line error and exit code 2.

Data parallel: the same command under MindSpore's launcher trains one model on N workers::

    msrun --worker_num=2 --local_worker_num=2 --join=True python -m finetune --table ... --out ...

msrun starts the command N + 1 times (N workers and a scheduler). ``run`` calls
``finetune.dp.distributed.Distributed.from_env()`` before any other MindSpore work: the scheduler
serves the cluster inside it and ends there; the workers share the global Poisson batch and the
noise draw (``finetune.train.train(dist=...)``), so there is one release, charged in the ledger at
the global rate q, and only rank 0 writes ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

PROG = "python -m finetune"


class UserError(Exception):
    """A mistake in the command line or the inputs: one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        sys.stderr.write(f"{PROG}: error: {message}\n")
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Differentially private fine-tuning of GPT-2 (MindSpore) with noise drawn from a "
                    "certified noise table. The table fixes the noise law, the clipping geometry "
                    "(l2 or l1), the Poisson sampling rate q and the number of steps T; the run uses "
                    "them (expected batch size q x dataset size) and stops before the certified "
                    "budget would be exceeded.",
        epilog="Outputs in --out: adapter.safetensors (lora/bitfit) or model.safetensors + "
               "config.json (full), ledger.json, metrics.json.")
    p.add_argument("--table", help="certified noise table (.npz, table format v1); required unless "
                                   "--no-dp is given with --sampling-rate and --steps")
    p.add_argument("--method", required=True, choices=("lora", "bitfit", "full"),
                   help="what to train: LoRA adapters, biases only (BiTFiT), or all weights")
    p.add_argument("--model", required=True,
                   help="'tiny' or 'small' (random init) or a directory with config.json and "
                        "model.safetensors / model.ckpt (Hugging Face GPT-2 layout)")
    p.add_argument("--data", required=True, help="jsonl corpus, one {'text': ...} per line "
                                                 "(python -m finetune.data writes one)")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--no-dp", action="store_true",
                   help="same pipeline without clipping and noise (non-private baseline)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for sampling and noise (default 0; ignored with --secure)")
    p.add_argument("--secure", action="store_true",
                   help="draw sampling and noise from a CSPRNG keyed by the OS (not reproducible)")
    p.add_argument("--per-example", default="auto", choices=("auto", "vmap", "bookkeeping"),
                   help="per-example gradient method (default auto: book-keeping when every "
                        "trained parameter is in a Linear/LayerNorm/LoRA layer)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps (at most the table's T; default T)")
    p.add_argument("--steps", type=int, default=None, help="number of steps for --no-dp without a table")
    p.add_argument("--sampling-rate", type=float, default=None,
                   help="Poisson rate; must equal the table's (default: the table's)")
    p.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="per-example clipping norm C, in the table's geometry (default 1.0)")
    p.add_argument("--micro-batch", type=int, default=16,
                   help="fixed micro-batch size; Poisson batches are split and padded (default 16)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per example (default 64)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="validation share when the jsonl has no 'split' field (default 0.1)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    p.add_argument("--lora-targets", default="c_attn",
                   help="comma-separated regular expressions of Linear layers to adapt (default c_attn)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _check_args(args) -> None:
    if args.lr <= 0 or not math.isfinite(args.lr):
        raise UserError(f"--lr must be a positive number, got {args.lr}")
    if args.max_grad_norm <= 0 or not math.isfinite(args.max_grad_norm):
        raise UserError(f"--max-grad-norm must be a positive number, got {args.max_grad_norm}")
    if args.micro_batch < 1:
        raise UserError(f"--micro-batch must be >= 1, got {args.micro_batch}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.seq_len < 2:
        raise UserError(f"--seq-len must be >= 2, got {args.seq_len}")
    if args.table is None and not (args.no_dp and args.sampling_rate and args.steps):
        raise UserError("--table is required (only --no-dp may replace it with --sampling-rate "
                        "and --steps)")
    if args.table is not None and args.steps is not None:
        raise UserError("--steps is for --no-dp without a table; with a table use --max-steps")
    if not os.path.isfile(args.data):
        raise UserError(f"--data: no such file: {args.data}")
    if args.table is not None and not os.path.isfile(args.table):
        raise UserError(f"--table: no such file: {args.table}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out exists and is not a directory: {args.out}")


def run(args) -> dict:
    """Everything after argument parsing; raises UserError for user mistakes."""
    _check_args(args)
    from .dp.distributed import Distributed, DistributedError

    # First MindSpore work: under msrun this joins the cluster (the scheduler process ends here).
    try:
        dist = Distributed.from_env()
    except (DistributedError, RuntimeError) as e:
        raise UserError(f"cannot join the msrun cluster: {e}") from None
    import mindspore as ms

    from accountant.table import TableError, load_table

    from .models import checkpoint, peft
    from .data import DataError, load_dataset
    from .dp.optimizer import GeometryError
    from .dp.guard import TableMismatchError
    from .models.tokenizer import load_tokenizer
    from .train import train

    table = None
    if args.table is not None:
        try:
            table = load_table(args.table)
        except (TableError, OSError, ValueError) as e:
            raise UserError(f"cannot use noise table {args.table}: {e}") from None
    try:
        model = checkpoint.from_pretrained(args.model, seed=args.seed)
    except (checkpoint.CheckpointError, OSError) as e:
        raise UserError(f"cannot load model {args.model}: {e}") from None
    try:
        tokenizer = load_tokenizer(model.config.vocab_size)
    except ValueError as e:
        raise UserError(f"no tokenizer for vocabulary size {model.config.vocab_size}: {e}") from None
    if args.seq_len > model.config.n_positions:
        raise UserError(f"--seq-len {args.seq_len} exceeds the model's n_positions "
                        f"{model.config.n_positions}")
    try:
        data = load_dataset(args.data, tokenizer, seq_len=args.seq_len,
                            val_fraction=args.val_fraction, seed=args.seed)
    except (DataError, OSError, ValueError) as e:
        raise UserError(f"cannot load data {args.data}: {e}") from None
    try:
        if args.method == "lora":
            targets = tuple(t for t in args.lora_targets.split(",") if t)
            peft.apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, targets=targets,
                            seed=args.seed)
        elif args.method == "bitfit":
            peft.apply_bitfit(model)
    except peft.AdapterError as e:
        raise UserError(str(e)) from None

    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        result = train(model, data.train.ids, data.train.mask, data.val.ids, data.val.mask,
                       table=table, private=not args.no_dp, lr=args.lr,
                       max_grad_norm=args.max_grad_norm, sampling_rate=args.sampling_rate,
                       steps=args.max_steps if table is not None else args.steps,
                       micro_batch_size=args.micro_batch, per_example=args.per_example,
                       seed=args.seed, secure=args.secure, progress=not args.quiet, dist=dist)
    except (TableMismatchError, GeometryError, DistributedError) as e:
        raise UserError(str(e)) from None
    except ValueError as e:
        if "book-keeping" in str(e):
            raise UserError(str(e)) from None
        raise

    metrics = _write_outputs(args, model, data, result, write=dist.is_main)
    return metrics


def _sha256(path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_outputs(args, model, data, result, write: bool = True) -> dict:
    """The run's metrics; with ``write`` (rank 0 only under msrun) also write the weights,
    ``ledger.json`` and ``metrics.json`` to ``--out``."""
    from .models import checkpoint, peft

    if not write:
        weights = "model.safetensors" if args.method == "full" else "adapter.safetensors"
    elif args.method == "full":
        os.makedirs(args.out, exist_ok=True)
        weights = checkpoint.save_pretrained(model, args.out)
    else:
        os.makedirs(args.out, exist_ok=True)
        weights = os.path.join(args.out, "adapter.safetensors")
        peft.save_adapter(model, weights)
    metrics = dict(result.metrics)
    metrics.update(method=args.method, per_example=result.optimizer.method, model=args.model,
                   table=os.path.basename(args.table) if args.table else None,
                   n_train=len(data.train), n_val=len(data.val), seed=None if args.secure else args.seed,
                   weights=os.path.basename(weights),
                   # the corpus, so python -m finetune.evaluate --run finds it and notices a change
                   data=os.path.abspath(args.data), data_sha256=_sha256(args.data))
    metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
               for k, v in metrics.items()}
    if write:
        if result.guard is not None:
            with open(os.path.join(args.out, "ledger.json"), "w") as f:
                f.write(result.guard.ledger.to_json())
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1, default=str)
    metrics["_wrote"] = bool(write)
    return metrics


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        metrics = run(args)
    except UserError as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return 2
    eps_txt = (f"epsilon {metrics['epsilon_spent']:.4g} (delta {metrics['delta']:g})"
               if metrics["private"] else "no DP")
    where = f"wrote {args.out}" if metrics.pop("_wrote", True) else "rank 0 writes the outputs"
    val = metrics["val_perplexity"]
    print(f"{metrics['steps']} steps, {eps_txt}, train perplexity {metrics['train_perplexity']:.2f}, "
          f"val perplexity {'n/a' if val is None else f'{val:.2f}'}, "
          f"{metrics['seconds_per_step']:.3f} s/step; {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
