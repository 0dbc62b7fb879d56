"""``python -m finetune.federated``: a DP-FedAvg federation of K organisations on one machine.

    python -m finetune.federated --clients 3 --rounds 20 --client-rate 1.0 --table t.npz \\
        --method lora --model tiny --data data.jsonl --out runs/fed

Real processes on 127.0.0.1: this process is the Flower server (``DPFedAvg``, Flower's gRPC
transport); each organisation is a ``python -m finetune.federated.client`` process holding its
share of the training split (divided by person).  The work happens in a sibling folder
``.<out>.partial``; at the end it is renamed to ``--out``, which then has the shape of a
``python -m finetune`` run (``adapter.safetensors``, ``ledger.json``, ``metrics.json``) plus
``federation.json`` (round history) and, with ``--record-table``, each organisation's own ledger.
A federation that was interrupted (server killed) is continued with ``--resume``: the ledger is
read back, never restarted.  User mistakes end with a one-line error and exit code 2.

Client sampling, the server's noise and each organisation's local sampling and DP-SGD noise come
from fresh OS entropy (ChaCha20 keyed from ``os.urandom``) unless ``--seed`` is given, which prints
a warning: a known seed lets anyone replay the noise.  Model initialisation, the validation split
and the partition of the corpus across organisations use the public seed 0 (``--seed`` replaces it).
A client count that the corpus (each organisation needs at least one person) or the machine's
memory (one MindSpore process per organisation) cannot hold is refused before any process starts.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

from ..cli import Interrupted, OneLineParser as _Parser, UserError, run_guarded, warn_known_seed

PROG = "python -m finetune.federated"
#: model initialisation, validation split and partition without --seed (public: they hide nothing)
PUBLIC_SEED = 0


def _parser():
    p = _Parser(prog=PROG, description="Client-level DP federated fine-tuning (DP-FedAvg, McMahan "
                "et al. 2018) of a GPT-2 adapter on Flower: Poisson client sampling at --client-rate, "
                "each update clipped to --clip-norm in the table's norm, noise drawn once per round "
                "from the certified table, divided by the expected number of organisations. The table "
                "must be certified for q = --client-rate and T >= --rounds (python -m accountant "
                "calibrate ... --sampling-rate q --steps ROUNDS --geometry l2).",
                epilog="Outputs in --out: adapter.safetensors, ledger.json (client-level), "
                       "metrics.json, federation.json; clients/client-<i>.ledger.json with "
                       "--record-table. docs/federated.md states both guarantees.")
    p.add_argument("--clients", type=int, required=True, help="number of organisations K")
    p.add_argument("--rounds", type=int, required=True, help="federated rounds (at most the table's T)")
    p.add_argument("--client-rate", type=float, default=None,
                   help="Poisson client sampling rate q (default: the table's; must match it)")
    p.add_argument("--table", required=True, help="certified noise table for the client-level release")
    p.add_argument("--method", required=True, choices=("lora", "bitfit"),
                   help="what travels and trains: LoRA adapters or biases (BiTFiT)")
    p.add_argument("--model", required=True, help="'tiny', 'small' or a Hugging Face GPT-2 directory")
    p.add_argument("--data", required=True, help="jsonl corpus (python -m finetune.data writes one)")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--resume", action="store_true", help="continue an interrupted federation")
    p.add_argument("--clip-norm", type=float, default=1.0,
                   help="client update clipping norm C in the table's norm (default 1.0)")
    p.add_argument("--server-lr", type=float, default=1.0, help="server step on the noisy mean (default 1)")
    p.add_argument("--local-steps", type=int, default=5, help="local steps k per round (default 5)")
    p.add_argument("--local-batch", type=int, default=16,
                   help="expected local Poisson batch without --record-table (default 16)")
    p.add_argument("--lr", type=float, default=1e-3, help="local Adam learning rate (default 1e-3)")
    p.add_argument("--record-table", default=None,
                   help="optional table for record-level DP-SGD inside every organisation; its q and "
                        "T are the local Poisson rate and the local step budget")
    p.add_argument("--record-clip", type=float, default=1.0,
                   help="per-example clipping norm for --record-table (default 1.0)")
    p.add_argument("--round-timeout", type=float, default=600.0,
                   help="seconds a round waits for updates; late ones count as failed (default 600)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed for client sampling, noise and local sampling/DP-SGD, for experiments "
                        "only: anyone who knows it can replay the noise (a warning is printed). "
                        "Default: fresh OS entropy (ChaCha20) for all of them. Model init, the "
                        "validation split and the partition across organisations always use a "
                        "public seed: --seed, or 0 without it")
    p.add_argument("--secure", action="store_true",
                   help="fresh OS entropy for sampling and noise (the default; kept for old "
                        "command lines; excludes --seed)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per example (default 64)")
    p.add_argument("--micro-batch", type=int, default=16, help="micro-batch size (default 16)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="validation share when the jsonl has no 'split' field (default 0.1)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    p.add_argument("--lora-targets", default="c_attn", help="LoRA target layers (default c_attn)")
    p.add_argument("--port", type=int, default=0, help="loopback port (default: a free one)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _positive(name, value, integer=False):
    ok = value >= 1 if integer else (value > 0 and math.isfinite(value))
    if not ok:
        raise UserError(f"--{name} must be {'>= 1' if integer else 'a positive number'}, got {value}")


def _check_args(args) -> None:
    for name in ("clients", "rounds", "local_steps", "local_batch", "micro_batch"):
        _positive(name.replace("_", "-"), getattr(args, name), integer=True)
    for name in ("clip_norm", "server_lr", "lr", "record_clip", "round_timeout"):
        _positive(name.replace("_", "-"), getattr(args, name))
    if args.seq_len < 2:
        raise UserError(f"--seq-len must be >= 2, got {args.seq_len}")
    for name in ("data", "table") + (("record_table",) if args.record_table else ()):
        if not os.path.isfile(getattr(args, name)):
            raise UserError(f"--{name.replace('_', '-')}: no such file: {getattr(args, name)}")
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    if args.secure and args.seed is not None:
        raise UserError("--secure draws from the OS; drop --seed")


def _work_dir(out: Path) -> Path:
    return out.resolve().parent / f".{out.name}.partial"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Peak resident memory of one organisation process, measured with
#: ``python benchmarks/federated_bench.py --client-memory`` (seq-len 32, micro-batch 16, LoRA):
#: the MindSpore and Flower runtime, plus a cost per model parameter (weights, gradients, optimizer
#: state, compiled graphs).  docs/federated.md lists the measurements.
CLIENT_BASE_BYTES = 0.9e9
CLIENT_BYTES_PER_PARAMETER = 30.0


def client_memory_bytes(n_parameters: int) -> int:
    """Estimated peak memory of one organisation process for a model of ``n_parameters``."""
    return int(CLIENT_BASE_BYTES + CLIENT_BYTES_PER_PARAMETER * n_parameters)


def available_memory() -> int | None:
    """Bytes still available to new processes: the kernel's ``MemAvailable``, capped by a cgroup
    v2 limit when one is set; None where neither can be read (the memory check is then skipped)."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            room = int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


