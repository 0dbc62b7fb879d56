"""``python -m finetune.evaluate``: did DP fine-tuning protect the data, and what did it cost?

    python -m finetune.evaluate --run runs/dp [--baseline runs/nodp] --out report/

Reads a run directory written by ``python -m finetune`` (``metrics.json``, ``ledger.json``,
``adapter.safetensors`` or ``model.safetensors`` + ``config.json``), rebuilds the base model it
started from and the fine-tuned model, and measures on the corpus it was trained on (recorded in
``metrics.json`` with its sha256; a corpus changed since training is refused; train records =
members, validation records = non-members):

- utility: validation perplexity (fine-tuned and base), training seconds per step and peak memory
  (from the run), generation latency of the fine-tuned model (LoRA merged) vs the base model and
  the overhead ratio;
- membership inference: loss-threshold and reference-calibrated attacks; ROC AUC (DeLong CI), TPR
  at 0.1% and 1% FPR (Clopper-Pearson CI), and the check TPR <= e^eps FPR + delta;
- PII extraction (Lukas et al. 2023): precision and recall over de-duplicated PII in sampled
  continuations of neutral prompts, minus the PII the base model also produces;
- canaries, if the corpus was prepared with ``python -m finetune.evaluation.prepare``: exposure
  (Carlini et al. 2019) and the one-run audit (Steinke, Nasr, Jagielski 2023), an empirical epsilon
  lower bound at 95% confidence printed next to the certified epsilon;
- persons, when the corpus names them (``people``/``user``) and is split by person: membership
  inference over persons (members: persons in training; non-members: persons never seen; a person's
  records scored together), AUC and TPR at 0.1%/1% FPR with bootstrap intervals over persons and
  the DP limits at the run's person-level epsilon (``person_epsilon``, ``person_k``,
  ``person_method`` in its metrics.json; a record-level run says "no person-level bound" and its
  limits, labelled, are at the record-level epsilon), PII extraction of member against never-seen
  persons, and exposure of the per-person canaries (``prepare --person-canaries``);
- a mechanism-level audit of the run's noise sampler (the table) on neighbouring scalar inputs,
  whose empirical lower bound must stay below the certified epsilon of one release.

Writes ``summary.json`` (flat, the headline numbers), ``details.json`` (everything) and PNG plots
(ROC with the DP bound, perplexity vs epsilon, noise density vs Gaussian) to ``--out``. The report
is computed from the private corpus and is itself private (README, "Leakage and utility
evaluation"); statistics of the training records that the run's epsilon does not cover (its train
perplexity, final train loss, mean batch size) are left out unless ``--include-training-stats``.

Every option is checked before any work (``--seq-len`` and ``--max-new-tokens`` against the
model's n_positions as soon as it is loaded, before any scoring). The report is written to a hidden
staging folder next to ``--out`` and moved into place only when everything succeeded: an error
leaves no ``--out`` behind.
User mistakes end with a one-line error and exit code 2; any other error with one line and exit
code 1. Neither line ever quotes a record, a generated text or a PII value (an internal error names
its type and code location only), and no traceback is printed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile

from .checkpointing import file_sha256
from .cli import OneLineParser as _Parser, Stopper, UserError, exit_at_once

PROG = "python -m finetune.evaluate"
REPORT_FILES = ("summary.json", "details.json", "roc.png", "perplexity_vs_epsilon.png",
                "noise_density.png")
DEFAULT_SEQ_LEN = 64  # for a run that does not record its own --seq-len
TRAINING_STATS = ("train_perplexity", "final_train_loss", "mean_batch_size")


def _parser():
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="Members are the corpus records with split 'train' (canary records excluded), "
                       "non-members those with split 'val'; MIA needs enough of both (e.g. write the "
                       "corpus with --val-fraction 0.5). summary.json keys: epsilon, delta, "
                       "val_perplexity, mia_auc, mia_tpr_at_1pct_fpr, pii_precision, pii_recall, "
                       "audit_epsilon_lower_bound, inference_overhead, person_epsilon, "
                       "person_mia_auc, person_mia_tpr_at_1pct_fpr, person_mia_auc_limit, "
                       "person_pii_precision, person_pii_recall, ... (null when not measured). "
                       "Person-level results need a corpus whose records name their persons "
                       "('people') and that is split by person (python -m finetune.data --split "
                       "person).")
    p.add_argument("--run", required=True, help="run directory written by python -m finetune")
    p.add_argument("--baseline", action="append", default=[],
                   help="another run directory (e.g. the --no-dp run) evaluated the same way and "
                        "drawn in the same plots; repeatable")
    p.add_argument("--data", help="the jsonl corpus the runs were trained on (default: the path "
                                  "recorded in the run's metrics.json; its sha256 must match the "
                                  "recorded one)")
    p.add_argument("--table", help="the run's noise table (default: the file the run recorded in "
                                   "metrics.json, looked up at its recorded path, next to the run "
                                   "directory and in the working directory); its sha256 must match "
                                   "the recorded one")
    p.add_argument("--model", help="base model the run started from (default: metrics.json 'model')")
    p.add_argument("--canaries", help="canary ground truth (default: <data>.canaries.json if present)")
    p.add_argument("--out", default="report",
                   help="output directory (default report/); an existing one needs --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an existing --out, replacing its report files")
    p.add_argument("--n-generate", type=int, default=200,
                   help="continuations sampled for PII extraction (default 200)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens per continuation (default 48)")
    p.add_argument("--top-k", type=int, default=40, help="top-k sampling for extraction (default 40)")
    p.add_argument("--mia-limit", type=int, default=2000,
                   help="at most this many members and non-members scored (default 2000)")
    p.add_argument("--audit-draws", type=int, default=2_000_000,
                   help="noise draws per input for the sampler audit (default 2e6; 0 skips it)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per scored text (default: the run's training --seq-len recorded in "
                        f"its metrics.json, else {DEFAULT_SEQ_LEN}); the report says which was used")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling and subsampling (default 0)")
    p.add_argument("--include-training-stats", action="store_true",
                   help="also report statistics of the private training records that the run's "
                        "epsilon does not cover (train perplexity, final train loss, mean batch "
                        "size), under a key that says so (default: left out)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


# ------------------------------------------------------------------------------ run loading
def _read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} is not valid JSON: {path} ({e})") from None


def load_run(run_dir, model_override=None):
    """(metrics dict, fine-tuned model, base model) for a run directory of ``python -m finetune``."""
    if not os.path.isdir(run_dir):
        raise UserError(f"--run/--baseline: not a directory: {run_dir}")
    metrics = _read_json(os.path.join(run_dir, "metrics.json"), "metrics.json of the run")
    from .models import checkpoint, peft

    base_name = model_override or metrics.get("model")
    if base_name is None:
        raise UserError(f"{run_dir}/metrics.json does not name the base model; pass --model")
    seed = metrics.get("init_seed", metrics.get("seed"))  # the public initialisation seed
    if seed is None and base_name in ("tiny", "small"):
        raise UserError(f"{run_dir} was trained with --secure from a random-init '{base_name}' model; "
                        "its base weights cannot be rebuilt, pass --model DIR with the base weights")
    seed = int(seed or 0)
    try:
        base = checkpoint.from_pretrained(base_name, seed=seed)
        weights = metrics.get("weights") or ("model.safetensors" if metrics.get("method") == "full"
                                             else "adapter.safetensors")
        wpath = os.path.join(run_dir, weights)
        if not os.path.isfile(wpath):
            raise UserError(f"{run_dir}: weights file {weights} not found")
        if weights.startswith("model."):
            ft = checkpoint.from_pretrained(run_dir, seed=seed)
        else:
            ft = checkpoint.from_pretrained(base_name, seed=seed)
            peft.load_adapter(ft, wpath)
            if getattr(ft, "peft", {}).get("method") == "lora":
                peft.merge_lora(ft)  # inference as deployed: LoRA folded into the weights
    except (checkpoint.CheckpointError, peft.AdapterError, OSError) as e:
        raise UserError(f"cannot load {run_dir}: {e}") from None
    return metrics, ft, base


def load_eval_data(data_path, canaries_path=None):
    from .data import DataError, load_records, pii_pairs, split_records
    from .evaluation import prepare
    from .evaluation.canary import Canary
    from .evaluation.report import EvalData

    try:
        records = load_records(data_path)
    except (DataError, OSError) as e:
        raise UserError(str(e)) from None
    if not all("split" in r for r in records):
        raise UserError(f"{data_path}: every record needs a 'split' field (train/val) so members "
                        "and non-members are known; write the corpus with python -m finetune.data")
    train, val = split_records(records)
    train = [r for r in train if not r.get("canary")]
    if len(train) < 10 or len(val) < 10:
        raise UserError(f"{data_path}: need at least 10 train and 10 val records for membership "
                        f"inference (have {len(train)} and {len(val)})")
    data = EvalData(members=[r["text"] for r in train], nonmembers=[r["text"] for r in val],
                    train_pii=pii_pairs(train), holdout_pii=pii_pairs(val))
    if any("people" in r or "user" in r for r in records):
        _add_persons(data, train, val)
    side = canaries_path or (data_path + prepare.SIDE_SUFFIX)
    if canaries_path or os.path.isfile(side):
        try:
            t = prepare.load_truth(side)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot read canary ground truth {side}: {e}") from None
        data.exposure_canaries = [Canary(s, t["template"]) for s in t["exposure_secrets"]]
        data.canary_digits = int(t["digits"])
        data.audit_canaries = list(t["audit_texts"])
        data.audit_included = list(t["audit_included"])
        data.person_canaries = [Canary(x, t["template"]) for x in t.get("person_secrets", ())]
        data.person_canary_inserted = list(t.get("person_inserted", ()))
    return data


def _add_persons(data, train, val) -> None:
    """Persons of the member and non-member records, and the PII of each side's persons. A record
    with PII but no persons is refused (by index, never by content)."""
    from .data import DataError, record_people
    from .evaluation.pii import person_pii, pii_set
    from .evaluation.report import sided_persons

    try:
        data.member_people, data.nonmember_people = record_people(train), record_people(val)
    except DataError as e:
        raise UserError(f"the corpus's persons: {e}") from None
    members, never = sided_persons(data.member_people, data.nonmember_people)
    per = person_pii(data.member_people + data.nonmember_people,
                     [r.get("pii", ()) for r in train + val])
    data.member_person_pii = {x: per[x] for x in members if x in per}
    data.never_seen_person_pii = {x: per[x] for x in never if x in per}
    for attr, recs, people, side in (("member_persons_all_pii", train, data.member_people, members),
                                     ("never_seen_persons_all_pii", val, data.nonmember_people, never)):
        side = set(side)
        setattr(data, attr, pii_set(tuple(item) for r, who in zip(recs, people)
                                    if who and set(who) <= side for item in r.get("pii", ())))


RECORD_LEVEL_BASIS = ("record-level run: no person-level bound (limits shown at the record-level "
                      "epsilon, which does not bound a person with several records)")


DROPPED_CANARIES = ("n/a: the run trained only the records naming exactly one person "
                    "(--multi-owner drop), and the exposure and audit canaries name nobody")


def record_level_epsilon(metrics, eps):
    """The epsilon the record-level checks (membership bound, one-run audit) are held to: the run's
    ``eps`` for a record-level run; for a unit-level run its ``record_epsilon`` (one record changed
    inside a unit, larger than the per-unit ``eps``; ``finetune.dp.units``), None (no record-level
    limit drawn) when the run did not record one."""
    if eps is None or metrics.get("privacy_unit") in (None, "record"):
        return eps
    return metrics.get("record_epsilon")


def person_privacy(metrics, eps, delta):
    """The run's person-level privacy for the report: the ``person_epsilon`` (with ``person_k``,
    ``person_method``) the run recorded; for a private run without one, its record-level epsilon
    labelled as not a person-level guarantee; None for a non-private run."""
    if eps is None:
        return None
    if metrics.get("person_epsilon") is not None:
        return {"epsilon": float(metrics["person_epsilon"]),
                "delta": metrics.get("person_delta", delta), "k": metrics.get("person_k"),
                "method": metrics.get("person_method"), "basis": "person-level"}
    return {"epsilon": eps, "delta": delta, "basis": RECORD_LEVEL_BASIS}


def sampler_audit(table, draws, seed):
    """Mechanism-level audit of the table's sampler against its certified one-release epsilon."""
    from accountant.certify import CertificationError, certify
    from accountant.mechanism import Mechanism
    from accountant.randomness import make_rng

    from .evaluation.audit import audit_noise_sampler

    try:
        cert = certify(Mechanism(table.noise), table.delta).epsilon
    except CertificationError as e:
        cert = None
        note = f"no one-release certificate: {e}"
    res = {"certified_epsilon": cert, "certified_for": "one release, scalar, sensitivity 1",
           "table_certified_epsilon": table.certified_epsilon, "family": table.metadata.get("family")}
    if cert is None:
        res["note"] = note
    if draws > 0:
        res.update(audit_noise_sampler(table.noise, draws, make_rng(seed=seed), delta=table.delta))
        res["below_certificate"] = None if cert is None else res["epsilon_lower_bound"] <= cert
    return res


