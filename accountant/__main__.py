"""Command line: certify, audit and calibrate additive-noise mechanisms.

    python -m accountant epsilon --noise gaussian --sigma 6.05 --sampling-rate 0.01 --steps 1000 --delta 1e-10
    python -m accountant epsilon --noise lmo --params published.json --exp-lambda-as-scale --delta 1e-10
    python -m accountant epsilon --noise table --table noise.npz
    python -m accountant delta --noise laplace --scale 1 --epsilon 1 --sampling-rate 0.01 --steps 1000
    python -m accountant calibrate --noise gaussian --eps 0.3 --delta 1e-10 --sampling-rate 0.01 --steps 1000

Omitted --sampling-rate / --steps default to the run python -m noise_search assumes (q 0.01,
T 1000; a table's own for --noise table), and every output says which defaults it used. Printed
numbers are rounded outward (certificates up, lower bounds down); --json keeps full precision.

User mistakes end in one line on stderr and exit code 2 (also options that do not apply to the
chosen --noise, and unknown or mistyped keys in an LMO parameter file); a table whose law costs more
than its metadata claims exits with code 3; an interrupt exits with code 130 (nothing half-written).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
import warnings

INTERRUPTED = "python -m accountant: interrupted; nothing written"


def _exit_quietly(signum, frame):
    print(INTERRUPTED, file=sys.stderr)
    os._exit(130)


if __name__ == "__main__":   # Ctrl-C while the libraries load: nothing has started, nothing to clean up
    signal.signal(signal.SIGINT, _exit_quietly)
    signal.signal(signal.SIGTERM, _exit_quietly)

import numpy as np

from accountant.audit_cli import add_audit_command
from accountant.cli_common import (DEFAULT_SAMPLING_RATE, DEFAULT_STEPS, EPSILON_FLAGS, OneLineParser,
                                   failure_line, marked, positive_count, round_down, round_up, run_settings,
                                   settings_json)
from accountant.certify import Accuracy, calibrate, certify, delta_for_epsilon
from accountant.laws import cli_laws
from accountant.mechanism import GEOMETRIES, SAMPLING_RELATION, Mechanism
from accountant.noise import LMO
from accountant.output_path import check_output_file
from accountant.table import compare_claim, load_table, table_mechanism, write_certified_table

LMO_KEYS = ("a1", "a3", "a4", "G_k", "G_theta", "E_lambda", "U_a", "U_b")
# laws read from files, not from --PARAM options
_FILE_OPTIONS = {"lmo": ("params", "exp_lambda_as_scale"), "table": ("table",)}


def _families() -> tuple:
    """Every registered law with ``cli_params`` (accountant.laws), then the file-based ones."""
    return tuple(cli_laws()) + tuple(_FILE_OPTIONS)


def _family_options() -> dict:
    """The noise options each --noise reads; any other one given is refused (it would be silently ignored)."""
    return {**{name: tuple(cls.cli_params) for name, cls in cli_laws().items()}, **_FILE_OPTIONS}


def _noise_options() -> tuple:
    return tuple(dict.fromkeys(o for opts in _family_options().values() for o in opts))


class UsageError(Exception):
    pass


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def _probability(text):
    value = _positive(float)(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {text}")
    return value


def _rate(text):
    value = _positive(float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value


def _add_noise_args(p: argparse.ArgumentParser, with_scale: bool = True):
    g = p.add_argument_group("noise")
    families = _families()
    g.add_argument("--noise", required=True, choices=families if with_scale else families[:-1],
                   help="noise family")
    helps: dict = {}
    for cls in cli_laws().values():
        for name, text in cls.cli_params.items():
            if with_scale or name != cls.scale_param:      # calibrate finds the scale
                helps.setdefault(name, []).append(text)
    for name, texts in helps.items():
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=_positive(float), help="; ".join(texts))
    g.add_argument("--params", metavar="FILE.json",
                   help="lmo: LMO-DP parameter JSON (a1, a3, a4, G_k, G_theta, E_lambda, U_a, U_b)")
    g.add_argument("--exp-lambda-as-scale", action="store_true",
                   help="lmo: read E_lambda as numpy's exponential SCALE (how the published sampler "
                        "drew it) instead of a rate")
    if with_scale:
        g.add_argument("--table", metavar="FILE.npz",
                       help="table: a noise table (format v1); epsilon compares the re-certified value with "
                            "the table's stored claim and exits with code 3 if the table claims less")


def _add_mechanism_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("mechanism (defaults for --noise table come from the table)")
    g.add_argument("--sampling-rate", type=_rate,
                   help=f"Poisson sampling rate q in (0, 1] (default {DEFAULT_SAMPLING_RATE}, as python -m noise_search)")
    g.add_argument("--steps", type=positive_count,
                   help=f"number of composed steps T (default {DEFAULT_STEPS}, as python -m noise_search)")
    g.add_argument("--sensitivity", "--max-grad-norm", dest="sensitivity", type=_positive(float), default=1.0,
                   help="sensitivity / clipping norm C (default 1)")
    g.add_argument("--sampling", choices=tuple(SAMPLING_RELATION), default="poisson",
                   help="poisson: each example joins a step with probability q (add/remove); fixed: "
                        "batches of exactly B = q N without replacement (substitution: the sum moves "
                        "by 2 x --sensitivity; docs/privacy.md section 10)")
    g.add_argument("--geometry", choices=GEOMETRIES,
                   help="scalar: one real query; l2 / l1: vector query clipped in that norm (default scalar)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.add_argument_group("accuracy (both sized automatically by default; docs/privacy.md section 6)")
    a.add_argument("--pld-step", type=_positive(float),
                   help="PLD grid step (default: from the Connect-the-Dots error model, at most 1e-4)")
    a.add_argument("--prv-eps-error", type=_positive(float),
                   help="prv-accountant eps_error (default: 1e-3 x epsilon, raised only as far as the "
                        "PRV grid limit requires)")
    a.add_argument("--memory-budget", type=_positive(float), default=4.0, metavar="GIB",
                   help="memory the grids of one certificate may use, in GiB (default 4); grids are "
                        "coarsened (soundly) to fit it, and a certificate that cannot fit is refused")


def _refuse_irrelevant(args) -> None:
    """One line for a noise option the chosen --noise does not read (``--noise gaussian --scale 5``)."""
    options = _family_options()
    for name in _noise_options():
        if getattr(args, name, None) not in (None, False) and name not in options[args.noise]:
            reads = ", ".join("--" + n.replace("_", "-") for n in options[args.noise])
            raise UsageError(f"--{name.replace('_', '-')} does not apply to --noise {args.noise} "
                             f"(it reads {reads})")


def _check_lmo_keys(cfg: dict, path: str) -> None:
    """Exactly the published keys, each a finite number: a misspelt key must not fall back silently."""
    unknown = [key for key in cfg if key not in LMO_KEYS]
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        raise UsageError(f"{path}: unknown key{'s' if len(unknown) > 1 else ''} {names} "
                         f"(an LMO parameter file holds exactly {', '.join(LMO_KEYS)})")
    missing = [key for key in LMO_KEYS if key not in cfg]
    if missing:
        raise UsageError(f"{path}: missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    for key in LMO_KEYS:
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UsageError(f"{path}: {key} must be a finite number, got {json.dumps(value)}")


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs):
    """JSON object hook: a key given twice is refused (json.load would keep the last one silently)."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(repr(key))
        seen.add(key)
    return dict(pairs)


