"""``python -m finetune``: DP (or non-private) LoRA / BiTFiT / norm-only / adapter / full fine-tuning
of GPT-2 and of Llama-family models (Llama, Qwen2, Mistral checkpoints).

    python -m finetune --table noise.npz --method lora --model tiny --data data.jsonl --out runs/x

``--model`` is a preset (``tiny``, ``small``, ``llama-tiny``, ``llama-100m``; random init) or a Hugging
Face checkpoint folder, loaded by ``finetune.models.checkpoint.from_pretrained`` on its
``config.json``'s ``model_type``. Tokenizer: GPT-2's BPE for GPT-2 and for the presets (cut to the
model's vocabulary, ``finetune.models.tokenizer``); a Llama-family folder's own ``tokenizer.json``.
A full fine-tuning run of a Llama-family model writes that tokenizer beside its weights, so the run
folder is itself a checkpoint.

Writes to ``--out``: ``adapter.safetensors`` (LoRA / BiTFiT: only the trained tensors) or
``model.safetensors`` + ``config.json`` (full), ``ledger.json`` (the privacy ledger),
``metrics.json`` and ``checkpoint.safetensors`` (the last training checkpoint).  User mistakes end
with a one-line error and exit code 2.

Privacy unit: ``--privacy-unit person --max-records-per-unit M`` protects every record of a person
(units from the data's ``user`` field, else its ``people``; ``finetune.dp.units``): persons are
sampled at the table's rate and each person's summed gradient over at most M records is clipped as
one.  Records naming several people need ``--multi-owner drop|record-sampling``.  Every private run
reports ``person_epsilon``, ``person_k`` and ``person_method`` (no number when none is sound).

Randomness: the Poisson sampler and the noise come from ChaCha20 keyed with fresh OS entropy
(``accountant.randomness.SecureRandom``; a resumed run is re-keyed).  ``--seed N`` makes them
reproducible by anyone who knows ``N`` and prints a warning.  Model and LoRA initialisation and the
train/validation split use ``--seed`` if given, else the fixed public seed :data:`INIT_SEED`.

What a run writes and prints holds no statistic of the private data (loss, realised batch sizes,
perplexities: the epsilon does not cover them) unless ``--log-private-stats`` is given.

The run is a transaction (``finetune.run_dir``): it is staged in the hidden sibling
``.OUT.partial`` and renamed to ``--out`` when complete.  An existing ``--out`` is refused unless
``--overwrite`` (it is replaced only when the new run finishes) or ``--resume``.  Checkpoints
(``finetune.checkpointing``) are written every ``--checkpoint-every`` steps (default: every
``--checkpoint-minutes`` 5 of wall time), at the end and on SIGINT/SIGTERM, which leave the run in
``.OUT.partial``, print how to continue and exit 130 / 143::

    python -m finetune --resume runs/x      # the saved arguments; the same table, data and method

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
import re
import sys
import warnings

from .checkpointing import file_sha256
from .cli import Interrupted, OneLineParser as _Parser, UserError, run_guarded

PROG = "python -m finetune"

#: public seed of model / LoRA initialisation and of the train/validation split without --seed
#: (they do not depend on the private data; the sampling and the noise never use it)
INIT_SEED = 0

#: the privacy unit and the person-level report, in metrics.json and ledger.json
PERSON_KEYS = ("privacy_unit", "n_units", "max_records_per_unit", "person_epsilon", "person_k",
               "person_method", "record_epsilon")

#: flags that may be given again with --resume (everything else comes from the checkpoint)
#: --method -> what finetune.models.peft applies ("full": nothing)
METHOD_CHOICES = ("lora", "bitfit", "norm-only", "adapters", "full")

#: presets of finetune.models.checkpoint.from_pretrained (names, not paths)
PRESETS = ("tiny", "small", "llama-tiny", "llama-100m")

RESUME_FLAGS = {"resume", "quiet", "checkpoint_every", "checkpoint_minutes", "table", "data", "method"}


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
    p.add_argument("--method", choices=METHOD_CHOICES,
                   help="what to train: LoRA adapters, biases only (BiTFiT; Llama and Mistral have "
                        "none), RMSNorm gains only (norm-only; Llama family), Houlsby bottleneck "
                        "adapters (adapters), or all weights (required)")
    p.add_argument("--model",
                   help="a preset ('tiny', 'small': GPT-2; 'llama-tiny', 'llama-100m': Llama; random "
                        "init) or a Hugging Face checkpoint folder: config.json with model_type gpt2, "
                        "llama, qwen2 or mistral, and model.safetensors (GPT-2 also model.ckpt); a "
                        "Llama-family folder also needs its tokenizer.json (required)")
    p.add_argument("--data", help="jsonl corpus, one {'text': ...} per line "
                                  "(python -m finetune.data writes one) (required)")
    p.add_argument("--out", help="output directory; must not exist unless --overwrite (required)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out when this run finishes (kept until then; an "
                        "unfinished run into it is discarded)")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the interrupted run DIR with its saved arguments (no other flag "
                        "needed; --table/--data/--method, if given, must be the run's)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS",
                   help="write a checkpoint every STEPS steps (default: by wall time, see "
                        "--checkpoint-minutes; always at the end and on SIGINT/SIGTERM)")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0,
                   help="wall time between checkpoints when --checkpoint-every is not given "
                        "(default 5)")
    p.add_argument("--no-dp", action="store_true",
                   help="same pipeline without clipping and noise (non-private baseline)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=None,
                   help="make sampling and noise reproducible from this seed (experiments only: "
                        "anyone who knows it can replay the run, the epsilon then does not hold "
                        "against them; prints a warning). Default: fresh OS entropy, noise and "
                        "sampling from ChaCha20. Model/LoRA init and the train/validation split "
                        f"use it too, else the fixed public seed {INIT_SEED} (not "
                        "privacy-relevant)")
    p.add_argument("--secure", action="store_true",
                   help="sampling and noise from ChaCha20 keyed by the OS: the default; cannot be "
                        "combined with --seed")
    p.add_argument("--log-private-stats", action="store_true",
                   help="also show and record statistics of the private data that the epsilon "
                        "does not cover: per-step loss and batch size (progress bar, checkpoint), "
                        "mean batch size, final train loss, train and validation perplexity "
                        "(metrics.json); off by default")
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
    p.add_argument("--lora-targets", default=None,
                   help="comma-separated regular expressions of Linear layers to adapt (default "
                        "c_attn for GPT-2, q_proj,v_proj for the Llama family)")
    p.add_argument("--adapter-size", type=int, default=16,
                   help="bottleneck units of each Houlsby adapter (--method adapters; default 16)")
    p.add_argument("--privacy-unit", choices=("record", "person"), default="record",
                   help="what the epsilon protects: one record (default) or all records of one person "
                        "(units from the data's 'user' field, else its 'people'); a person-level run "
                        "samples persons at the table's rate q (q = expected persons per step / persons)")
    p.add_argument("--max-records-per-unit", type=int, default=None, metavar="M",
                   help="person-level run: at most M records of a sampled person are used in a step, "
                        "their summed gradient clipped as one (required with --privacy-unit person)")
    p.add_argument("--multi-owner", choices=("record-sampling", "drop"), default=None,
                   help="person-level run over records naming several people: 'record-sampling' (every "
                        "record, record-level sampling and person-level accounting) or 'drop' (only the "
                        "records naming one person, person units)")
    p.add_argument("--person-cap", type=int, default=None, metavar="K",
                   help="declared public bound on the records naming one person for the person-level "
                        "epsilon of a record-level run (refused if a person exceeds it; default: the "
                        "largest count in the training data)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _given_flags(argv) -> set:
    """The destinations of the flags actually given on the command line."""
    p = _parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def _check_args(args) -> None:
    missing = [f"--{k}" for k in ("method", "model", "data", "out") if getattr(args, k) is None]
    if missing:
        raise UserError(f"the following arguments are required: {', '.join(missing)} "
                        "(or --resume DIR)")
    if args.seed is not None and args.secure:
        raise UserError("--seed and --secure exclude each other: the secure generator (the "
                        "default) cannot be seeded")
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
    _check_unit_args(args)
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise UserError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    if not (args.checkpoint_minutes > 0 and math.isfinite(args.checkpoint_minutes)):
        raise UserError(f"--checkpoint-minutes must be a positive number, got {args.checkpoint_minutes}")
    if args.adapter_size < 1:
        raise UserError(f"--adapter-size must be >= 1, got {args.adapter_size}")
    for target in (args.lora_targets or "").split(","):
        try:
            re.compile(target)
        except re.error as e:
            raise UserError(f"--lora-targets: {target!r} is not a regular expression ({e})") from None


def _check_unit_args(args) -> None:
    """The privacy-unit flags fit together (one line each)."""
    unit = getattr(args, "privacy_unit", "record")
    m, multi, cap = (getattr(args, k, None) for k in ("max_records_per_unit", "multi_owner", "person_cap"))
    if unit == "record" and (m is not None or multi is not None):
        raise UserError("--max-records-per-unit and --multi-owner are for --privacy-unit person")
    if unit == "person" and args.no_dp:
        raise UserError("--privacy-unit person with --no-dp: a non-private run has no privacy unit")
    if m is not None and m < 1:
        raise UserError(f"--max-records-per-unit must be >= 1, got {m}")
    if unit == "person" and multi != "record-sampling" and m is None:
        raise UserError("--privacy-unit person needs --max-records-per-unit M (the most records of one "
                        "person used in a step)")
    if unit == "person" and multi == "record-sampling" and m is not None:
        raise UserError("--multi-owner record-sampling samples records, not persons: drop "
                        "--max-records-per-unit")
    if cap is not None and cap < 1:
        raise UserError(f"--person-cap must be >= 1, got {cap}")
    if cap is not None and unit == "person" and multi != "record-sampling":
        raise UserError("--person-cap bounds the records of a person in a record-level run; a person-unit "
                        "run bounds them with --max-records-per-unit")


def _person_plan(args, data, dist):
    """(training data, unit layout or None, per-record persons or None) of the run's privacy unit."""
    from .data import DataError, record_people
    from .dp.units import UnitConfigError, UnitLayout, corpus_units, person_counts

    unit = getattr(args, "privacy_unit", "record")
    records = data.train.records
    try:
        people = record_people(records)
    except DataError as e:   # a record with PII but nobody named: no person report, no person units
        if unit == "person":
            raise UserError(str(e)) from None
        people = None
    source = "user" if records and all(r.get("user") is not None for r in records) else "people"
    try:
        plan = corpus_units(people, unit, getattr(args, "multi_owner", None), source=source)
    except UnitConfigError as e:
        raise UserError(str(e)) from None
    cap = getattr(args, "person_cap", None)
    if plan.record_people is not None and cap is not None:
        most = max(person_counts(plan.record_people).values(), default=0)
        if most > cap:
            raise UserError(f"a person is named in {most} training records, more than --person-cap {cap}")
    if plan.unit_ids is None:
        return data, None, plan.record_people
    if dist.world_size > 1:
        raise UserError("--privacy-unit person runs in one process (not under msrun)")
    if plan.note:
        sys.stderr.write(f"{PROG}: person units from '{plan.source}': {plan.note}\n")
    from .data import Dataset, EncodedSplit

    tr = data.train
    train = EncodedSplit(tr.ids[plan.keep], tr.mask[plan.keep], [tr.records[i] for i in plan.keep],
                         tr.n_truncated)
    return Dataset(train, data.val), UnitLayout(plan.unit_ids, args.max_records_per_unit), None


