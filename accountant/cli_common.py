"""What the command lines (``python -m accountant`` and ``python -m noise_search``) share, so that
they agree: the default run length (q and T), the spellings of an epsilon option, one-line usage
errors, and how numbers are rounded for reading.

Rounding is outward, never towards the unsafe side: an upper bound on epsilon or delta (a
certificate) and a noise scale are rounded up, a lower bound (an audit) is rounded down, so a
number a person copies from the screen is still true.  ``--json`` output keeps full precision.
"""
from __future__ import annotations

import argparse
import math
import traceback
from pathlib import Path
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

# The run both CLIs assume when --sampling-rate / --steps are omitted: Poisson rate 0.01 and 1000
# steps (e.g. expected batch 500 of 50,000 examples for 10 epochs), a realistic DP fine-tuning run.
DEFAULT_SAMPLING_RATE = 0.01
DEFAULT_STEPS = 1000

EPSILON_FLAGS = ("--eps", "--epsilon")   # both spellings, wherever an epsilon is taken


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line (exit code 2), not a usage dump; the one
    parser of every command line (``finetune.cli`` names the program first, as its other errors do)."""

    name_the_program = False

    def error(self, message):
        head = f"{self.prog}: " if self.name_the_program else ""
        self.exit(2, f"{head}error: {message} (see: {self.prog} --help)\n")


def positive_count(text: str) -> int:
    """argparse type of a count (steps, dimension): a positive integer, also written as 1e12."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value >= 1 and value.is_integer()):
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return int(text) if text.strip().lstrip("+").isdigit() else int(value)


_PACKAGES = ("accountant", "noise_search")


def _written_for_the_user(exc: BaseException) -> bool:
    """An error class of this project, or a ValueError raised by a ``raise`` statement of this
    project: its message states the mistake. Anything else (``int(nan)``, an overflow, a library's
    internal check) is a numerical failure whose bare message would not tell the user what to change."""
    if type(exc).__module__.split(".")[0] in _PACKAGES:
        return True
    if type(exc) is not ValueError:
        return False
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return False
    last = frames[-1]
    own = Path(last.filename).resolve().parent.name in _PACKAGES
    return own and (last.line or "").lstrip().startswith("raise")


def failure_line(exc: BaseException) -> str:
    """The one line (no traceback) a command line prints for ``exc`` before exiting with code 2."""
    detail = " ".join(str(exc).split()) or type(exc).__name__
    if _written_for_the_user(exc):
        return f"error: {detail}"
    return (f"error: cannot compute this case ({type(exc).__name__}: {detail}); the parameters lie outside "
            f"the range this accountant supports: bring the noise scale / sensitivity ratio, epsilon and "
            f"the number of steps nearer to usual values")


def _outward(x: float, digits: int, rounding: str) -> str:
    if not math.isfinite(x) or x == 0:
        return f"{x:g}"
    exact = Decimal(x)   # the binary value itself, so the rounding direction is exact
    quantum = Decimal(1).scaleb(exact.adjusted() - digits + 1)
    rounded = exact.quantize(quantum, rounding=rounding)
    if -4 <= rounded.adjusted() < 6:
        return f"{rounded:f}"
    return f"{float(rounded):.{digits - 1}e}"   # `rounded` has `digits` digits: printed as is


def round_up(x: float, digits: int = 5) -> str:
    """``x`` to ``digits`` significant digits, rounded up (the printed number is >= x)."""
    return _outward(float(x), digits, ROUND_CEILING)


def round_down(x: float, digits: int = 5) -> str:
    """``x`` to ``digits`` significant digits, rounded down (the printed number is <= x)."""
    return _outward(float(x), digits, ROUND_FLOOR)


def round_down_above(x: float, floor: float, digits: int = 5) -> str:
    """``x`` rounded down, with as many digits as it takes to stay above ``floor`` (x > floor)."""
    for more in range(digits, 18):
        text = round_down(x, more)
        if float(text) > floor:
            return text
    return repr(float(x))


SHARED_DEFAULTS = {"sampling_rate": DEFAULT_SAMPLING_RATE, "steps": DEFAULT_STEPS, "geometry": "scalar"}


def run_settings(args, defaults: dict, names=("sampling_rate", "steps", "geometry")):
    """The value of each setting and, when the user omitted it, where it came from: the table's own
    (``--noise table``) or the default shared with python -m noise_search."""
    values, sources = {}, {}
    for name in names:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
        elif name in defaults:
            values[name], sources[name] = defaults[name], "table's"
        else:
            values[name], sources[name] = SHARED_DEFAULTS[name], "default"
    return values, sources


def settings_json(values: dict, sources: dict) -> dict:
    """The --json record of the settings the user did not give: {name: value} by source."""
    out = {"defaults_used": {n: values[n] for n, s in sources.items() if s == "default"}}
    from_table = {n: values[n] for n, s in sources.items() if s == "table's"}
    if from_table:
        out["from_table"] = from_table
    return out


def marked(value: str, source: str | None) -> str:
    """``value`` followed by where it came from when the user did not give it."""
    return f"{value} ({source})" if source else value
