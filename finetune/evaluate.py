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
- a mechanism-level audit of the run's noise sampler (the table) on neighbouring scalar inputs,
  whose empirical lower bound must stay below the certified epsilon of one release.

Writes ``summary.json`` (flat, the headline numbers), ``details.json`` (everything) and PNG plots
(ROC with the DP bound, perplexity vs epsilon, noise density vs Gaussian) to ``--out``.
User mistakes end with a one-line error and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .cli import OneLineParser as _Parser, UserError

PROG = "python -m finetune.evaluate"


def _parser():
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="Members are the corpus records with split 'train' (canary records excluded), "
                       "non-members those with split 'val'; MIA needs enough of both (e.g. write the "
                       "corpus with --val-fraction 0.5). summary.json keys: epsilon, delta, "
                       "val_perplexity, mia_auc, mia_tpr_at_1pct_fpr, pii_precision, pii_recall, "
                       "audit_epsilon_lower_bound, inference_overhead, ... (null when not measured).")
    p.add_argument("--run", required=True, help="run directory written by python -m finetune")
    p.add_argument("--baseline", action="append", default=[],
                   help="another run directory (e.g. the --no-dp run) evaluated the same way and "
                        "drawn in the same plots; repeatable")
    p.add_argument("--data", help="the jsonl corpus the runs were trained on (default: the path "
                                  "recorded in the run's metrics.json; its sha256 must match the "
                                  "recorded one)")
    p.add_argument("--table", help="the run's noise table (default: the file named in metrics.json, "
                                   "looked up next to the run directory and in the working directory)")
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
    p.add_argument("--seq-len", type=int, default=64, help="tokens per scored text (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling and subsampling (default 0)")
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


def _find(name, places):
    for d in places:
        p = os.path.join(d, name)
        if os.path.isfile(p):
            return p
    return None


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
    return data


def sampler_audit(table_path, draws, seed):
    """Mechanism-level audit of the table's sampler against its certified one-release epsilon."""
    from accountant.certify import CertificationError, certify
    from accountant.mechanism import Mechanism
    from accountant.randomness import make_rng
    from accountant.table import TableError, load_table

    from .evaluation.audit import audit_noise_sampler

    try:
        table = load_table(table_path)
    except (TableError, OSError, ValueError) as e:
        raise UserError(f"cannot use noise table {table_path}: {e}") from None
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
    return res, table