def _person_metrics(args, result, units, record_people) -> dict:
    """person_epsilon, person_k, person_method (and the unit) of a finished run; None and why when
    no sound number is available."""
    from .dp.units import person_report

    guard = result.guard
    out = {"privacy_unit": "record" if units is None else "person",
           "n_units": None if units is None else units.n_units,
           "max_records_per_unit": None if units is None else units.max_rows_per_unit}
    if guard is None:
        return out | {"person_epsilon": None, "person_k": None, "person_method": "non-private run",
                      "record_epsilon": None}
    released = guard.release.with_steps(max(1, guard._releases(guard.steps_taken)))  # charged so far
    report = person_report(guard.epsilon_spent(), released, guard.delta,
                           unit="record" if units is None else "person", sampling="poisson",
                           record_people=record_people, person_cap=getattr(args, "person_cap", None))
    return out | report


def _prepare_resume(args, given):
    """The saved run's arguments (with the few flags that may change) and its checkpoint."""
    from .checkpointing import CheckpointFileError, load_checkpoint
    from .run_dir import RunDirError, RunDirectory

    try:
        run_dir = RunDirectory.for_resume(args.resume)
        arrays, state = load_checkpoint(run_dir.checkpoint_to_resume)
    except (RunDirError, CheckpointFileError) as e:
        raise UserError(str(e)) from None
    run = state.get("run") or {}
    saved = dict(run.get("args") or {})
    if not saved:
        raise UserError(f"{run_dir.checkpoint_to_resume} does not record the run's arguments")
    if saved.pop("secure", False):  # saved by an earlier version: --secure beside a default seed
        saved["seed"] = None
    if run_dir.overwrite and not run.get("overwrite"):
        raise UserError(f"both {str(run_dir.out)!r} and the unfinished run {str(run_dir.staging)!r} "
                        "exist and that run was not started with --overwrite; remove the one you "
                        "do not want")
    fixed = sorted(k for k in given - RESUME_FLAGS)
    if fixed:
        raise UserError(f"--{fixed[0].replace('_', '-')} cannot change on --resume: the run "
                        "continues with its saved arguments")
    if "method" in given and args.method != saved["method"]:
        raise UserError(f"--method {args.method} differs from the run's method {saved['method']}; "
                        "a resumed run keeps its method")
    for what in ("table", "data"):
        want = run.get(f"{what}_sha256")
        if what in given and getattr(args, what) is not None:
            if not os.path.isfile(getattr(args, what)):
                raise UserError(f"--{what}: no such file: {getattr(args, what)}")
            if file_sha256(getattr(args, what)) != want:
                raise UserError(f"--{what} {getattr(args, what)} is not the file the run was "
                                f"trained with (sha256 differs); a resumed run keeps its {what}")
            saved[what] = os.path.abspath(getattr(args, what))
        elif saved.get(what) is not None:
            if not os.path.isfile(saved[what]):
                raise UserError(f"the run's {what} file {saved[what]} is gone; pass --{what} with "
                                "the same file")
            if file_sha256(saved[what]) != want:
                raise UserError(f"the run's {what} file {saved[what]} changed since the run "
                                f"started (sha256 differs); a resumed run needs the same {what}")
    saved.update(resume=args.resume, quiet=args.quiet, out=str(run_dir.out),
                 overwrite=run_dir.overwrite)
    for k in ("checkpoint_every", "checkpoint_minutes"):
        if k in given:
            saved[k] = getattr(args, k)
    merged = argparse.Namespace(**{**vars(args), **saved})
    return merged, run_dir, (arrays, state)


