"""What the finetune command-line programs share: usage mistakes end in one line, exit code 2
(:class:`UserError`, :class:`OneLineParser`); SIGINT/SIGTERM stop a long run cleanly (:class:`Stopper`)."""
from __future__ import annotations

import os
import shutil
import signal
import sys
import threading

from accountant import cli_common


class UserError(Exception):
    """A mistake in the command line or the inputs: one line, exit code 2."""


class OneLineParser(cli_common.OneLineParser):
    """The command lines' one-line parser (``accountant.cli_common``), reporting a usage mistake as
    ``PROG: error: ...`` like the finetune programs' other errors."""

    name_the_program = True


def warn_known_seed(prog: str, seed) -> None:
    """Print on stderr, in one line, that an explicit ``--seed`` makes the run's noise public."""
    from accountant.randomness import known_seed_message

    sys.stderr.write(f"{prog}: warning: --seed given: {known_seed_message(seed)}\n")


class Interrupted(Exception):
    """A long run stopped by SIGINT/SIGTERM after saving; ``code`` is the exit code (128 + signal)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def run_guarded(prog: str, work, at_once):
    """``(exit code, result)`` of ``work(stopper)`` run under a :class:`Stopper`: a
    :class:`UserError` prints ``PROG: error: ...`` (2), an :class:`Interrupted` its message (its
    code), a second SIGINT the line ``at_once()`` returns (130); each in one line."""
    try:
        with Stopper() as stopper:
            return 0, work(stopper)
    except UserError as e:
        sys.stderr.write(f"{prog}: error: {e}\n")
        return 2, None
    except Interrupted as e:
        sys.stderr.write(f"{prog}: {e}\n")
        return e.code, None
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: {at_once()}\n")
        return 130, None


def _c_handler(signum):
    """Address of the C-level handler installed for ``signum`` (Linux/glibc), or None."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(512)          # struct sigaction; handler comes first
        if libc.sigaction(int(signum), None, buf) != 0:
            return None
        return ctypes.c_void_p.from_buffer(buf).value
    except Exception:  # pragma: no cover - other platforms
        return None


class _StopEvent(threading.Event):
    """The event a long loop checks; ``rearm()`` (called by the loop after every step) installs the
    handlers again: MindSpore's runtime replaces the SIGINT handler with one that raises SIGTERM
    when it executes a graph."""

    def __init__(self, owner):
        super().__init__()
        self._owner = owner

    def rearm(self):
        self._owner.install()


class Stopper:
    """The signal handling of every command line: the first SIGINT/SIGTERM sets ``event`` (the
    loop finishes its step, saves and stops; ``on_signal(signum)``, if given, runs too, e.g. to
    clean up and exit at once where there is nothing to save), a second SIGINT raises
    ``KeyboardInterrupt`` at once.  A context manager: the previous handlers come back on exit.
    Outside the main thread (where Python cannot install handlers) it does nothing."""

    def __init__(self, on_signal=None):
        self.event = _StopEvent(self)
        self.signum = None
        self.on_signal = on_signal
        self._old = {}
        self._ours = None

    def _handle(self, signum, frame):
        if signum == signal.SIGTERM and self._ours is not None and \
                _c_handler(signal.SIGINT) not in (None, self._ours):
            # MindSpore's handler was active (a graph was running): it turns SIGINT into SIGTERM
            signum = signal.SIGINT
        if self.event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        self.event.set()
        if self.on_signal is not None:
            self.on_signal(signum)

    def install(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old = signal.signal(sig, self._handle)
                self._old.setdefault(sig, old)
            self._ours = _c_handler(signal.SIGINT)

    def __enter__(self):
        self.install()
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
        return False

    @property
    def exit_code(self) -> int:
        """128 + the signal's number (130 for SIGINT, 143 for SIGTERM), the shells' convention."""
        return 128 + int(self.signum or signal.SIGINT)


def exit_at_once(prog: str, staged: list, what: str = "nothing was written to --out"):
    """A :class:`Stopper` ``on_signal`` for a program with nothing to save: remove the staging
    folders in ``staged``, say so in one line and exit with 128 + the signal's number.  Raising an
    exception instead could surface inside MindSpore's graph compiler, which logs it with a stack
    and leaves an analyze_fail.ir file behind.  While ``staged`` is empty (the result is being
    renamed into place) the signal only sets the stop event, so a rename is never cut in half."""
    def on_signal(signum):
        if not staged:
            return
        for path in list(staged):
            shutil.rmtree(path, ignore_errors=True)
        os.write(2, f"{prog}: interrupted by {signal.Signals(signum).name}; {what}\n".encode())
        os._exit(128 + int(signum))
    return on_signal