def file_sha256(path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


# ----------------------------------------------------------------------------------- main
def evaluate_runs(args):
    from tqdm import tqdm

    from .evaluation import plots, report
    from .evaluation.scoring import LMScorer
    from .models.tokenizer import load_tokenizer

    runs = [args.run] + list(args.baseline)
    for run_dir in runs:
        if not os.path.isdir(run_dir):
            raise UserError(f"--run/--baseline: not a directory: {run_dir}")
    data_path = resolve_corpus(runs, args.data)
    data = load_eval_data(data_path, args.canaries)
    opts = report.EvalOptions(n_generate=args.n_generate, max_new_tokens=args.max_new_tokens,
                              top_k=args.top_k, mia_limit=args.mia_limit, seed=args.seed)
    os.makedirs(args.out, exist_ok=True)  # checked before any work (main: check_output_dir)

    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE)
    bar = tqdm(total=5 * len(runs) + 1, desc="evaluate", unit="stage", disable=args.quiet)
    results = {}
    for run_dir in runs:
        bar.set_postfix_str(f"load {os.path.basename(os.path.normpath(run_dir))}")
        metrics, ft, base = load_run(run_dir, args.model)
        bar.update(1)
        tok = load_tokenizer(ft.config.vocab_size)
        sc_ft = LMScorer(ft, tok, seq_len=args.seq_len, name="fine-tuned")
        sc_base = LMScorer(base, tok, seq_len=args.seq_len, name="base")
        private = bool(metrics.get("private", metrics.get("epsilon_spent") is not None))
        eps = metrics.get("epsilon_spent") if private else None
        delta = metrics.get("delta") if private else None
        res = report.evaluate_model(sc_ft, sc_base, data, opts, epsilon=eps, delta=delta, progress=bar)
        results[run_dir] = (metrics, eps, delta, res)

    metrics, eps, delta, res = results[args.run]
    audit_res, table = None, None
    table_path = args.table
    if table_path is None and metrics.get("table"):
        table_path = _find(metrics["table"], [args.run, os.path.dirname(os.path.normpath(args.run)),
                                              os.getcwd()])
    if table_path is not None and eps is not None:
        bar.set_postfix_str("sampler audit")
        audit_res, table = sampler_audit(table_path, args.audit_draws, args.seed)
    bar.update(1)
    bar.close()

    summary = report.summarise(res, metrics, eps, delta, audit_res)
    summary["run_val_perplexity"] = metrics.get("val_perplexity")
    summary["method"] = metrics.get("method")
    summary["steps"] = metrics.get("steps")
    summary["certified_epsilon_of_table"] = metrics.get("certified_epsilon_of_table")
    summary["data"] = os.path.basename(data_path)
    summary["n_members"] = res["membership"]["n_members"]
    summary["n_nonmembers"] = res["membership"]["n_nonmembers"]
    baselines = {}
    for b in args.baseline:
        bm, be, bd, br = results[b]
        baselines[os.path.basename(os.path.normpath(b))] = report.summarise(br, bm, be, bd, None)
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
    pngs = {"roc": plots.plot_roc(curves, os.path.join(args.out, "roc.png"), eps, delta or 0.0)}
    pts = [(label(r, m), (m.get("epsilon_spent") if m.get("private", True) else None),
            res_["utility"]["val_perplexity"]) for r, (m, _, _, res_) in results.items()]
    pngs["perplexity_vs_epsilon"] = plots.plot_perplexity_vs_epsilon(
        pts, os.path.join(args.out, "perplexity_vs_epsilon.png"),
        base_perplexity=res["utility"]["base_val_perplexity"])
    if table is not None:
        sigma = table.metadata.get("gaussian_sigma")
        pngs["noise_density"] = plots.plot_noise_density(
            table.noise, os.path.join(args.out, "noise_density.png"), gaussian_sigma=sigma,
            label=f"{table.metadata.get('family')} table (certified eps {table.certified_epsilon:.3g})")
    summary["plots"] = {k: os.path.basename(v) for k, v in pngs.items()}

    details = {os.path.basename(os.path.normpath(r)): _jsonable(v[3]) for r, v in results.items()}
    details["sampler_audit"] = audit_res
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(_jsonable(summary), f, indent=1)
    with open(os.path.join(args.out, "details.json"), "w") as f:
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


def _check_out(args) -> None:
    """--out: a folder that can be created (or, with --overwrite, an existing folder), checked
    before any work."""
    from accountant.output_path import OutputPathError, check_output_dir

    try:
        check_output_dir(args.out, overwrite=args.overwrite, what="--out")
    except OutputPathError as e:
        raise UserError(str(e)) from None


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        for name in ("n_generate", "max_new_tokens", "mia_limit", "seq_len"):
            if getattr(args, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1")
        if args.audit_draws and args.audit_draws < 1000:
            raise UserError("--audit-draws must be 0 (skip) or >= 1000")
        if args.data is not None and not os.path.isfile(args.data):
            raise UserError(f"--data: no such file: {args.data}")
        if args.table is not None and not os.path.isfile(args.table):
            raise UserError(f"--table: no such file: {args.table}")
        for flag, run_dir in [("--run", args.run)] + [("--baseline", b) for b in args.baseline]:
            if not os.path.isdir(run_dir):
                raise UserError(f"{flag}: not a run directory: {run_dir}")
        _check_out(args)
        s = evaluate_runs(args)
    except UserError as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return 2
    from .evaluation.report import summary_text

    print(summary_text(s, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