def resolve_corpus(run_dirs, data_arg=None) -> str:
    """The corpus the runs were trained on: ``--data`` or the path the first run recorded; refused
    when it is missing or its sha256 differs from what any run recorded (members would be mislabelled)."""
    recorded = [(d, _read_json(os.path.join(d, "metrics.json"), "metrics.json of the run"))
                for d in run_dirs]
    path = data_arg or recorded[0][1].get("data")
    if not path:
        raise UserError(f"{run_dirs[0]}/metrics.json does not record the training corpus; pass --data")
    if not os.path.isfile(path):
        raise UserError(f"the corpus {run_dirs[0]} was trained on is gone: {path}; pass --data")
    digest = file_sha256(path)
    for d, m in recorded:
        if m.get("data_sha256") not in (None, digest):
            raise UserError(f"{path} changed since {d} was trained on it (sha256 differs); evaluate "
                            "on the exact training corpus (or pass --data with it)")
    return path


# ---------------------------------------------------------- the run's table and sequence length
def _load_table(path):
    from accountant.table import TableError, load_table

    try:
        return load_table(path)
    except (TableError, OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot use noise table {path}: {e}") from None


def _table_matches(path, table, want) -> bool:
    """A run records its table as the file's sha256 (``python -m finetune``) or as the table's own
    content checksum (its metadata ``sha256``, verified by ``load_table``); either identifies it."""
    return want in (file_sha256(path), table.metadata.get("sha256"))


def resolve_table(run_dir, metrics, table_arg=None):
    """``(path, table, note)`` for the noise table ``run_dir`` was trained with.

    ``--table`` is refused unless its sha256 is the one the run recorded (auditing another table
    would certify nothing about the run). Without ``--table`` the recorded file is looked up at its
    recorded path, next to the run directory and in the working directory, and only a file with the
    recorded sha256 is used; when none is found, ``(None, None, note)`` says why there is no audit.
    """
    want = metrics.get("table_sha256")
    name = metrics.get("table")
    if table_arg is not None:
        if want is None:
            raise UserError(f"--table {table_arg}: {run_dir} records no noise table sha256 (trained "
                            "without a table, or before runs recorded it), so no table can be tied "
                            "to the run; leave --table out")
        table = _load_table(table_arg)
        if not _table_matches(table_arg, table, want):
            raise UserError(f"--table {table_arg} is not the table {run_dir} was trained with (its "
                            "sha256 differs from the one in metrics.json); pass the run's table or "
                            "leave --table out")
        return table_arg, table, None
    if not name:
        return None, None, "the run used no noise table"
    if want is None:
        return None, None, (f"no sampler audit: the run does not record the sha256 of its table "
                            f"{name}, so no file can be tied to it")
    recorded = (metrics.get("run_args") or {}).get("table")
    places = ([recorded] if recorded else []) + [
        os.path.join(d, name) for d in (run_dir, os.path.dirname(os.path.normpath(run_dir)),
                                        os.getcwd())]
    for path in places:
        if os.path.isfile(path):
            try:
                table = _load_table(path)
            except UserError:
                continue
            if _table_matches(path, table, want):
                return path, table, None
    return None, None, (f"no sampler audit: the run's table {name} (with the recorded sha256) was "
                        "not found; pass --table")


def _seq_len(args, metrics):
    """``(tokens per scored text, where it came from)``: ``--seq-len``, else the run's training
    ``--seq-len`` (so the validation perplexity is comparable with the run's), else the default."""
    if args.seq_len is not None:
        return args.seq_len, "--seq-len"
    recorded = (metrics.get("run_args") or {}).get("seq_len")
    if recorded:
        return int(recorded), "the run's --seq-len"
    return DEFAULT_SEQ_LEN, f"default {DEFAULT_SEQ_LEN} (the run records no --seq-len)"


def make_scorers(ft, base, seq_len, max_new_tokens):
    """``(fine-tuned, base)`` scorers of one run, after checking that ``seq_len`` and the longest
    prompt plus ``max_new_tokens`` fit the model's positions."""
    from .evaluation.report import NEUTRAL_PROMPTS, EvalOptions
    from .evaluation.scoring import LMScorer
    from .models.tokenizer import load_tokenizer

    tok = load_tokenizer(ft.config.vocab_size)
    n = ft.config.n_positions
    if seq_len > n:
        raise UserError(f"--seq-len {seq_len} exceeds the model's n_positions {n}")
    longest = max(len(tok.encode(p)) for p in NEUTRAL_PROMPTS)
    new = max(max_new_tokens, EvalOptions.latency_new_tokens)
    if longest + new > n:
        raise UserError(f"--max-new-tokens {max_new_tokens}: the longest prompt ({longest} tokens) "
                        f"plus {new} new tokens exceeds the model's n_positions {n}")
    return (LMScorer(ft, tok, seq_len=seq_len, name="fine-tuned"),
            LMScorer(base, tok, seq_len=seq_len, name="base"))


def _run_fields(metrics, seq_len, seq_source, with_training_stats) -> dict:
    """What the report says about the run itself: the sequence length it was scored at (and why),
    the run's own validation perplexity at its own sequence length and, only on request, the
    training-data statistics the run's epsilon does not cover."""
    out = {"seq_len": seq_len, "seq_len_source": seq_source,
           "run_val_perplexity": metrics.get("val_perplexity"),
           "run_seq_len": (metrics.get("run_args") or {}).get("seq_len"),
           "method": metrics.get("method"), "steps": metrics.get("steps"),
           "certified_epsilon_of_table": metrics.get("certified_epsilon_of_table")}
    if with_training_stats:
        out["training_data_statistics_not_covered_by_epsilon"] = dict(
            {k: metrics.get(k) for k in TRAINING_STATS},
            note="statistics of the private training records that the run released beside its "
                 "weights; the certified epsilon does not cover them (--include-training-stats)")
    return out


# ----------------------------------------------------------------------------------- main
def evaluate_runs(args, out_dir=None):
    """Evaluate ``args.run`` (and its baselines) and write the report files to ``out_dir``
    (default ``args.out``); returns the summary dictionary. Everything that can be checked without
    a model (runs, corpus, table, sequence length) is checked first."""
    from tqdm import tqdm

    from .evaluation import plots, report

    out_dir = args.out if out_dir is None else out_dir
    runs = [args.run] + list(args.baseline)
    for run_dir in runs:
        if not os.path.isdir(run_dir):
            raise UserError(f"--run/--baseline: not a directory: {run_dir}")
    data_path = resolve_corpus(runs, args.data)
    run_metrics = _read_json(os.path.join(args.run, "metrics.json"), "metrics.json of the run")
    table_path, table, table_note = resolve_table(args.run, run_metrics, args.table)
    data = load_eval_data(data_path, args.canaries)
    seq_len, seq_source = _seq_len(args, run_metrics)
    opts = report.EvalOptions(n_generate=args.n_generate, max_new_tokens=args.max_new_tokens,
                              top_k=args.top_k, mia_limit=args.mia_limit, seed=args.seed)

    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE)
    bar = tqdm(total=6 * len(runs) + 1, desc="evaluate", unit="stage", disable=args.quiet)
    results = {}
    for run_dir in runs:
        bar.set_postfix_str(f"load {os.path.basename(os.path.normpath(run_dir))}")
        metrics, ft, base = load_run(run_dir, args.model)
        bar.update(1)
        sc_ft, sc_base = make_scorers(ft, base, seq_len, args.max_new_tokens)
        private = bool(metrics.get("private", metrics.get("epsilon_spent") is not None))
        eps = metrics.get("epsilon_spent") if private else None
        delta = metrics.get("delta") if private else None
        dropped = (metrics.get("run_args") or {}).get("multi_owner") == "drop"
        res = report.evaluate_model(sc_ft, sc_base, data, opts, epsilon=record_level_epsilon(metrics, eps),
                                    delta=delta, progress=bar, person=person_privacy(metrics, eps, delta),
                                    canary_note=DROPPED_CANARIES if dropped else None)
        results[run_dir] = (metrics, eps, delta, res)

    metrics, eps, delta, res = results[args.run]
    audit_res = None
    if table is not None and eps is not None:
        bar.set_postfix_str("sampler audit")
        audit_res = sampler_audit(table, args.audit_draws, args.seed)
    bar.update(1)
    bar.close()

    summary = report.summarise(res, metrics, eps, delta, audit_res)
    summary.update(_run_fields(metrics, seq_len, seq_source, args.include_training_stats))
    summary["noise_table"] = os.path.basename(table_path) if table_path else None
    if eps is not None and audit_res is None:
        summary["sampler_audit_note"] = table_note
    summary["data"] = os.path.basename(data_path)
    summary["n_members"] = res["membership"]["n_members"]
    summary["n_nonmembers"] = res["membership"]["n_nonmembers"]
    baselines = {}
    for b in args.baseline:
        bm, be, bd, br = results[b]
        bs = report.summarise(br, bm, be, bd, None)
        bs.update(_run_fields(bm, seq_len, seq_source, args.include_training_stats))
        baselines[os.path.basename(os.path.normpath(b))] = bs
    if baselines:
        summary["baselines"] = baselines

    # ---- plots
    def label(run_dir, m):
        name = os.path.basename(os.path.normpath(run_dir))
        e = m.get("epsilon_spent") if m.get("private", True) else None
        return f"{name} ({'eps %.3g' % e if e is not None else 'non-private'})"

    curves = {}
    for run_dir, (m, _, _, r) in results.items():
        for attack, (fpr, tpr) in r["membership"]["curves"].items():
            curves[f"{label(run_dir, m)}, {attack}"] = (fpr, tpr)
    pngs = {"roc": plots.plot_roc(curves, os.path.join(out_dir, "roc.png"), record_level_epsilon(metrics, eps),
                                  delta or 0.0)}
    pts = [(label(r, m), (m.get("epsilon_spent") if m.get("private", True) else None),
            res_["utility"]["val_perplexity"]) for r, (m, _, _, res_) in results.items()]
    pngs["perplexity_vs_epsilon"] = plots.plot_perplexity_vs_epsilon(
        pts, os.path.join(out_dir, "perplexity_vs_epsilon.png"),
        base_perplexity=res["utility"]["base_val_perplexity"],
        ylabel=f"validation perplexity (seq len {seq_len})")
    if table is not None:
        sigma = table.metadata.get("gaussian_sigma")
        pngs["noise_density"] = plots.plot_noise_density(
            table.noise, os.path.join(out_dir, "noise_density.png"), gaussian_sigma=sigma,
            label=f"{table.metadata.get('family')} table (certified eps {table.certified_epsilon:.3g})")
    summary["plots"] = {k: os.path.basename(v) for k, v in pngs.items()}

    details = {os.path.basename(os.path.normpath(r)): _jsonable(v[3]) for r, v in results.items()}
    details["sampler_audit"] = audit_res
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(_jsonable(summary), f, indent=1)
    with open(os.path.join(out_dir, "details.json"), "w") as f:
        json.dump(_jsonable(details), f, indent=1)
    return summary