def _preflight_table(table) -> None:
    """Refuse a table before any work if its certificate does not hold: its re-certified epsilon
    must not exceed its claim (``accountant.table.verify_claim``), so it affords its steps."""
    from accountant import table as table_module

    verify = getattr(table_module, "verify_claim", None)
    if verify is not None:
        check = verify(table)
        if not check.matches:
            raise UserError(f"{check.message}; refusing to train with it")
        return
    _single_step_check(table)  # pragma: no cover - older accountant without verify_claim


def _single_step_check(table) -> None:
    """Hook for tables whose claim cannot be re-certified: one step must fit the budget."""
    from accountant.certify import certify

    from .dp.guard import certified_epsilon

    one = certify(table.mechanism(sensitivity=1.0, steps=1), table.delta).epsilon
    if one > certified_epsilon(table):
        raise UserError(f"the table cannot afford a single step: one step costs epsilon {one:.4g}, "
                        f"more than its budget {certified_epsilon(table):.4g}")


def run(args, given=None, stopper=None) -> dict:
    """Everything after argument parsing; raises UserError for user mistakes."""
    from accountant.output_path import OutputPathError  # noqa: F401 - light import, fails early

    from .run_dir import RunDirError, RunDirectory

    given = set(given or ())
    resume = None
    if args.resume is not None:
        args, run_dir, resume = _prepare_resume(args, given)
    else:
        _check_args(args)
        try:
            run_dir = RunDirectory.for_new_run(args.out, overwrite=args.overwrite)
        except RunDirError as e:
            raise UserError(str(e)) from None
    if resume is not None:
        _check_args(args)
    if args.seed is not None:
        from .cli import warn_known_seed
        warn_known_seed(PROG, args.seed)
    if args.log_private_stats:
        sys.stderr.write(f"{PROG}: warning: --log-private-stats: the loss, batch sizes and "
                         "perplexities shown and recorded are statistics of the private data that "
                         "the epsilon does not cover\n")
    init_seed = INIT_SEED if args.seed is None else args.seed
    stop = stopper.event if stopper is not None else None
    from .dp.distributed import Distributed, DistributedError

    # First MindSpore work: under msrun this joins the cluster (the scheduler process ends here).
    try:
        dist = Distributed.from_env()
    except (DistributedError, RuntimeError) as e:
        raise UserError(f"cannot join the msrun cluster: {e}") from None
    if resume is not None and dist.world_size > 1:
        raise UserError("--resume under msrun is not supported; resume with one process "
                        "(python -m finetune --resume DIR): it continues the same global batches")
    import mindspore as ms

    from accountant.table import TableError, load_table

    from .models import checkpoint, peft
    from .data import DataError, load_dataset
    from .dp.optimizer import GeometryError
    from .dp.guard import PrivacyBudgetExceeded, TableMismatchError
    from .dp.per_example import BookkeepingError
    from .engine import EngineConfigError
    from .train import TrainingInterrupted, train
    from accountant.randomness import KnownSeedWarning

    table = None
    if args.table is not None:
        try:
            table = load_table(args.table)
        except (TableError, OSError, ValueError) as e:
            raise UserError(f"cannot use noise table {args.table}: {e}") from None
        if not args.no_dp:
            _preflight_table(table)
    try:
        model = checkpoint.from_pretrained(args.model, seed=init_seed)
    except (checkpoint.CheckpointError, OSError) as e:
        raise UserError(f"cannot load model {args.model}: {e}") from None
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # a malformed config.json
        raise UserError(f"cannot load model {args.model}: invalid config.json "
                        f"({type(e).__name__}: {e})") from None
    tokenizer = _tokenizer(args.model, model)
    n_positions = _max_positions(model.config)
    if args.seq_len > n_positions:
        raise UserError(f"--seq-len {args.seq_len} exceeds the model's n_positions {n_positions}")
    try:
        data = load_dataset(args.data, tokenizer, seq_len=args.seq_len,
                            val_fraction=args.val_fraction, seed=init_seed)
    except (DataError, OSError, ValueError) as e:
        raise UserError(f"cannot load data {args.data}: {e}") from None
    data, units, record_people = _person_plan(args, data, dist)
    try:
        if args.method == "lora":
            targets = tuple(t for t in (args.lora_targets or "").split(",") if t) or None
            peft.apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, targets=targets,
                            seed=init_seed)
        elif args.method == "bitfit":
            peft.apply_bitfit(model)
        elif args.method == "norm-only":
            peft.apply_norm_only(model)
        elif args.method == "adapters":
            peft.apply_adapters(model, size=args.adapter_size, seed=init_seed)
    except peft.AdapterError as e:
        raise UserError(str(e)) from None
    if stop is not None and stop.is_set():  # interrupted before anything was written
        raise Interrupted("interrupted before training started; nothing was written",
                          stopper.exit_code)

    run_info = _run_info(args, resume)
    write = dist.is_main
    if write:
        run_dir.begin()
    ckpt = _checkpoint_writer(run_dir, run_info) if write else None

    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        with warnings.catch_warnings():  # the --seed warning was printed above, in one line
            warnings.simplefilter("ignore", KnownSeedWarning)
            result = train(model, data.train.ids, data.train.mask, data.val.ids, data.val.mask,
                           table=table, private=not args.no_dp, lr=args.lr,
                           max_grad_norm=args.max_grad_norm, sampling_rate=args.sampling_rate,
                           steps=args.max_steps if table is not None else args.steps,
                           micro_batch_size=args.micro_batch, per_example=args.per_example,
                           seed=args.seed, secure=args.seed is None, progress=not args.quiet,
                           dist=dist, resume=resume, checkpoint=ckpt,
                           checkpoint_every=args.checkpoint_every,
                           checkpoint_seconds=60.0 * args.checkpoint_minutes, stop_event=stop,
                           evaluate=args.log_private_stats,
                           log_private_stats=args.log_private_stats, units=units)
    except TrainingInterrupted as e:
        eps = "not private" if e.epsilon is None else f"epsilon spent {e.epsilon:.4g}"
        kept = (f"; {run_dir.out} keeps the previous run until this one finishes"
                if run_dir.out.exists() else "")
        raise Interrupted(f"interrupted after {e.steps} steps, {eps}; the unfinished run (checkpoint "
                          f"and ledger) is in {run_dir.staging}{kept}; resume with: "
                          f"{PROG} --resume {run_dir.out}",
                          stopper.exit_code if stopper is not None else 130) from None
    except (TableMismatchError, GeometryError, DistributedError, PrivacyBudgetExceeded,
            ValueError) as e:
        user_error = (isinstance(e, (TableMismatchError, GeometryError, DistributedError,
                                     PrivacyBudgetExceeded, BookkeepingError, EngineConfigError))
                      or resume is not None)
        if not user_error:
            raise
        if write and resume is None:  # nothing was trained: leave nothing behind
            import shutil
            shutil.rmtree(run_dir.staging, ignore_errors=True)
        raise UserError(str(e) if resume is None else f"cannot resume {args.resume}: {e}") from None

    result.metrics.update(_person_metrics(args, result, units, record_people))
    metrics = _write_outputs(args, model, data, result, run_dir, run_info, write=write)
    if write:
        try:
            run_dir.publish()
        except RunDirError as e:
            raise UserError(str(e)) from None
    metrics["_out"] = str(run_dir.out)
    return metrics