def _load_lmo(args) -> LMO:
    if not args.params:
        raise UsageError("--noise lmo needs --params FILE.json")
    try:
        with open(args.params) as handle:
            cfg = json.load(handle, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as exc:
        raise UsageError(f"{args.params}: key {exc} appears more than once (which one is meant?)") from None
    except OSError as exc:
        raise UsageError(f"cannot read {args.params}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{args.params} is not a valid JSON text file: {exc}") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"{args.params} must hold a JSON object")
    _check_lmo_keys(cfg, args.params)
    return LMO.from_published(cfg, exp_lambda_as_scale=args.exp_lambda_as_scale)


def _noise_and_defaults(args):
    """(noise, defaults dict) from the family arguments."""
    _refuse_irrelevant(args)
    laws = cli_laws()
    if args.noise in laws:
        cls = laws[args.noise]
        return cls(**_law_values(args, cls, cls.cli_params)), {}
    if args.noise == "lmo":
        return _load_lmo(args), {}
    if not args.table:
        raise UsageError("--noise table needs --table FILE.npz")
    table = load_table(args.table)
    return table.noise, {"sampling_rate": table.sampling_rate, "steps": table.steps,
                         "geometry": table.geometry, "delta": table.delta, "table": table}


def _law_values(args, cls, names) -> dict:
    """The constructor arguments of a registered law from its --PARAM options (all required)."""
    for name in names:
        if getattr(args, name, None) is None:
            raise UsageError(f"--noise {cls.family} needs --{name.replace('_', '-')}")
    return {name: getattr(args, name) for name in names}


