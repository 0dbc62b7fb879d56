"""Training checkpoints: one safetensors file of arrays plus a JSON state, checksummed; no pickle.

A checkpoint holds what a resumed run needs to continue exactly where the saved one stopped; it is
written by ``PrivateEngine.save`` (``finetune.make_private``'s engine: every training path, the CLI
included) and read by ``make_private(..., resume=...)``: the trained weights and the wrapped
optimizer's state (arrays ``params/*`` and ``optimizer/*``), and a JSON state whose ``"engine"``
entry holds the privacy ledger, the steps taken, the sampler's position and the seeded generators'
states (a secure run's key is never stored).  Callers add their own JSON beside it (the CLI: the
run's arguments, the sha256 of its table and data files, the mean step time; the per-step loss and
batch size only with ``--log-private-stats``: statistics of the private data that the epsilon does
not cover).

File layout (format version :data:`FORMAT_VERSION`): a safetensors file whose tensors are named
``<group>/<name>`` and whose string metadata holds ``format`` (``"finetune-checkpoint"``),
``format_version``, ``state`` (the JSON state) and ``sha256``: the SHA-256 over every tensor (name,
dtype, shape, bytes, in sorted order) and the state text.  The file is written with
:func:`finetune.run_dir.atomic_write`, so a crash leaves the previous checkpoint or the new one.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .run_dir import atomic_write_with

__all__ = ["CheckpointFileError", "FORMAT", "FORMAT_VERSION", "save_checkpoint", "load_checkpoint",
           "read_state", "file_sha256"]

FORMAT = "finetune-checkpoint"
FORMAT_VERSION = 1


class CheckpointFileError(ValueError):
    """A checkpoint that is missing, corrupted or of another format; the message is one line."""


def file_sha256(path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (tables and corpora are identified by it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def _checksum(arrays: dict, state_text: str) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(memoryview(a).cast("B") if a.size else b"")  # no copy of large arrays
    h.update(state_text.encode())
    return h.hexdigest()


def _json_safe(x):
    """NaN/inf become null (strict JSON); numpy scalars become Python numbers."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def save_checkpoint(path, arrays: dict, state: dict) -> None:
    """Write ``arrays`` (``{"group/name": ndarray}``) and the JSON-serialisable ``state`` atomically."""
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    text = json.dumps(_json_safe(state), sort_keys=True, allow_nan=False)
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "state": text,
            "sha256": _checksum(arrays, text)}
    atomic_write_with(path, lambda tmp: save_file(arrays, tmp, metadata=meta))


def _open(path):
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointFileError(f"no checkpoint at {path}")
    try:
        handle = safe_open(str(path), framework="np")
    except Exception as exc:  # truncated or not a safetensors file
        raise CheckpointFileError(f"{path} is not a readable checkpoint ({type(exc).__name__})") from None
    meta = handle.metadata() or {}
    if meta.get("format") != FORMAT:
        raise CheckpointFileError(f"{path} is not a fine-tuning checkpoint")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointFileError(f"{path}: checkpoint format version {meta.get('format_version')!r} "
                                  f"is not supported (this library reads {FORMAT_VERSION})")
    return handle, meta


def read_state(path) -> dict:
    """The JSON state of a checkpoint (not checksum-verified; :func:`load_checkpoint` verifies)."""
    _, meta = _open(path)
    try:
        return json.loads(meta["state"])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointFileError(f"{path}: checkpoint state is not valid JSON") from None


def load_checkpoint(path) -> tuple[dict, dict]:
    """``(arrays, state)`` of a checkpoint whose format, version and checksum are verified."""
    handle, meta = _open(path)
    try:
        arrays = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as exc:
        raise CheckpointFileError(f"{path}: cannot read its tensors ({type(exc).__name__})") from None
    text = meta.get("state", "")
    if _checksum(arrays, text) != meta.get("sha256"):
        raise CheckpointFileError(f"{path}: checksum mismatch: the checkpoint was modified or corrupted")
    return arrays, json.loads(text)