def check_capacity(clients: int, train_records, n_parameters: int, available: int | None) -> None:
    """Refuse, in one line, a client count that the corpus or the machine cannot hold.

    Corpus: records that share a person stay in one organisation (:mod:`.partition`), so the
    training split can be divided into at most as many non-empty organisations as it has such
    groups; every organisation must hold at least one.  Machine: one MindSpore process per
    organisation, each needing about :func:`client_memory_bytes`; together they must fit in the
    available memory."""
    from .partition import person_components

    groups = len(set(person_components(train_records).tolist()))
    if clients > groups:
        raise UserError(f"--clients {clients}: the training split divides into only {groups} groups of "
                        "records that can be held apart (records sharing a person stay together) and "
                        f"every organisation needs at least one; use --clients {groups} or fewer")
    if available is None:
        return
    each = client_memory_bytes(n_parameters)
    if clients * each > available:
        fits = int(available // each)
        advice = f"use --clients {fits} or fewer" if fits else "not even one organisation fits"
        raise UserError(f"--clients {clients} needs about {clients * each / 1e9:.1f} GB ({clients} "
                        f"organisation processes of about {each / 1e9:.2f} GB for this model) but "
                        f"{available / 1e9:.1f} GB is available; {advice}")


def run(args, stopper=None) -> dict:
    _check_args(args)
    init_seed = PUBLIC_SEED if args.seed is None else args.seed
    from accountant.output_path import OutputPathError, check_output_dir
    from accountant.table import TableError, load_table

    out = Path(args.out)
    try:
        check_output_dir(out, overwrite=args.overwrite)
    except OutputPathError as e:
        raise UserError(str(e)) from None
    work = _work_dir(out)
    if work.exists() and not args.resume:
        if not args.overwrite:
            raise UserError(f"an interrupted federation is in {work}; pass --resume to continue it "
                            "(its ledger is kept) or --overwrite to discard it")
        shutil.rmtree(work)
    if args.resume and not work.exists():
        raise UserError(f"--resume: no interrupted federation for {out} (expected {work})")
    try:
        table = load_table(args.table)
        record_table = load_table(args.record_table) if args.record_table else None
    except (TableError, OSError) as e:
        raise UserError(f"cannot use noise table: {e}") from None
    q = table.sampling_rate if args.client_rate is None else float(args.client_rate)
    if abs(q - table.sampling_rate) > 1e-12 * table.sampling_rate:
        raise UserError(f"--client-rate {q:g} does not match the table's certified rate "
                        f"{table.sampling_rate:g}; calibrate a table for this rate")
    if args.rounds > table.steps:
        raise UserError(f"--rounds {args.rounds} exceeds the {table.steps} rounds the table certifies")
    if table.geometry not in ("l1", "l2"):
        raise UserError(f"the table certifies geometry {table.geometry!r}; a federated update is a "
                        "vector: use a table certified for l2 (Gaussian) or l1")

    try:
        import flwr  # noqa: F401
    except ImportError:
        raise UserError("Flower is not installed: pip install -e '.[federated]' && pip install "
                        "--no-deps 'flwr>=1.42,<1.43' (Python >= 3.11; README, 'Federated')") from None

    from finetune.data import DataError, load_dataset
    from finetune.models import checkpoint, peft
    from finetune.models.tokenizer import load_tokenizer

    from .client import base_sha256, build_model
    from .state import FederationState, StateError
    from .strategy import DPFedAvg

    targets = [t for t in args.lora_targets.split(",") if t]
    try:
        model = build_model(args.model, args.method, init_seed, args.lora_r, args.lora_alpha, targets)
        tok = load_tokenizer(model.config.vocab_size)
        data = load_dataset(args.data, tok, seq_len=args.seq_len, val_fraction=args.val_fraction,
                            seed=init_seed)
    except (checkpoint.CheckpointError, peft.AdapterError, DataError, OSError, ValueError) as e:
        raise UserError(f"cannot set up the federation: {e}") from None
    check_capacity(args.clients, data.train.records,
                   sum(int(p.size) for p in model.get_parameters()), available_memory())
    if record_table is not None:
        from finetune.dp.guard import TableMismatchError, check_table

        from .partition import split_by_person
        for i, rows in enumerate(split_by_person(data.train.records, args.clients, init_seed)):
            try:
                check_table(record_table, dataset_size=len(rows))
            except TableMismatchError as e:
                raise UserError(f"--record-table does not fit organisation {i}: {e}") from None

    # "seed" is None unless the user gave one: no seed is ever recorded that was not used
    config = {"clients": args.clients, "client_rate": q, "clip_norm": args.clip_norm,
              "table_sha256": table.metadata["sha256"], "method": args.method, "model": args.model,
              "secure": args.seed is None, "seed": args.seed, "server_lr": args.server_lr,
              "local_steps": args.local_steps, "record_table": (record_table.metadata["sha256"]
                                                                if record_table else None)}
    params = {n: p.asnumpy() for n, p in model.parameters_and_names() if p.requires_grad}
    try:
        if args.resume:
            state = FederationState.load(work, table, config, q)
        else:
            work.mkdir()
            state = FederationState.create(work, table, params, config, q)
    except StateError as e:
        raise UserError(str(e)) from None
    if args.seed is not None:                     # after every check that can refuse the run
        warn_known_seed(PROG, args.seed)
    remaining = max(0, args.rounds - state.rounds_done)
    (work / "clients").mkdir(exist_ok=True)
    client_cfg = {"model": args.model, "method": args.method, "seed": args.seed,
                  "init_seed": init_seed, "lora_r": args.lora_r,
                  "lora_alpha": args.lora_alpha, "lora_targets": targets, "data": os.path.abspath(args.data),
                  "clients": args.clients, "seq_len": args.seq_len, "val_fraction": args.val_fraction,
                  "record_table": os.path.abspath(args.record_table) if args.record_table else None,
                  "workdir": str(work), "local_steps": args.local_steps, "lr": args.lr,
                  "local_batch": args.local_batch, "micro_batch": args.micro_batch,
                  "record_clip": args.record_clip}
    cfg_path = work / "clients" / "config.json"
    cfg_path.write_text(json.dumps(client_cfg, indent=1))

    bar = None
    if not args.quiet:
        from tqdm import tqdm
        bar = tqdm(total=args.rounds, initial=state.rounds_done, desc="federated rounds", unit="round")

    def on_round(rec):
        if bar is not None:
            bar.set_postfix(eps=f"{rec['epsilon']:.3g}", got=f"{rec['received']}/{rec['sampled']}")
            bar.update(1)

    from accountant.randomness import KnownSeedWarning

    with warnings.catch_warnings():              # the one-line --seed warning is already printed
        warnings.simplefilter("ignore", KnownSeedWarning)
        strategy = DPFedAvg(state, table, n_clients=args.clients, clip_norm=args.clip_norm,
                            max_releases=table.steps, seed=args.seed, server_lr=args.server_lr,
                            base_sha256=base_sha256(model), on_round=on_round,
                            stop=stopper.event if stopper is not None else None)
    started = time.perf_counter()
    if remaining:
        address = f"127.0.0.1:{args.port or _free_port()}"
        procs = start_clients(address, args.clients, cfg_path, work / "clients")
        try:
            serve(address, strategy, remaining, args.round_timeout)
        finally:
            stop_clients(procs)
    if bar is not None:
        bar.close()
    if strategy.stopped_by_signal:
        raise Interrupted(f"interrupted after {state.rounds_done} of {args.rounds} rounds, client-level "
                          f"epsilon spent {state.epsilon():.4g}; the federation (ledger, global adapter) "
                          f"is in {work}; continue it with the same command and --resume",
                          stopper.exit_code)
    metrics = finish(args, model, data, state, table, record_table, work, out,
                     time.perf_counter() - started, strategy.stopped_by_budget)
    return metrics


def start_clients(address: str, n: int, cfg_path: Path, log_dir: Path) -> list:
    """One ``python -m finetune.federated.client`` process per organisation (logs in log_dir)."""
    procs = []
    for i in range(n):
        log = open(log_dir / f"client-{i}.log", "ab")
        procs.append((subprocess.Popen([sys.executable, "-m", "finetune.federated.client",
                                        "--server", address, "--index", str(i), "--config",
                                        str(cfg_path)], stdout=log, stderr=subprocess.STDOUT), log))
    return procs


def stop_clients(procs, grace: float = 30.0) -> None:
    deadline = time.time() + grace
    for proc, log in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


class _HideDeprecation:
    """Drop Flower's notice that ``start_server`` is deprecated (documented in docs/federated.md)."""

    def filter(self, record) -> bool:
        return "deprecated" not in str(record.getMessage())


def serve(address: str, strategy, rounds: int, round_timeout: float):
    """Flower's gRPC server on a loopback address for ``rounds`` rounds."""
    import logging

    import flwr as fl
    from flwr.common.logger import FLOWER_LOGGER

    from .client import check_loopback

    check_loopback(address)
    FLOWER_LOGGER.setLevel(logging.WARNING)
    if not any(isinstance(f, _HideDeprecation) for f in FLOWER_LOGGER.filters):
        FLOWER_LOGGER.addFilter(_HideDeprecation())    # docs/federated.md says which API and why
    return fl.server.start_server(server_address=address, strategy=strategy,
                                  config=fl.server.ServerConfig(num_rounds=rounds,
                                                                round_timeout=round_timeout))


def finish(args, model, data, state, table, record_table, work: Path, out: Path, seconds: float,
           stopped_by_budget: bool) -> dict:
    """Write the adapter and metrics into the work folder, then rename it to ``--out``."""
    from finetune.models import peft
    from finetune.models.gpt2 import assign_parameter
    from finetune.train import perplexity

    from accountant.ledger import PrivacyLedger

    # the model as built is the base model (LoRA B = 0, BiTFiT biases unchanged): measure it on the
    # held-out split first, so the run says whether the federation improved on it
    has_val = len(data.val) > 0
    base_ppl = perplexity(model, data.val.ids, data.val.mask) if has_val else None
    params = dict(model.parameters_and_names())
    for name, value in state.global_params.items():
        assign_parameter(params[name], value.astype("float32"))
    peft.save_adapter(model, work / "adapter.safetensors")
    val_ppl = perplexity(model, data.val.ids, data.val.mask) if has_val else None
    record = {}
    for i in range(args.clients):
        path = work / "clients" / f"client-{i}.ledger.json"
        if path.exists():
            led = PrivacyLedger.from_json(path.read_text())
            record[f"client-{i}"] = {"epsilon": led.epsilon(), "delta": led.delta, "steps": led.steps}
    hist = state.history
    per_round = [h["seconds"] for h in hist]
    metrics = {
        "private": True, "federated": True, "method": args.method, "model": args.model,
        "weights": "adapter.safetensors", "table": os.path.basename(args.table),
        "seed": args.seed, "secure_rng": args.seed is None, "steps": state.rounds_done,
        # public: model init, validation split, partition (finetune.evaluate rebuilds the base)
        "init_seed": PUBLIC_SEED if args.seed is None else args.seed,
        "epsilon_spent": state.epsilon(), "delta": table.delta,
        "certified_epsilon_of_table": table.certified_epsilon,
        "neighbouring_relation": "add or remove one organisation (all its records)",
        "record_level": ({"neighbouring_relation": "add or remove one record of one organisation",
                          "table": os.path.basename(args.record_table), "per_client": record}
                         if record_table is not None else None),
        "clients": args.clients, "client_rate": state.mechanism.sampling_rate,
        "expected_clients": state.mechanism.sampling_rate * args.clients,
        "clip_norm": args.clip_norm, "local_steps": args.local_steps,
        "noise_std": args.clip_norm * math.sqrt(table.noise.variance()) /
                     (state.mechanism.sampling_rate * args.clients),
        "stopped_by_budget": bool(stopped_by_budget),
        "n_train": len(data.train), "n_val": len(data.val),
        "val_split": "held-out validation records, never trained on",
        "val_perplexity": val_ppl, "val_perplexity_base": base_ppl,
        "improved_over_base": None if not has_val else bool(val_ppl < base_ppl),
        "train_perplexity": None,
        "seconds_per_round": sum(per_round) / len(per_round) if per_round else None,
        "bytes_up_per_round": sum(h["bytes_up"] for h in hist) / len(hist) if hist else None,
        "bytes_down_per_round": sum(h["bytes_down"] for h in hist) / len(hist) if hist else None,
        "failed_updates": sum(h["failed"] for h in hist), "wall_seconds": seconds,
        # operator's record (like federation.json): it follows the client sampling, which the
        # epsilon assumes secret when client_rate < 1 -- do not publish it with the adapter
        "missing_organisations": missing_organisations(hist),
    }
    from .state import atomic_write
    atomic_write(work / "metrics.json", json.dumps(metrics, indent=1).encode())
    (work / "clients" / "config.json").unlink(missing_ok=True)
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(work, out)
    return metrics


def missing_organisations(history) -> dict:
    """Per organisation index, the rounds in which it sent no update: ``absent`` (not connected
    when the round sampled) and ``failed`` (sampled; crashed, timed out or malformed), and how many
    rounds that makes.  Organisations that did not report their index are counted under
    ``"unidentified"``."""
    report = {}
    for h in history:
        for kind, key in (("absent", "absent"), ("failed", "failed_organisations")):
            for org in h.get(key) or ():
                report.setdefault(org, {"rounds": 0, "absent": [], "failed": []})[kind].append(h["round"])
    for entry in report.values():
        entry["rounds"] = len(set(entry["absent"]) | set(entry["failed"]))
    order = sorted(report, key=lambda org: (org is None, org or 0))
    return {("unidentified" if org is None else str(org)): report[org] for org in order}


def _spans(rounds) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    rounds, parts, start = sorted(set(rounds)), [], None
    for i, r in enumerate(rounds):
        if start is None:
            start = r
        if i + 1 == len(rounds) or rounds[i + 1] != r + 1:
            parts.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ", ".join(parts)


def warnings_for(m: dict) -> list[str]:
    """The summary's warnings: organisations that sent no update, and no gain over the base model."""
    lines = []
    for org, e in m["missing_organisations"].items():
        what = "; ".join(f"{kind} in round{'s' if len(e[kind]) > 1 else ''} {_spans(e[kind])}"
                         for kind in ("absent", "failed") if e[kind])
        name = ("organisations that did not report their index" if org == "unidentified"
                else f"organisation {org}")
        lines.append(f"{name} sent no update in {e['rounds']} of {m['steps']} rounds ({what})")
    if m["improved_over_base"] is False:
        lines.append(f"no improvement over the base model: validation perplexity "
                     f"{m['val_perplexity']:.4g} against {m['val_perplexity_base']:.4g} before the "
                     "federation (held-out split)")
    return lines


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    code, m = run_guarded(PROG, lambda stopper: run(args, stopper),
                          lambda: "interrupted at once (second SIGINT); every completed round is saved "
                                  "with its ledger; continue with the same command and --resume")
    if code:
        return code
    rec = ""
    if m["record_level"]:
        eps = [v["epsilon"] for v in m["record_level"]["per_client"].values()]
        rec = f"; record-level epsilon per organisation <= {max(eps):.4g}" if eps else ""
    if m["val_perplexity"] is None:
        ppl = "no validation split"
    else:
        verdict = "improved" if m["improved_over_base"] else "NO IMPROVEMENT"
        ppl = (f"val perplexity {m['val_perplexity']:.3f} on the held-out split (base model "
               f"{m['val_perplexity_base']:.3f}: {verdict})")
    missing = m["missing_organisations"]
    gaps = ("every organisation sent every update" if not missing else "organisations without an "
            "update in some rounds: " + ", ".join(f"{org} ({e['rounds']} rounds)" for org, e in missing.items()))
    speed = (f"{m['seconds_per_round']:.2f} s/round, {m['bytes_up_per_round'] / 1e3:.1f} kB up per round; "
             if m["seconds_per_round"] is not None else "")
    print(f"{m['steps']} rounds, client-level epsilon {m['epsilon_spent']:.4g} (delta {m['delta']:g}, "
          f"one organisation added or removed){rec}; {ppl}; {gaps}; {speed}wrote {args.out}")
    for line in warnings_for(m):
        sys.stderr.write(f"{PROG}: warning: {line}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