def _sensitivity(args) -> float:
    """The change of the query under the certified relation: C (add/remove), 2C (substitution)."""
    return args.sensitivity * (2.0 if getattr(args, "sampling", "poisson") == "fixed" else 1.0)


def _mechanism(args):
    noise, defaults = _noise_and_defaults(args)
    values, sources = run_settings(args, defaults)
    mech = Mechanism(noise, _sensitivity(args), values["geometry"], values["sampling_rate"], values["steps"],
                     sampling=getattr(args, "sampling", "poisson"))
    return mech, defaults, sources


def _describe(mech: Mechanism, sources: dict | None = None, scale_up: bool = False) -> str:
    """One line for people.  ``scale_up``: the scale parameters (sigma, scale) are rounded up, so
    the printed noise is at least the certified one."""
    sources = sources or {}
    up = scale_up and mech.noise.family in cli_laws()
    params = ", ".join(f"{k}={round_up(v, 6) if up and k == mech.noise.scale_param else f'{v:.6g}'}"
                       for k, v in mech.noise.params.items())
    sampling = (f"fixed-size batches without replacement (gamma = B/N), relation {mech.relation}, "
                if mech.sampling == "fixed" else "")
    return (f"{mech.noise.family}({params}), E|Z| = {mech.noise.expected_abs():.6g}, {sampling}sensitivity "
            f"{mech.sensitivity:g}, geometry {marked(mech.geometry, sources.get('geometry'))}, "
            f"q = {marked(f'{mech.sampling_rate:g}', sources.get('sampling_rate'))}, "
            f"T = {marked(str(mech.steps), sources.get('steps'))}")


def _accuracy(args) -> Accuracy:
    return Accuracy(pld_step=args.pld_step, prv_eps_error=args.prv_eps_error,
                    memory_budget=args.memory_budget * 2 ** 30)


