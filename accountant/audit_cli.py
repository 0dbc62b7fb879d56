"""`python -m accountant audit`: a certified lower bound on the true epsilon of product noise under
L2 clipping (docs/privacy.md, section 'Audit'), compared with a claimed epsilon.

    python -m accountant audit --noise lmo --params published.json --dimension 355000000 \\
        --sampling-rate 0.01 --steps 1000 --delta 1e-10 --claimed-epsilon 0.3
"""
from __future__ import annotations

import argparse
import math

from accountant.audit import audit
from accountant.cli_common import (DEFAULT_SAMPLING_RATE, DEFAULT_STEPS, marked, round_down, round_down_above,
                                   round_up, run_settings, settings_json)
from accountant.mechanism import Mechanism


def _positive_int(text):
    try:
        value = int(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1 or value != float(text):
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _number(low, high, closed_high):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        ok = math.isfinite(value) and value > low and (value <= high if closed_high else value < high)
        if not ok:
            raise argparse.ArgumentTypeError(f"must lie in ({low:g}, {high:g}{']' if closed_high else ')'}, got {text}")
        return value
    return parse


def add_audit_command(sub, add_noise_args, noise_and_defaults):
    """Register the subcommand; ``add_noise_args`` and ``noise_and_defaults`` are the noise
    helpers of ``accountant.__main__`` (same --noise, family and --params arguments)."""
    p = sub.add_parser(
        "audit", help="certified LOWER bound on epsilon of product noise under l2 clipping (refutes claims)",
        description="Certified lower bound on the true epsilon of a DP-SGD configuration that adds i.i.d. "
                    "per-coordinate noise to L2-clipped gradients: the maximum over k = 1, 4, 16, ... <= d "
                    "of the bound from one neighbouring pair whose gradient difference is spread evenly over "
                    "k coordinates (docs/privacy.md, section 'Audit'). Prints the one-coordinate value (k = 1), "
                    "the Gaussian limit sigma_eff = 1/(C sqrt(I)) for reference, the certified upper bound "
                    "where one exists (Gaussian noise) and, with --claimed-epsilon, the verdict. Exit code 0 "
                    "whatever the verdict; 2 for usage errors.")
    add_noise_args(p)
    g = p.add_argument_group("mechanism")
    g.add_argument("--geometry", choices=("l2",), default="l2", help="clipping norm (only l2; default l2)")
    g.add_argument("--dimension", type=_positive_int, required=True,
                   help="number of coordinates d of the noised vector (e.g. the model's parameter count)")
    g.add_argument("--sampling-rate", type=_number(0, 1, True),
                   help=f"Poisson sampling rate q in (0, 1] (default {DEFAULT_SAMPLING_RATE}, as python -m noise_search)")
    g.add_argument("--steps", type=_positive_int,
                   help=f"number of composed steps T (default {DEFAULT_STEPS}, as python -m noise_search)")
    g.add_argument("--sensitivity", "--max-grad-norm", dest="sensitivity", type=_number(0, math.inf, False),
                   default=1.0,
                   help="clipping norm C (default 1)")
    g.add_argument("--delta", type=_number(0, 1, False), help="delta in (0, 1) (default for tables: theirs)")
    g.add_argument("--claimed-epsilon", "--claimed-eps", dest="claimed_epsilon", type=_number(-1e-300, math.inf, False),
                   help="the epsilon a paper or configuration claims; the verdict compares it with the bound")
    g.add_argument("--max-k", type=_positive_int,
                   help="largest k tried (default: the dimension)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    def run(args):
        return cmd_audit(args, noise_and_defaults)

    p.set_defaults(run=run)
    return p


def cmd_audit(args, noise_and_defaults) -> dict:
    noise, defaults = noise_and_defaults(args)
    values, sources = run_settings(args, defaults, names=("sampling_rate", "steps"))
    q, steps = values["sampling_rate"], values["steps"]
    delta = args.delta if args.delta is not None else defaults.get("delta")
    if delta is None:
        raise ValueError("--delta is required")
    mech = Mechanism(noise, args.sensitivity, "l2", q, steps)
    res = audit(mech, args.dimension, delta, args.claimed_epsilon, max_k=args.max_k, progress=not args.json)
    out = res.as_dict()
    out.update(settings_json(values, sources))
    if not args.json:
        params = ", ".join(f"{k}={v:.6g}" for k, v in noise.params.items())
        delta_source = "table's" if args.delta is None else None
        print(f"mechanism : {noise.family}({params}), C = {args.sensitivity:g}, l2, d = {args.dimension}, "
              f"q = {marked(f'{q:g}', sources.get('sampling_rate'))}, T = {marked(str(steps), sources.get('steps'))}, "
              f"delta = {marked(f'{delta:g}', delta_source)}")
        na = res.unavailable
        for row in res.per_k:
            shown = "n/a" if row["lower_bound"] is None else f"epsilon >= {round_down(row['lower_bound'])}"
            print(f"  k = {row['k']:>10d} : {shown}")
        one = "n/a" if res.one_coordinate is None else f"epsilon >= {round_down(res.one_coordinate)}"
        print(f"one coordinate (k = 1)     : {one}")
        if res.gaussian_limit is not None:
            print(f"Gaussian limit (reference) : {res.gaussian_limit:.5g}  (sigma_eff = {res.sigma_eff:.6g}, "
                  f"Fisher information {res.fisher_information:.6g})")
        elif "gaussian_limit" in na:
            print(f"Gaussian limit (reference) : n/a  (not computable here: {na['gaussian_limit']})")
        else:
            print("Gaussian limit (reference) : none (infinite Fisher information)")
        if res.upper_bound is not None:
            print(f"certified upper bound      : {round_up(res.upper_bound)}")
        elif "upper_bound" in na:
            print(f"certified upper bound      : n/a  (not computable here: {na['upper_bound']})")
        else:
            print("certified upper bound      : none (no theorem for this noise under l2)")
        if res.dimension > res.per_k[-1]["k"] * 4 and res.per_k[-1]["k"] < (args.max_k or res.dimension):
            print(f"(k stops at {res.per_k[-1]['k']}: larger k give no larger bound in float64)")
        print(f"certified lower bound: epsilon >= {round_down(res.lower_bound)}  (attained at k = {res.k})  "
              f"[{res.seconds:.1f} s]")
        if res.claimed_epsilon is not None:
            if res.refuted:
                shown = round_down_above(res.lower_bound, res.claimed_epsilon)
                print(f"claim refuted: true epsilon >= {shown} > claimed {res.claimed_epsilon:g}")
            else:
                print("not refuted by this test")
    return out