def _is_llama_family(model) -> bool:
    return getattr(model.config, "model_type", "gpt2") != "gpt2"


def _max_positions(config) -> int:
    """Longest sequence the model takes (GPT-2 ``n_positions``, Llama ``max_position_embeddings``)."""
    return getattr(config, "n_positions", None) or config.max_position_embeddings


def _tokenizer(model_arg: str, model):
    """The run's tokenizer: a Llama-family checkpoint folder's own ``tokenizer.json``; else (GPT-2,
    and the random-init presets) GPT-2's BPE cut to the model's vocabulary. Every id it can emit,
    and the end-of-sequence and padding ids, must be rows of the model's embedding."""
    from .models.tokenizer import TokenizerError, load_tokenizer, load_tokenizer_from_dir

    vocab = model.config.vocab_size
    if _is_llama_family(model) and os.path.isdir(model_arg):
        try:
            tok = load_tokenizer_from_dir(model_arg)
        except TokenizerError as e:
            raise UserError(str(e)) from None
        if tok.eos_id is None:
            raise UserError(f"{model_arg}: the tokenizer names no end-of-sequence token (eos_token in "
                            "tokenizer_config.json or eos_token_id in config.json)")
        size = tok._tok.get_vocab_size(with_added_tokens=True)
        if size > vocab:
            raise UserError(f"{model_arg}: tokenizer.json has {size} tokens but the model's "
                            f"vocab_size is {vocab}")
        return tok
    try:
        return load_tokenizer(vocab)
    except ValueError as e:
        raise UserError(f"no tokenizer for vocabulary size {vocab}: {e}") from None


