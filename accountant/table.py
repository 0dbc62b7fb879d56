"""Noise tables, format v1 (docs/table-format.md): checksummed .npz files, never pickles.

``write_certified_table`` certifies first and writes only a table whose certificate meets its target;
``load_table`` verifies format, checksum, metadata types and the exact symmetric unimodal shape, and
returns the law that is both sampled and certified (docs/soundness.md rule 1: certify what you
sample); ``verify_claim`` re-certifies a loaded table and compares with what its metadata claims (a
checksum is an integrity check anyone can recompute, not a signature).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from dataclasses import dataclass
from importlib import metadata as _metadata
from pathlib import Path

import numpy as np

from accountant.certify import Certificate, calibrate, certify
from accountant.mechanism import Mechanism
from accountant.noise import Gaussian, Noise, NoiseParameterError, Tabulated, from_name
from accountant.output_path import atomic_write_with

FORMAT_VERSION = 1
ARRAY_KEYS = ("edges", "mass", "tail_mass", "tail_rate")
REQUIRED_METADATA = ("format_version", "law", "family", "params", "eps_target", "delta", "sampling_rate",
                     "steps", "geometry", "certified_epsilon", "expected_abs", "gaussian_sigma",
                     "gaussian_expected_abs", "library_versions", "created", "sha256")


class TableError(ValueError):
    """A table file is missing, malformed, tampered with, or its certificate misses the target."""


@dataclass(frozen=True)
class NoiseTable:
    noise: Noise
    metadata: dict
    tabulated: Tabulated

    @property
    def geometry(self) -> str:
        return self.metadata["geometry"]

    @property
    def sampling_rate(self) -> float:
        return float(self.metadata["sampling_rate"])

    @property
    def steps(self) -> int:
        return int(self.metadata["steps"])

    @property
    def delta(self) -> float:
        return float(self.metadata["delta"])

    @property
    def certified_epsilon(self) -> float:
        return float(self.metadata["certified_epsilon"]["final"])

    def sample(self, n: int, rng) -> np.ndarray:
        return self.noise.sample(n, rng)

    def cdf(self, x):
        return self.noise.cdf(x)

    def mechanism(self, sensitivity: float = 1.0, steps: int = 1) -> Mechanism:
        """The mechanism one step of training with clipping norm ``sensitivity`` runs."""
        return Mechanism(self.noise, sensitivity, self.geometry, self.sampling_rate, steps)


def library_versions() -> dict:
    out = {}
    for dist in ("numpy", "scipy", "prv-accountant", "dp-accounting", "dp-optimal-noise"):
        try:
            out[dist] = _metadata.version(dist)
        except _metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _checksum(arrays: dict, metadata: dict) -> str:
    h = hashlib.sha256()
    for key in ARRAY_KEYS:
        h.update(np.ascontiguousarray(arrays[key], dtype="<f8").tobytes())
    body = {k: v for k, v in metadata.items() if k != "sha256"}
    h.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


def tabulate(noise: Noise, bins: int = 4000) -> Tabulated:
    """The table arrays of ``noise``: itself if tabulated, else its binned density on the 2^-53
    lattice (used only for inspection and plots when the law is parametric)."""
    if isinstance(noise, Tabulated):
        return noise
    reach = float(noise.isf(1e-13))
    edges = np.linspace(-reach, reach, bins + 1)
    mass = noise.interval_mass(edges[:-1], edges[1:])
    tail = float(noise.sf(reach))
    rate = float(noise.pdf(reach)) / tail
    return Tabulated.quantised(edges, mass, tail, rate)


def save_table(path, noise: Noise, metadata: dict) -> dict:
    """Write ``noise`` with ``metadata`` (the caller's keys; format keys are filled in) atomically."""
    table = tabulate(noise)
    meta = dict(metadata)
    meta.update(format_version=FORMAT_VERSION, law="tabulated" if isinstance(noise, Tabulated) else noise.family,
                expected_abs=noise.expected_abs(), library_versions=library_versions(),
                created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    if meta["law"] != "tabulated":
        meta["params"] = noise.params
    meta.setdefault("params", noise.params)
    arrays = {"edges": table.edges, "mass": table.mass, "tail_mass": np.float64(table.tail_mass),
              "tail_rate": np.float64(table.tail_rate)}
    missing = [k for k in REQUIRED_METADATA if k not in meta and k != "sha256"]
    if missing:
        raise TableError(f"table metadata lacks {', '.join(missing)}")
    meta["sha256"] = _checksum(arrays, meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp):
        with open(tmp, "wb") as handle:
            np.savez(handle, metadata=np.array(json.dumps(meta, sort_keys=True)), **arrays)
    atomic_write_with(path, write)
    return meta


def load_table(path) -> NoiseTable:
    """Read and verify a table; raise :class:`TableError` with a one-line reason otherwise."""
    path = Path(path)
    if not path.is_file():
        raise TableError(f"no table file at {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            contents = {key: data[key] for key in data.files}
    except Exception as exc:  # zip errors, pickled objects, truncated files
        raise TableError(f"{path} is not a readable noise table ({type(exc).__name__}: {exc})") from None
    for key in ARRAY_KEYS + ("metadata",):
        if key not in contents:
            raise TableError(f"{path} lacks the array {key!r}")
    for key in ARRAY_KEYS:
        if contents[key].dtype != np.float64:
            raise TableError(f"{path}: {key} must be float64, is {contents[key].dtype}")
    if contents["tail_mass"].shape != () or contents["tail_rate"].shape != ():
        raise TableError(f"{path}: tail_mass and tail_rate must be scalars")
    try:
        meta = json.loads(str(contents["metadata"]))
    except json.JSONDecodeError as exc:
        raise TableError(f"{path}: metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise TableError(f"{path}: metadata must be a JSON object")
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise TableError(f"{path}: metadata lacks {', '.join(missing)}")
    if meta["format_version"] != FORMAT_VERSION:
        raise TableError(f"{path}: format version {meta['format_version']!r} is not supported "
                         f"(this library reads version {FORMAT_VERSION})")
    if _checksum(contents, meta) != meta["sha256"]:
        raise TableError(f"{path}: checksum mismatch: the file was modified or corrupted")
    _check_metadata(path, meta)
    try:
        tab = Tabulated(contents["edges"], contents["mass"], float(contents["tail_mass"]),
                        float(contents["tail_rate"]), check_lattice=True)
        noise = tab if meta["law"] == "tabulated" else from_name(meta["law"], **meta["params"])
    except NoiseParameterError as exc:
        raise TableError(f"{path}: {exc}") from None
    return NoiseTable(noise, meta, tab)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_metadata(path, meta: dict) -> None:
    """Refuse a metadata field of the wrong type or range, naming the file and the field."""
    def bad(field, what):
        raise TableError(f"{path}: metadata field {field!r} must be {what}, got {meta[field]!r}")

    if not isinstance(meta["law"], str):
        bad("law", "a family name")
    if not isinstance(meta["params"], dict):
        bad("params", "a JSON object")
    if not (_number(meta["eps_target"]) and meta["eps_target"] > 0):
        bad("eps_target", "a positive number")
    if not (_number(meta["delta"]) and 0 < meta["delta"] < 1):
        bad("delta", "a number in (0, 1)")
    if not (_number(meta["sampling_rate"]) and 0 < meta["sampling_rate"] <= 1):
        bad("sampling_rate", "a number in (0, 1]")
    if not (_number(meta["steps"]) and meta["steps"] >= 1 and float(meta["steps"]).is_integer()):
        bad("steps", "a positive integer")
    if meta["geometry"] not in ("scalar", "l1", "l2"):
        bad("geometry", "one of scalar, l1, l2")
    claim = meta["certified_epsilon"]
    if not (isinstance(claim, dict) and "final" in claim
            and all(_number(v) and v >= 0 for v in claim.values())):
        bad("certified_epsilon", 'an object of non-negative numbers with a "final" entry')
    for field in ("expected_abs", "gaussian_sigma", "gaussian_expected_abs"):
        if not _number(meta[field]):
            bad(field, "a number")


def calibrated_gaussian(eps: float, delta: float, sampling_rate: float, steps: int,
                        geometry: str) -> float:
    """Gaussian sigma (units of C) certified for the same target, for comparison."""
    sigma, _ = calibrate(Gaussian, eps, delta, sampling_rate, steps, geometry)
    return sigma


def write_certified_table(path, noise: Noise, *, eps_target: float, delta: float, sampling_rate: float,
                          steps: int, geometry: str, family: str | None = None, params: dict | None = None,
                          extra: dict | None = None, gaussian_sigma: float | None = None,
                          certificate: Certificate | None = None) -> NoiseTable:
    """Certify ``noise`` for the target and write it; refuse if the certificate exceeds the target.

    A table is in units of the sensitivity C: ``noise`` is the noise added per unit of clipping norm
    (the training step adds ``C * Z``), and the stored certificate is that of
    ``Mechanism(noise, 1.0, geometry, sampling_rate, steps)``.  A noise calibrated for sensitivity C
    is written as ``noise.scaled(1 / C)``.  ``certificate`` (to skip a second certification) must be
    a certificate of exactly that mechanism at ``delta``; anything else is refused.
    """
    mechanism = Mechanism(noise, 1.0, geometry, sampling_rate, steps)
    if certificate is not None and (certificate.mechanisms != [mechanism.describe()] or certificate.delta != delta):
        raise TableError("the certificate given describes another mechanism than the table (tables are in "
                         "units of the sensitivity: certify the law at sensitivity 1); table not written")
    cert = certificate or certify(mechanism, delta)
    if cert.epsilon > eps_target:
        raise TableError(f"certified epsilon {cert.epsilon:.6g} exceeds the target {eps_target:g}; "
                         "table not written")
    if gaussian_sigma is None:
        gaussian_sigma = calibrated_gaussian(eps_target, delta, sampling_rate, steps, geometry)
    meta = dict(extra or {})
    meta.update(family=family or noise.family, params=params if params is not None else noise.params,
                eps_target=eps_target, delta=delta, sampling_rate=sampling_rate, steps=int(steps),
                geometry=geometry,
                certified_epsilon={name: r["upper"] for name, r in cert.routes.items()} | {"final": cert.epsilon},
                gaussian_sigma=gaussian_sigma, gaussian_expected_abs=gaussian_sigma * math.sqrt(2 / math.pi))
    save_table(path, noise, meta)
    return load_table(path)


#: Relative tolerance of the claim check.  Re-certifying the same table with the same library gives
#: the same bits; other numpy/scipy builds change the floating-point summation order, which moves a
#: route's bound by about 1e-12 relative.  A re-certified epsilon above the stored one by more than
#: this is a real difference (docs/privacy.md, "Tables").
CLAIM_RTOL = 1e-6


@dataclass(frozen=True)
class ClaimCheck:
    """What a table claims against what its law re-certifies to (same mechanism, same delta)."""

    claimed: float            # the stored certified_epsilon["final"]
    eps_target: float         # the stored target
    delta: float
    certified: float          # the re-computed certificate
    certificate: Certificate
    tolerance: float = CLAIM_RTOL

    @property
    def matches(self) -> bool:
        """True when the re-certified epsilon does not exceed the claim beyond ``tolerance``."""
        return self.certified <= self.claimed * (1 + self.tolerance) + 1e-12

    @property
    def message(self) -> str:
        if self.matches:
            return f"table claims epsilon {self.claimed:.6g}, certified {self.certified:.6g}: claim holds"
        return (f"this table does not deliver its claimed epsilon: claims {self.claimed:.6g}, "
                f"certified {self.certified:.6g}")

    def as_dict(self) -> dict:
        return {"claimed": self.claimed, "eps_target": self.eps_target, "delta": self.delta,
                "certified": self.certified, "tolerance": self.tolerance, "matches_claim": self.matches}


def table_mechanism(table: NoiseTable) -> Mechanism:
    """The mechanism a table's certificate is about: its law at sensitivity 1 (tables are in units
    of C), its geometry, Poisson rate and number of steps."""
    return table.mechanism(sensitivity=1.0, steps=table.steps)


def compare_claim(table: NoiseTable, certificate: Certificate) -> ClaimCheck:
    """A :class:`ClaimCheck` from a certificate of ``table_mechanism(table)`` at ``table.delta``."""
    if certificate.mechanisms != [table_mechanism(table).describe()] or certificate.delta != table.delta:
        raise ValueError("the certificate is not one of this table's mechanism at its delta")
    return ClaimCheck(claimed=table.certified_epsilon, eps_target=float(table.metadata["eps_target"]),
                      delta=table.delta, certified=certificate.epsilon, certificate=certificate)


def verify_claim(table: NoiseTable) -> ClaimCheck:
    """Re-certify a loaded table (both routes, its own q, T, geometry and delta, sensitivity 1) and
    compare with its stored ``certified_epsilon["final"]``.  ``check.matches`` is False when the
    law costs more than the table claims; refuse such a table (``check.message`` is one line).
    Takes as long as one certificate (seconds for typical tables)."""
    return compare_claim(table, certify(table_mechanism(table), table.delta))