def _jsonable(x):
    import numpy as np

    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items() if k != "curves"}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x



# ------------------------------------------------------------------- options, output, errors
def _check_options(args) -> None:
    """Every option that needs no model, checked in the first second (one line, exit code 2)."""
    for name, low in (("n_generate", 1), ("max_new_tokens", 1), ("mia_limit", 10), ("top_k", 0),
                      ("seed", 0)):
        if getattr(args, name) < low:
            raise UserError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.seq_len is not None and args.seq_len < 2:
        raise UserError(f"--seq-len must be >= 2 (a text is scored on its next-token predictions), "
                        f"got {args.seq_len}")
    if args.audit_draws and args.audit_draws < 1000:
        raise UserError(f"--audit-draws must be 0 (skip) or >= 1000, got {args.audit_draws}")
    for flag, path in (("--data", args.data), ("--table", args.table), ("--canaries", args.canaries)):
        if path is not None and not os.path.isfile(path):
            raise UserError(f"{flag}: no such file: {path}")
    for flag, run_dir in [("--run", args.run)] + [("--baseline", b) for b in args.baseline]:
        if not os.path.isdir(run_dir):
            raise UserError(f"{flag}: not a run directory: {run_dir}")
    _check_out(args)


def _check_out(args) -> None:
    """--out: a folder that can be created (or, with --overwrite, an existing folder), checked
    before any work."""
    from accountant.output_path import OutputPathError, check_output_dir

    try:
        check_output_dir(args.out, overwrite=args.overwrite, what="--out")
    except OutputPathError as e:
        raise UserError(str(e)) from None


