"""Command line: ``python -m noise_search --eps 0.3 --delta 1e-10``.

Searches the noise with the least E|Z| (or variance) whose certified epsilon meets the target and
writes its table (format v1).  ``--eps`` and ``--epsilon`` are the same option; omitted
--sampling-rate / --steps default to the run python -m accountant assumes too (q 0.01, T 1000), and
the summary and --json say which defaults were used.  Certified epsilons are printed rounded up
(--json keeps full precision).  Exit codes: 0 success, 2 a user mistake, an infeasible target or an
output path that cannot be written or already exists (one line on stderr, no traceback, checked
before any work), 130 interrupted (no partial table is left behind).
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import sys

from accountant.cli_common import EPSILON_FLAGS, OneLineParser, marked, round_up, run_settings, settings_json
from accountant.output_path import OutputPathError, check_output_file
from noise_search.families import FAMILIES
from noise_search.search import DEFAULT_SAMPLING_RATE, DEFAULT_STEPS, TargetError

EPILOG = f"""
defaults: Poisson sampling rate {DEFAULT_SAMPLING_RATE} and {DEFAULT_STEPS} steps (e.g. expected batch 500
of 50,000 examples for 10 epochs), a realistic DP fine-tuning run.  All lengths are in units of the
clipping norm (sensitivity) C.

geometry:
  scalar  a one-dimensional query, |difference| <= C: every family, including free-form tabulated
          noise, is searched and the winner is written as a table (law "tabulated")
  l1      vectors clipped in L1 norm: only noise with a Lipschitz log-density (laplace, lmo) and the
          Gaussian (through its l2 certificate) are certifiable; written as parametric laws
  l2      vectors clipped in L2 norm: only the rotation-invariant Gaussian has an exact certificate;
          the answer is the calibrated Gaussian

families: {", ".join(FAMILIES)} (default: all)

