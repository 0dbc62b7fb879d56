"""What the finetune command-line programs share: usage mistakes end in one line, exit code 2."""
from __future__ import annotations

import argparse
import sys


class UserError(Exception):
    """A mistake in the command line or the inputs: one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as ``PROG: error: ...`` in one line (exit code 2);
    argparse's default prints the whole usage too."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def warn_known_seed(prog: str, seed) -> None:
    """Print on stderr, in one line, that an explicit ``--seed`` makes the run's noise public."""
    from accountant.randomness import known_seed_message

    sys.stderr.write(f"{prog}: warning: --seed given: {known_seed_message(seed)}\n")