def _save_tokenizer(model_arg: str, model, directory: str) -> None:
    """Put the run's tokenizer beside a full Llama-family checkpoint: the base folder's tokenizer
    files, or (a preset) GPT-2's BPE as ``tokenizer.json`` with its end-of-sequence token."""
    import shutil

    from .export import TOKENIZER_FILES
    from .models.tokenizer import EOS_TOKEN, load_tokenizer

    if os.path.isdir(model_arg):
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(model_arg, name)):
                shutil.copyfile(os.path.join(model_arg, name), os.path.join(directory, name))
        return
    load_tokenizer(model.config.vocab_size)._tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN}, f, indent=2)
        f.write("\n")


def _run_info(args, resume) -> dict:
    """What a checkpoint records about the run: its arguments (paths made absolute) and the
    sha256 of its table and data files."""
    if resume is not None:
        info = dict(resume[1]["run"])
        info["args"] = dict(info["args"], table=args.table, data=args.data)
        return info
    saved = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite", "quiet", "secure")}
    for k in ("table", "data"):
        if saved.get(k) is not None:
            saved[k] = os.path.abspath(saved[k])
    if saved.get("model") not in PRESETS:
        saved["model"] = os.path.abspath(saved["model"])
    saved["out"] = os.path.abspath(args.out)
    return {"args": saved, "table_sha256": file_sha256(args.table) if args.table else None,
            "data_sha256": file_sha256(args.data), "overwrite": bool(args.overwrite)}