Every epsilon printed is a certificate from accountant/ (PRV and PLD routes, the larger upper bound);
the fast accountant used to rank candidates is never reported as a guarantee.
"""


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m noise_search",
        description="Find the noise with the least E|Z| whose certified (epsilon, delta) meets a target "
                    "under Poisson subsampling and composition, and write it as a certified noise table.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(*EPSILON_FLAGS, dest="eps", type=float, required=True, help="target epsilon of the whole run")
    p.add_argument("--delta", type=float, required=True, help="target delta of the whole run, e.g. 1e-10")
    p.add_argument("--sampling-rate", type=float,
                   help=f"Poisson sampling rate q per step (default {DEFAULT_SAMPLING_RATE})")
    p.add_argument("--steps", type=int,
                   help=f"number of noisy steps T (default {DEFAULT_STEPS})")
    p.add_argument("--geometry", choices=("scalar", "l1", "l2"),
                   help="which neighbouring differences the certificate covers (default scalar)")
    p.add_argument("--family", action="append", metavar="NAME",
                   help="restrict the search to this family (repeat or comma-separate); "
                        f"one of: {', '.join(FAMILIES)}")
    p.add_argument("--objective", choices=("abs", "var"), default="abs",
                   help="minimise E|Z| (abs, default) or the variance (var)")
    p.add_argument("--out", metavar="PATH", help="table to write (default: noise_eps<E>_delta<D>_q<Q>_T<T>_<geometry>.npz; "
                                                 ".npz is appended if missing)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out / --plot file (default: an existing file is refused, exit 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the optimiser's random initial simplices (default 0)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of the found density against the Gaussian")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    return p


def default_out(eps: float, delta: float, q: float, steps: int, geometry: str) -> str:
    return f"noise_eps{eps:g}_delta{delta:g}_q{q:g}_T{steps}_{geometry}.npz"


def table_path(path: str) -> str:
    """The file a table is written to: ``path`` with ``.npz`` appended if missing."""
    return path if path.endswith(".npz") else path + ".npz"


def _fmt_params(params: dict) -> str:
    parts = []
    for key, val in params.items():
        if isinstance(val, list):
            parts.append(f"{key}=[{', '.join(f'{v:.3g}' for v in val)}]")
        elif key == "sigma" and isinstance(val, float):   # a Gaussian's sigma: rounded up (more noise)
            parts.append(f"{key}={round_up(val)}")
        elif isinstance(val, float):
            parts.append(f"{key}={val:.5g}")
        else:
            parts.append(f"{key}={val}")
    return ", ".join(parts)


def summary(result, sources: dict | None = None) -> str:
    """The result for people; ``sources`` marks the settings that were defaults (not given)."""
    cert, sources = result.certified_epsilon, sources or {}
    rows = [
        ("target", f"epsilon {result.eps_target:g}, delta {result.delta:g}, "
                   f"sampling rate q={marked(f'{result.sampling_rate:g}', sources.get('sampling_rate'))}, "
                   f"steps T={marked(str(result.steps), sources.get('steps'))}, "
                   f"geometry {marked(result.geometry, sources.get('geometry'))}"),
        ("family", f"{result.family} (sampled law: {result.law})"),
        ("parameters", _fmt_params(result.params)),
        ("E|Z|", f"{result.expected_abs:.4f}   (std {math.sqrt(result.variance):.4f})"),
        ("calibrated Gaussian", f"sigma {round_up(result.gaussian_sigma)}, E|Z| {result.gaussian_expected_abs:.4f}"),
        ("ratio to Gaussian", f"{result.ratio_to_gaussian:.4f} ({'E|Z|' if result.objective == 'abs' else 'variance'})"),
        ("certified epsilon", ", ".join(f"{k} {round_up(v)}" for k, v in cert.items()) + "  (rounded up)"),
        ("file written", str(result.path)),
        ("time", f"{result.seconds:.1f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    if result.candidates:
        lines.append("candidates (fast ranking accountant, not certificates):")
        for c in result.candidates:
            lines.append(f"  {c.family:10s} {result.objective}={c.ranking_objective:.4f}  {_fmt_params(c.params)}")
    for note in result.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def plot(result, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from accountant.noise import Gaussian

    g = Gaussian(result.gaussian_sigma)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, log in zip(axes, (False, True)):
        reach = (10 if log else 4) * result.gaussian_sigma
        x = np.linspace(-reach, reach, 4001)
        ax.plot(x, result.noise.pdf(x), label=f"{result.family} (E|Z| {result.expected_abs:.3f})")
        ax.plot(x, g.pdf(x), "--", label=f"Gaussian sigma {result.gaussian_sigma:.3f} "
                                          f"(E|Z| {result.gaussian_expected_abs:.3f})")
        ax.set_xlabel("noise / sensitivity")
        ax.set_ylabel("density")
        if log:
            ax.set_yscale("log")
            ax.set_ylim(1e-16, None)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"eps {result.eps_target:g}, delta {result.delta:g}, q {result.sampling_rate:g}, "
                 f"T {result.steps}, {result.geometry}: certified eps {result.certified_epsilon['final']:.5f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _terminate(signum, frame):
    raise KeyboardInterrupt   # SIGTERM cleans up like Ctrl-C: no partial table is left behind


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    settings, sources = run_settings(args, {})
    args.sampling_rate, args.steps, args.geometry = settings["sampling_rate"], settings["steps"], settings["geometry"]
    signal.signal(signal.SIGTERM, _terminate)
    families = None
    if args.family:
        families = [f.strip() for item in args.family for f in item.split(",") if f.strip()]
    out = table_path(args.out or default_out(args.eps, args.delta, args.sampling_rate, args.steps, args.geometry))
    try:
        check_output_file(out, overwrite=args.overwrite, what="--out")   # before any work
        if args.plot:
            check_output_file(args.plot, overwrite=args.overwrite, what="--plot")
        from noise_search.search import search
        result = search(args.eps, args.delta, sampling_rate=args.sampling_rate, steps=args.steps,
                        geometry=args.geometry, families=families, objective=args.objective, out=out,
                        seed=args.seed, progress=not args.quiet and not args.json, overwrite=args.overwrite)
        if args.plot:
            plot(result, args.plot)
    except (TargetError, OutputPathError) as exc:
        print(f"noise_search: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("noise_search: interrupted; no table written", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps({**result.to_json(), **settings_json(settings, sources)}, indent=2))
    elif not args.quiet:
        print(summary(result, sources))
    return 0


if __name__ == "__main__":
    sys.exit(main())