def cmd_epsilon(args) -> dict:
    mech, defaults, sources = _mechanism(args)
    delta = args.delta if args.delta is not None else defaults.get("delta")
    if delta is None:
        raise UsageError("--delta is required")
    start = time.perf_counter()
    cert = certify(mech, delta, _accuracy(args))
    out = {"epsilon": cert.epsilon, "delta": delta, "mechanism": mech.describe(),
           "expected_abs": mech.noise.expected_abs(),
           "routes": {name: r["upper"] for name, r in cert.routes.items()},
           "route_details": cert.routes, "checks": cert.checks, "seconds": time.perf_counter() - start,
           **settings_json(mech.describe(), sources)}
    if isinstance(mech.noise, LMO):
        out["lmo_pure_eps_per_step_1d"] = _lmo_eps0(mech.noise, mech.sensitivity)
    check = _claim_check(defaults.get("table"), mech, delta, cert)
    if "table" in defaults:
        out["claimed"] = _claimed(defaults["table"])
        out["matches_claim"] = None if check is None else check.matches
        if check is not None and not check.matches:
            out["claim_message"] = check.message
    if not args.json:
        print(f"mechanism : {_describe(mech, sources)}")
        delta_source = "table's" if args.delta is None else None
        relation = ("substitution of one example" if mech.relation == "substitution"
                    else "max over add and remove relations")
        print(f"delta     : {marked(f'{delta:g}', delta_source)}  ({relation})")
        for name, r in cert.routes.items():
            print(f"  {name:5s} : epsilon in [{round_down(r['lower'])}, {round_up(r['upper'])}]")
        if "table" in cert.checks:
            print(f"  table check (independent cells): epsilon >= {round_down(cert.checks['table']['lower'])}")
        if "lmo_pure_eps_per_step_1d" in out:
            print(f"  (one step alone is pure {out['lmo_pure_eps_per_step_1d']:.6g}-DP for a scalar query)")
        if "table" in defaults:
            c = out["claimed"]
            print(f"table claims     : epsilon {round_up(c['epsilon'])} at delta {c['delta']:g} (target {c['eps_target']:g}, "
                  f"q = {c['sampling_rate']:g}, T = {c['steps']}, {c['geometry']}, sensitivity 1)")
        print(f"certified epsilon: {round_up(cert.epsilon)}   [{out['seconds']:.1f} s]")
        if math.isinf(cert.epsilon) and cert.routes.get("pld", {}).get("infinite_loss_mass", 0.0) > delta:
            print(f"(no finite epsilon: the privacy loss is +inf with probability "
                  f"{cert.routes['pld']['infinite_loss_mass']:.4g} > delta; docs/privacy.md section 4)")
        elif "closed_form" in cert.routes:
            print(f"({cert.routes['closed_form']['note']}; docs/privacy.md section 6)")
        elif math.isinf(cert.epsilon):
            print("(no finite epsilon could be certified: the privacy loss exceeds what float64 "
                  "accounting represents; docs/privacy.md section 4)")
        if "table" in defaults and check is None:
            print("(not compared with the claim: the mechanism or delta differs from the table's)")
    return out


def _claimed(table) -> dict:
    meta = table.metadata
    return {"epsilon": table.certified_epsilon, "eps_target": meta["eps_target"], "delta": table.delta,
            "routes": meta["certified_epsilon"], "sampling_rate": table.sampling_rate, "steps": table.steps,
            "geometry": table.geometry}


def _claim_check(table, mech: Mechanism, delta: float, cert):
    """The table's claim against this certificate, when it is of the table's own mechanism."""
    if table is None or delta != table.delta or mech.describe() != table_mechanism(table).describe():
        return None
    return compare_claim(table, cert)


def _lmo_eps0(noise: LMO, sensitivity: float) -> float:
    """Pure epsilon of one unsubsampled scalar LMO release: ln p(0)/p(C) = ln(E[u]/E[u exp(-uC)])
    (docs/soundness.md section 1; the log-likelihood ratio of a Laplace scale mixture peaks at x = C)."""
    return float(noise.logpdf(0.0) - noise.logpdf(sensitivity))


def cmd_delta(args) -> dict:
    mech, _, sources = _mechanism(args)
    delta = delta_for_epsilon(mech, args.epsilon, _accuracy(args))
    if not args.json:
        print(f"mechanism : {_describe(mech, sources)}")
        print(f"certified delta at epsilon {args.epsilon:g}: {round_up(delta, 4)}")
    return {"delta": delta, "epsilon": args.epsilon, "mechanism": mech.describe(),
            **settings_json(mech.describe(), sources)}


