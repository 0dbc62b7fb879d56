"""A training run directory as a transaction: staged in a hidden sibling, published by one rename.

``python -m finetune --out DIR`` never writes into ``DIR`` while it trains.  Everything (checkpoints,
the ledger, the final weights and metrics) goes to the staging sibling ``.DIR.partial`` next to it;
the finished run becomes ``DIR`` by one ``os.rename``, so ``DIR`` is either absent or complete.  An
interrupted run (SIGINT/SIGTERM: a consistent checkpoint and ``ledger.json``; SIGKILL: the last
checkpoint) stays in the staging sibling; ``--resume DIR`` (or ``--resume .DIR.partial``) continues
it.  Runs interrupted by earlier versions sit in ``DIR`` itself (a checkpoint, no ``metrics.json``);
``--resume DIR`` continues those too.

An existing ``DIR`` (or staging sibling) is refused unless ``--overwrite`` or ``--resume``.
``--overwrite`` discards an unfinished staging sibling at the start but keeps a previous ``DIR``
until the new run has finished: :meth:`RunDirectory.publish` then moves the old run aside
(``.DIR.replaced``), renames the new one to ``DIR`` and only then deletes the old one, so a killed
or failed new run leaves the previous result in place.  Single files are written by
:func:`atomic_write`: a temporary file in the same folder, flushed and fsynced, then
``os.replace`` -- a reader (or a resumed run after a crash) sees the old file or the new one, never
half of one.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from accountant.output_path import (OutputPathError, _fsync_dir, atomic_write,  # noqa: F401 - re-exported
                                    atomic_write_with, check_output_dir)

__all__ = ["RunDirError", "RunDirectory", "atomic_write", "atomic_write_with", "staging_path",
           "replaced_path", "out_of", "CHECKPOINT_NAME", "METRICS_NAME"]

CHECKPOINT_NAME = "checkpoint.safetensors"
METRICS_NAME = "metrics.json"


class RunDirError(ValueError):
    """A run directory that must not be written or cannot be resumed; the message is one line."""


def staging_path(out) -> Path:
    """The hidden sibling a run into ``out`` is staged in."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def replaced_path(out) -> Path:
    """Where a previous run into ``out`` waits while ``--overwrite`` puts the new one in place."""
    out = Path(out)
    return out.parent / f".{out.name}.replaced"


def out_of(path) -> Path:
    """``DIR`` for ``DIR`` or for its staging sibling ``.DIR.partial``."""
    path = Path(path)
    name = path.name
    if name.startswith(".") and name.endswith(".partial") and len(name) > len("..partial"):
        return path.parent / name[1:-len(".partial")]
    return path


#: files by which ``--overwrite`` recognises a run directory it may clear
RUN_FILES = (CHECKPOINT_NAME, METRICS_NAME, "ledger.json", "adapter.safetensors", "model.safetensors")


def _check_clearable(out: Path) -> None:
    """``--overwrite`` deletes ``out``: only an empty folder or a previous run, never the working
    directory or one of its parents."""
    here = Path.cwd().resolve()
    target = out.resolve()
    if target == here or target in here.parents:
        raise RunDirError(f"--overwrite would delete {str(out)!r}, the working directory or a parent "
                          "of it; choose another --out")
    if any(target.iterdir()) and not any((target / name).exists() for name in RUN_FILES):
        raise RunDirError(f"--overwrite: {str(out)!r} does not look like a run directory (none of "
                          f"{', '.join(RUN_FILES)}); remove it yourself if it should go")