def _make_stage(out) -> str:
    """A fresh hidden folder next to ``out`` (same file system, so publishing is a rename); it is
    private to its owner (mode 0700), as the report is."""
    out = os.path.abspath(out)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=os.path.dirname(out))


def _publish(stage, out) -> None:
    """Move the finished report into ``out``: a new ``out`` is the staging folder renamed; an
    existing one (``--overwrite``) gets each report file replaced whole (``os.replace``) and the
    report files this run did not write removed, so no file of an older report is left beside it."""
    out = os.path.abspath(out)
    if not os.path.exists(out):
        os.rename(stage, out)
        return
    for name in REPORT_FILES:
        src, dst = os.path.join(stage, name), os.path.join(out, name)
        if os.path.exists(src):
            os.replace(src, dst)
        elif os.path.exists(dst):
            os.remove(dst)
    shutil.rmtree(stage, ignore_errors=True)


_STAGE = []  # the staging folder of the evaluation under way, for the signal handler


def _internal_error(e: BaseException) -> str:
    """One line for an unexpected error: its type and where in this project's code it happened.
    Its message is withheld: it may quote a record, a generated text or a PII value."""
    import traceback

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ours = tuple(os.path.join(root, pkg) + os.sep for pkg in ("finetune", "accountant", "noise_search"))
    frames = traceback.extract_tb(e.__traceback__)
    mine = [f for f in frames if os.path.abspath(f.filename).startswith(ours)]
    where = ""
    if mine:
        f = mine[-1]
        where = f" in {f.name} ({os.path.relpath(os.path.abspath(f.filename), root)}:{f.lineno})"
    return (f"internal error: {type(e).__name__}{where}; its message is not shown because it may "
            "quote private data")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    stage = None
    with Stopper(on_signal=exit_at_once(PROG, _STAGE)):
        try:
            _check_options(args)
            stage = _make_stage(args.out)
            _STAGE.append(stage)
            s = evaluate_runs(args, stage)
            _STAGE.clear()                     # from here a signal lets the publishing finish
            _publish(stage, args.out)
            stage = None
        except UserError as e:
            sys.stderr.write(f"{PROG}: error: {e}\n")
            return 2
        except Exception as e:  # noqa: BLE001 - one line without data instead of a traceback
            sys.stderr.write(f"{PROG}: {_internal_error(e)}\n")
            return 1
        finally:
            if stage is not None:
                shutil.rmtree(stage, ignore_errors=True)
            _STAGE.clear()
    from .evaluation.report import summary_text

    print(summary_text(s, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