def cmd_calibrate(args) -> dict:
    _refuse_irrelevant(args)
    if args.out:   # before any work: a path that cannot be written fails in the first second
        check_output_file(args.out, overwrite=args.overwrite, what="--out")
    if args.noise == "lmo":
        shape = _load_lmo(args)
        make = shape.scaled
    else:
        cls = cli_laws()[args.noise]
        if cls.scale_param is None:
            raise UsageError(f"--noise {args.noise} names no scale parameter to calibrate")
        fixed = _law_values(args, cls, [n for n in cls.cli_params if n != cls.scale_param])
        make = lambda s: cls(**fixed, **{cls.scale_param: s})  # noqa: E731
    values, sources = run_settings(args, {})
    q, steps, geometry = values["sampling_rate"], values["steps"], values["geometry"]
    sampling = getattr(args, "sampling", "poisson")
    if sampling == "fixed" and args.out:
        raise UsageError("--out writes a table certified for Poisson sampling; drop --out with --sampling fixed")
    # The mechanism is scale invariant (noise s*C at sensitivity C is noise s at sensitivity 1), so
    # calibrate in units of C: that certificate is also the one of the table, which is in units of C.
    unit = _sensitivity(args) / args.sensitivity
    extra = {"sampling": sampling} if sampling != "poisson" else {}
    unit_scale, cert = calibrate(make, args.eps, args.delta, q, steps, geometry, unit, accuracy=_accuracy(args),
                                 **extra)
    scale = unit_scale * args.sensitivity
    noise = make(scale)
    out = {"scale": scale, "scale_per_unit_sensitivity": unit_scale, "noise": noise.family,
           "params": noise.params, "expected_abs": noise.expected_abs(),
           "epsilon": cert.epsilon, "routes": {n: r["upper"] for n, r in cert.routes.items()},
           "sampling_rate": q, "steps": steps, "geometry": geometry, **settings_json(values, sources)}
    if args.out:
        write_certified_table(args.out, make(unit_scale), eps_target=args.eps, delta=args.delta,
                              sampling_rate=q, steps=steps, geometry=geometry, certificate=cert)
        out["table"] = args.out
    if not args.json:
        mech = Mechanism(noise, _sensitivity(args), geometry, q, steps, sampling=sampling)
        print(f"calibrated: {_describe(mech, sources, scale_up=True)}")
        print(f"certified epsilon {round_up(cert.epsilon)} <= target {args.eps:g} at delta {args.delta:g}")
        if args.out:
            print(f"table written: {args.out} (in units of the sensitivity: {make(unit_scale)!r})")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m accountant",
        description="Certified privacy accounting for additive noise under Poisson subsampling and "
                    "composition. Every epsilon is the larger upper bound of two independent "
                    "accountants (prv-accountant and dp-accounting), maximised over the add and "
                    "remove relations; the command refuses mechanisms no theorem covers.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    p = sub.add_parser("epsilon", help="certified epsilon at a delta (also audits LMO-DP configurations)")
    _add_noise_args(p)
    _add_mechanism_args(p)
    p.add_argument("--delta", type=_probability, help="target delta in (0, 1) (default for tables: theirs)")
    p.set_defaults(run=cmd_epsilon)
    p = sub.add_parser("delta", help="certified delta at an epsilon")
    _add_noise_args(p)
    _add_mechanism_args(p)
    p.add_argument(*EPSILON_FLAGS, dest="epsilon", type=_positive(float), required=True, help="epsilon > 0")
    p.set_defaults(run=cmd_delta)
    p = sub.add_parser("calibrate", help="smallest noise scale whose certified epsilon meets a target")
    _add_noise_args(p, with_scale=False)
    _add_mechanism_args(p)
    p.add_argument(*EPSILON_FLAGS, dest="eps", type=_positive(float), required=True, help="target epsilon > 0")
    p.add_argument("--delta", type=_probability, required=True, help="target delta in (0, 1)")
    p.add_argument("--out", metavar="TABLE.npz",
                   help="also write the calibrated law as a certified table (in units of the sensitivity)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file (default: an existing file is refused, exit 2)")
    p.set_defaults(run=cmd_calibrate)
    add_audit_command(sub, _add_noise_args, _noise_and_defaults)
    return parser


def _terminate(signum, frame):
    raise KeyboardInterrupt   # SIGTERM ends like Ctrl-C: one line, exit 130, nothing half-written


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)   # from here on, clean up on the way out
    signal.signal(signal.SIGTERM, _terminate)
    try:
        # float warnings of the numerical libraries are not messages for the user: a result that
        # is not finite is checked where it is used, and ends in the one line below
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            out = args.run(args)
    except UsageError as exc:
        print(" ".join(f"error: {exc}".split()), file=sys.stderr)
        return 2
    except (ValueError, ArithmeticError, RuntimeError, MemoryError) as exc:
        print(failure_line(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # tables are written to a temporary sibling and renamed: none is half-written
        print(INTERRUPTED, file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(out, indent=1, default=float))
    if out.get("matches_claim") is False:
        print(out["claim_message"], file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