def _checkpoint_writer(run_dir, run_info):
    from .run_dir import CHECKPOINT_NAME, atomic_write

    def write(engine, state, reason):
        engine.save(run_dir.path(CHECKPOINT_NAME), extra=dict(state, run=run_info, reason=reason),
                    overwrite=True)
        if engine.guard.ledger is not None:   # the privacy record, readable beside it
            atomic_write(run_dir.path("ledger.json"), engine.guard.ledger.to_json().encode())
    return write


def _write_outputs(args, model, data, result, run_dir, run_info, write: bool = True) -> dict:
    """The run's metrics; with ``write`` (rank 0 only under msrun) also write the weights,
    ``ledger.json`` and ``metrics.json`` to the staging folder of ``--out``."""
    from .models import checkpoint, peft
    from .run_dir import METRICS_NAME, atomic_write

    if not write:
        weights = "model.safetensors" if args.method == "full" else "adapter.safetensors"
    elif args.method == "full":
        weights = checkpoint.save_pretrained(model, run_dir.staging)
        if _is_llama_family(model):  # the run folder is a checkpoint, tokenizer included
            _save_tokenizer(args.model, model, run_dir.staging)
    else:
        weights = os.path.join(run_dir.staging, "adapter.safetensors")
        peft.save_adapter(model, weights)
    from .train import PRIVATE_STATS

    metrics = {k: v for k, v in result.metrics.items()
               if args.log_private_stats or k not in PRIVATE_STATS}
    metrics.update(method=args.method, per_example=result.optimizer.method, model=args.model,
                   table=os.path.basename(args.table) if args.table else None,
                   table_sha256=run_info["table_sha256"],
                   data=run_info["args"]["data"], data_sha256=run_info["data_sha256"],
                   n_train=len(data.train), n_val=len(data.val),
                   init_seed=INIT_SEED if args.seed is None else args.seed,
                   weights=os.path.basename(weights), run_args=run_info["args"])
    if args.seed is not None:  # only a seed that was given (the noise is then reproducible)
        metrics["seed"] = args.seed
    if args.log_private_stats:
        metrics["private_stats_not_covered_by_epsilon"] = [k for k in PRIVATE_STATS if k in metrics]
    metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
               for k, v in metrics.items()}
    if write:
        if result.guard is not None:
            ledger = json.loads(result.guard.ledger.to_json())   # with the unit and the person numbers
            ledger.update({k: metrics.get(k) for k in PERSON_KEYS})
            atomic_write(run_dir.path("ledger.json"), json.dumps(ledger, indent=1).encode())
        atomic_write(run_dir.path(METRICS_NAME),
                     json.dumps(metrics, indent=1, default=str).encode())
    metrics["_wrote"] = bool(write)
    return metrics


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    given = _given_flags(argv)
    def at_once():
        from .run_dir import out_of, staging_path

        out = out_of(args.resume or args.out)
        return (f"interrupted; the last checkpoint (if any) is kept in {staging_path(out)}: resume "
                f"with: {PROG} --resume {out}")

    code, metrics = run_guarded(PROG, lambda stopper: run(args, given, stopper), at_once)
    if code:
        return code
    out = metrics.pop("_out")
    unit = metrics.get("privacy_unit") or "record"      # whose privacy the epsilon protects
    eps_txt = (f"epsilon {metrics['epsilon_spent']:.4g} per {unit} (delta {metrics['delta']:g})"
               if metrics["private"] else "non-private")
    where = f"wrote {out}" if metrics.pop("_wrote", True) else "rank 0 writes the outputs"
    stopped = metrics.get("stopped_early")
    if stopped:
        print(f"stopped after {stopped['steps']} of {stopped['planned_steps']} steps: "
              f"{stopped['reason']}")
    stats = ""
    if "train_perplexity" in metrics:
        val = metrics["val_perplexity"]
        stats = (f"train perplexity {metrics['train_perplexity']:.3f}, val perplexity "
                 f"{'n/a' if val is None else f'{val:.3f}'} (not covered by epsilon), ")
    if metrics["private"]:
        person = metrics.get("person_epsilon")
        k = f", k {metrics['person_k']}" if metrics.get("person_k") is not None else ""
        eps_txt += (f", person-level epsilon {person:.4g} ({metrics.get('person_method')}{k})"
                    if person is not None else f", person-level epsilon not computed "
                    f"({metrics.get('person_method')})")
        if unit != "record":
            from .dp.units import record_epsilon_text

            eps_txt += ", " + record_epsilon_text(metrics.get("record_epsilon"))
    print(f"{metrics['steps']} steps, {eps_txt}, {stats}{metrics['seconds_per_step'] or 0:.3f} "
          f"s/step; {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