class RunDirectory:
    """The output folder of one run and its staging sibling.

    ``RunDirectory.for_new_run(out, overwrite=)`` and ``RunDirectory.for_resume(out)`` only check
    (nothing is touched, so they can run before any work); :meth:`begin` discards an unfinished
    staging folder (``--overwrite``) and creates a new one; :meth:`publish` renames it to ``out``
    (with ``overwrite``, replacing a previous run only then).
    """

    def __init__(self, out, *, overwrite: bool = False, resume_from: Path | None = None):
        self.out = Path(out)
        self.staging = staging_path(self.out)
        self.overwrite = bool(overwrite)
        self.resume_from = resume_from

    # ---- checks (no side effects) -------------------------------------------------------------
    @classmethod
    def for_new_run(cls, out, *, overwrite: bool = False) -> "RunDirectory":
        try:
            check_output_dir(out, overwrite=overwrite, what="--out")
        except OutputPathError as e:
            msg = str(e)
            if not overwrite and Path(out).is_dir():
                msg += " or --resume to continue it"
            raise RunDirError(msg) from None
        run = cls(out, overwrite=overwrite)
        if overwrite and run.out.is_dir():
            _check_clearable(run.out)
        if run.staging.exists() and not overwrite:
            raise RunDirError(f"an unfinished run into {str(out)!r} exists in {str(run.staging)!r}; "
                              f"continue it with --resume {out} or pass --overwrite to discard it")
        return run

    @classmethod
    def for_resume(cls, out) -> "RunDirectory":
        """The run to continue: the staging sibling of ``out`` (interrupted or killed; ``out`` may
        name either), or ``out`` itself (a run interrupted by an earlier version).  If ``out`` also
        holds a finished run, the resumed run replaces it when it finishes (``overwrite``): the
        caller checks that the interrupted run was started with ``--overwrite``."""
        out = out_of(out)
        staging = staging_path(out)
        if out.exists() and not out.is_dir():
            raise RunDirError(f"--resume {str(out)!r} is a file, not a run directory")
        candidates = [d for d in (staging, out) if (d / CHECKPOINT_NAME).is_file()]
        if out in candidates and staging.exists() and not (out / METRICS_NAME).is_file():
            raise RunDirError(f"both {str(out)!r} and its unfinished sibling {str(staging)!r} exist; "
                              "remove the one you do not want to continue")
        if staging.exists() and staging in candidates:
            try:
                check_output_dir(staging, allow_existing=True, what="--resume")
            except OutputPathError as e:
                raise RunDirError(str(e)) from None
            return cls(out, overwrite=out.exists(), resume_from=staging)
        if not candidates:
            if (out / METRICS_NAME).is_file():
                raise RunDirError(f"{str(out)!r} is a finished run without a checkpoint; nothing to resume")
            raise RunDirError(f"no checkpoint to resume in {str(out)!r}"
                              + ("" if out.exists() else f" or {str(staging)!r}"))
        src = candidates[0]
        if src == out and (out / METRICS_NAME).is_file():
            raise RunDirError(f"{str(out)!r} is a finished run; nothing to resume")
        try:  # the staging folder must be writable (parent of out)
            check_output_dir(staging, allow_existing=True, what="--resume")
        except OutputPathError as e:
            raise RunDirError(str(e)) from None
        return cls(out, resume_from=src)

    @property
    def checkpoint_to_resume(self) -> Path | None:
        return None if self.resume_from is None else self.resume_from / CHECKPOINT_NAME

    # ---- actions ------------------------------------------------------------------------------
    def begin(self) -> Path:
        """Prepare the staging folder (called once every refusal has happened) and return it."""
        if self.resume_from is not None:
            if self.resume_from != self.staging:
                os.rename(self.resume_from, self.staging)   # atomic: out disappears, staging appears
                _fsync_dir(self.staging.parent)
            return self.staging
        if self.overwrite:  # an unfinished run into out; a finished one is replaced by publish()
            _remove(self.staging)
        self.staging.mkdir(parents=False)
        return self.staging

    def path(self, name: str) -> Path:
        return self.staging / name

    def publish(self) -> Path:
        """Rename the finished run's staging folder to ``out``.  With ``overwrite`` a previous
        ``out`` is moved aside first and deleted once the new run is in place (if the rename fails
        it is moved back)."""
        old = None
        if self.out.exists():
            if not self.overwrite:
                raise RunDirError(f"{str(self.out)!r} appeared while the run was training; the run "
                                  f"is left in {str(self.staging)!r}")
            old = replaced_path(self.out)
            _remove(old)            # left over from a crash between the two renames below
            os.rename(self.out, old)
        try:
            os.rename(self.staging, self.out)
        except BaseException:
            if old is not None:
                os.rename(old, self.out)
            raise
        _fsync_dir(self.out.parent)
        if old is not None:
            _remove(old)
        return self.out


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
