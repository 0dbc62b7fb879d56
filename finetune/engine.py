"""``make_private``: one call from a batch size, a number of epochs and a target epsilon to DP-SGD.

::

    from finetune import make_private
    engine = make_private(net, optimizer, dataset_size=len(x), batch_size=64, epochs=3,
                          target_epsilon=1.0, target_delta=1e-5, max_grad_norm=1.0)
    for batch in engine.batches(x, y):
        engine.step(batch)
    engine.save("run.safetensors")       # weights, optimizer moments, ledger, sampler position
    print(engine.epsilon())

It turns ``batch_size`` / ``epochs`` (or ``steps``) into the sampling rate ``q = B / N`` and ``T``
steps, calibrates Gaussian noise with ``accountant.certify.calibrate`` (two accountants, the larger
upper bound; docs/privacy.md), keeps the certified table in memory (``save_table=PATH`` writes it),
and wires ``DPOptimizer`` (clipping, noise), the sampler and a hard stop (``ReleaseGuard``).

Sampling (``accountant.shuffle``; docs/privacy.md Section 7):

* ``"poisson"`` (default): each example joins each step with probability ``q``; certified under
  add/remove with amplification by subsampling.
* ``"shuffle"``: every example exactly once per epoch in fixed-size batches; no amplification: one
  release of the unsampled mechanism per epoch, composed over epochs, under ``relation="zero-out"``
  (sensitivity C, default) or ``"substitution"`` (2C).  The engine prints what Poisson sampling
  would certify at the same noise.

Data: ``engine.batches(x, y, ...)`` takes numpy arrays (rows = examples) or one random-access source
(``len(source)`` and ``source[i]`` returning a tuple of arrays, e.g. what a
``mindspore.dataset.GeneratorDataset`` wraps); rows are gathered by the sampler's indices.  A
``mindspore.dataset`` pipeline (``.shuffle().batch()``) draws its own batches, which no certificate
accounts for, and is refused.

Randomness (docs/soundness.md rule 8): by default sampling and noise come from two ChaCha20 streams
keyed from OS entropy (``accountant.randomness.SecureRandom``), the same policy as
``python -m finetune``.  ``seed`` makes both reproducible (two independent PCG64 streams) and warns
(``KnownSeedWarning``); ``secure=False`` without a seed uses PCG64 seeded from the OS.

Checkpoints: ``engine.save(path)`` writes one ``finetune.checkpointing`` file (safetensors weights
and optimizer state, JSON run state: ledger, steps, sampler and generator positions; no pickle);
``make_private(..., resume=path)`` continues it.  A secure run is keyed afresh from the OS on
resume (its key is never stored); a seeded run resumes bit-identically.  A checkpoint of another
configuration is refused with :class:`CheckpointMismatch`.

Output: one INFO line on the ``finetune.engine`` logger (``logging``); ``verbose=True`` also prints
the full summary (``engine.summary``).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from accountant.certify import Certificate, calibrate, certify
from accountant.mechanism import Mechanism
from accountant.noise import Gaussian
from accountant.randomness import SecureRandom, warn_known_seed
from accountant.shuffle import RELATION_TEXT, check_sampling, run_mechanism, release_mechanism, \
    sensitivity, steps_per_epoch

__all__ = ["make_private", "make_baseline", "PrivateEngine", "LogicalBatch", "EngineConfigError",
           "CheckpointMismatch"]

STATE_FORMAT = "finetune.engine"
STATE_VERSION = 1

log = logging.getLogger(__name__)


class EngineConfigError(ValueError):
    """make_private was called with settings that do not describe one certifiable run."""


class CheckpointMismatch(EngineConfigError):
    """A checkpoint (or state) that belongs to another run configuration, or is not readable."""


@dataclass(frozen=True)
class LogicalBatch:
    """One step's examples as fixed-shape micro-batches ``[(inputs, mask), ...]`` (padding masked)."""

    step: int
    sampling: str
    ticket: int
    size: int
    micro: list = field(repr=False)

    def __iter__(self):
        return iter(self.micro)

    def __len__(self) -> int:
        return len(self.micro)


@dataclass(frozen=True)
class _NoiseSpec:
    """What ``DPOptimizer`` reads from a table: the law it samples and the geometry it clips in."""

    noise: object
    geometry: str


def _rng_pair(seed, secure, dist=None):
    """``(sampling generator, noise generator, secure)``: independent streams (a data pipeline may
    sample ahead).  ``secure=None`` means secure unless a seed is given.  Under ``dist`` with more
    than one worker every rank holds the same two generators (rank 0's OS key, or the seed)."""
    secure = seed is None if secure is None else bool(secure)
    if secure and seed is not None:
        raise EngineConfigError("secure=True draws from the OS CSPRNG and cannot be seeded; drop seed")
    if seed is not None:
        warn_known_seed(seed, stacklevel=4)     # the same policy as train() and the CLIs
    if dist is not None:
        if secure:
            return dist.shared_rng(secure=True), dist.shared_rng(secure=True), True
        if seed is None:
            raise EngineConfigError("data-parallel training needs a seed or secure randomness, so that "
                                    "all workers draw the same batches and the same noise")
        dist.check_same("the random seed", str(int(seed)).encode())
    if secure:
        return SecureRandom(), SecureRandom(), True
    children = np.random.SeedSequence(seed).spawn(2)
    return (*(np.random.Generator(np.random.PCG64(c)) for c in children), False)


def _is_pipeline(obj) -> bool:
    """A ``mindspore.dataset`` pipeline (it samples, shuffles and batches by itself)."""
    return type(obj).__module__.startswith("mindspore.dataset") and hasattr(obj, "create_tuple_iterator")


def refuse_pipeline(*data) -> None:
    """Raise :class:`EngineConfigError` if any of ``data`` is a ``mindspore.dataset`` pipeline."""
    if any(_is_pipeline(d) for d in data):
        raise EngineConfigError(
            "a mindspore.dataset pipeline draws its own (shuffled, fixed-size) batches, which the "
            "certificate does not account for; pass numpy arrays or the random-access source "
            "itself (the object with __len__/__getitem__ a GeneratorDataset would wrap)")


class _Rows:
    """The examples, gathered by row index: numpy arrays (rows = examples) or one random-access
    source (``len(source)``, ``source[i]`` -> tuple of arrays).  Nothing is cached beyond one call."""

    def __init__(self, data: tuple, dataset_size: int):
        if not data:
            raise EngineConfigError("give the data, e.g. engine.batches(x, y) or engine.batches(source)")
        refuse_pipeline(*data)
        one = data[0]
        self.source = None
        if len(data) == 1 and not isinstance(one, np.ndarray) and hasattr(one, "__getitem__") \
                and hasattr(one, "__len__") and not isinstance(one, (list, tuple)) \
                and not hasattr(one, "asnumpy"):
            self.source, size = one, len(one)
            self.arrays = None
        else:
            for k, d in enumerate(data):
                if not hasattr(d, "__len__"):
                    raise EngineConfigError(
                        f"data argument {k} ({type(d).__name__}) is neither an array nor a random-access "
                        "source (__len__ and __getitem__); an iterator's batches are not the sampler's")
            self.arrays = [np.asarray(a) for a in data]
            for k, a in enumerate(self.arrays):
                if a.ndim == 0 or len(a) != dataset_size:
                    raise EngineConfigError(
                        f"data array {k} has {len(a) if a.ndim else 0} rows, but the run was accounted "
                        f"for dataset_size={dataset_size}")
            return
        if size != dataset_size:
            raise EngineConfigError(f"the data source has {size} rows, but the run was accounted for "
                                    f"dataset_size={dataset_size}")

    @property
    def width(self) -> int:
        return len(self.arrays) if self.arrays is not None else len(self._row(0))

    def _row(self, i: int) -> tuple:
        row = self.source[int(i)]
        return tuple(row) if isinstance(row, (tuple, list)) else (row,)

    def take(self, idx: np.ndarray) -> list[np.ndarray]:
        """The columns of rows ``idx`` (in order; padding repeats row 0)."""
        if self.arrays is not None:
            return [a[idx] for a in self.arrays]
        uniq, where = np.unique(np.asarray(idx, np.int64), return_inverse=True)
        rows = [self._row(i) for i in uniq]
        return [np.stack([np.asarray(r[c]) for r in rows])[where] for c in range(len(rows[0]))]


def _rng_state(rng):
    return rng.bit_generator.state if isinstance(rng, np.random.Generator) else None


class PrivateEngine:
    """The private training run built by :func:`make_private` (read its attributes, do not set them).

    ``noise_multiplier`` (Gaussian sigma in units of ``max_grad_norm``, ``None`` for a non-Gaussian
    table), ``certificate`` (``accountant.certify.Certificate`` of the whole run), ``sampling``,
    ``relation``, ``sampling_rate``, ``steps``, ``epochs``, ``delta``, ``summary`` (the printed text),
    ``poisson_epsilon`` (shuffle with ``compare_poisson``: the certificate of Poisson sampling at
    ``q = B / N`` for the same steps and noise, under add/remove),
    ``optimizer`` (the ``DPOptimizer``) and ``guard`` (the ledger and hard stop).
    Privacy unit: ``unit`` (``"record"``, or the name of a unit-level run's units, e.g. ``"person"``),
    ``n_units`` and ``max_rows_per_unit`` (unit-level runs: ``sampling_rate`` is over units) and the
    person-level report ``person_epsilon``, ``person_k``, ``person_method`` and ``record_epsilon``
    (a unit-level run's epsilon for one record changed; ``finetune.dp.units``).
    """

    unit, n_units, max_rows_per_unit = "record", None, None
    person_epsilon, person_k, person_method, record_epsilon = None, None, None, None

    def __init__(self, *, dp_optimizer, guard, sampler, sampling, relation, dataset_size, batch_size,
                 micro_batch_size, steps, epochs, sampling_rate, delta, noise, geometry, certificate,
                 noise_multiplier, epsilon_target, secure, sample_rng, noise_rng, steps_in_epoch,
                 table=None, dist=None, private=True, seeded=False):
        self.optimizer = dp_optimizer
        self.guard = guard
        self.sampler = sampler
        self.sampling, self.relation = sampling, relation
        self.dataset_size, self.batch_size = dataset_size, batch_size
        self.micro_batch_size = micro_batch_size
        self.steps, self.epochs, self.steps_in_epoch = steps, epochs, steps_in_epoch
        self.sampling_rate, self.delta = sampling_rate, delta
        self.noise, self.geometry = noise, geometry
        self.certificate: Certificate = certificate
        self.noise_multiplier = noise_multiplier
        self.epsilon_target = epsilon_target
        self.secure, self.seeded, self.private = secure, seeded, private
        self.dist = dist if dist is not None and dist.world_size > 1 else None
        self._sample_rng, self._noise_rng = sample_rng, noise_rng
        self._table = table
        self.poisson_epsilon = None
        self.shuffle_epsilon = None     # sampling="fixed": what shuffling would certify at the same noise
        self.summary = ""
        self.checkpoint_state = None   # the JSON state of the checkpoint this engine resumed
        self.ticket = int.from_bytes(os.urandom(6), "little")   # names this engine's sampler

    # ---- the loop ------------------------------------------------------------------------------
    def _indices(self, step: int) -> np.ndarray:
        """Step ``step``'s global index batch, drawn from the accounted sampler."""
        if self.sampling in ("poisson", "fixed"):
            return self.sampler.sample()
        return self.sampler.batch(step)

    def _local(self, idx: np.ndarray) -> np.ndarray:
        """This worker's share of a global batch (all of it in one process)."""
        if self.dist is None:
            return idx
        from .dp.distributed import shard
        return shard(idx, self.dist)

    def plan(self) -> Iterator[tuple[int, np.ndarray]]:
        """The index batches of the remaining steps, drawn in order from the accounted sampler."""
        for step in range(self.guard.steps_taken, self.guard.limit):
            yield step, self._indices(step)

    def batches(self, *data) -> Iterator[LogicalBatch]:
        """The remaining steps' logical batches, as micro-batches, of ``data``: numpy arrays (rows =
        examples) or one random-access source (see the module docstring)."""
        rows = _Rows(data, self.dataset_size)      # refused here, not at the first next()
        return self._batches(rows)

    def _batches(self, rows: _Rows) -> Iterator[LogicalBatch]:
        from .dp.sampling import micro_batches

        for step, idx in self.plan():
            idx = self._local(idx)
            micro = [(rows.take(m.indices), m.mask) for m in micro_batches(idx, self.micro_batch_size)]
            real = int(np.count_nonzero(np.asarray(idx) >= 0))    # a unit layout pads with -1
            yield LogicalBatch(step, self.sampling, self.ticket, real, micro)

    def step(self, batch: LogicalBatch):
        """One DP step on a batch of :meth:`batches`; returns ``finetune.dp.optimizer.StepStats``."""
        from .dp.release_guard import SamplingMismatch

        if not isinstance(batch, LogicalBatch):
            raise SamplingMismatch(
                f"engine.step takes the batches of engine.batches(...), got {type(batch).__name__}: a "
                f"batch from another loader is not what the certificate ({self.sampling} sampling) accounts")
        self.guard.check_sampling(batch.sampling)
        if batch.ticket != self.ticket:
            raise SamplingMismatch("this batch was drawn by another engine's sampler; use the batches "
                                   "of the engine that accounts for it")
        if batch.step != self.guard.steps_taken:
            raise SamplingMismatch(f"batch of step {batch.step} given at step {self.guard.steps_taken}: "
                                   "each batch is used once, in order")
        return self.optimizer.step(batch.micro)

    @property
    def per_example_method(self) -> str:
        """``"bookkeeping"`` or ``"vmap"``; :attr:`per_example_reason` says why."""
        return self.optimizer.grads.method

    @property
    def per_example_reason(self) -> str:
        """Why this per-example method runs (book-keeping only where it is exact)."""
        return self.optimizer.grads.method_reason

    def epsilon(self, exact: bool = False) -> float:
        """Epsilon (at ``delta``, under ``relation``) of the steps taken so far.

        Cheap enough to call every step: an upper bound that is never below the certificate of the
        steps taken (``ReleaseGuard.epsilon_bound``: 0 before the first step, the run's certificate
        after its last, in between the smallest known certificate of at least the steps taken: the
        whole planned run's, or one at a geometric checkpoint of ``IncrementalEpsilon`` computed in
        the background).  ``exact=True`` certifies the ledger itself (both accountants; seconds)."""
        return self.guard.epsilon_spent() if exact else self.guard.epsilon_bound()

    # ---- mindspore.train.Model -------------------------------------------------------------------
    def dataset(self, *arrays, column_names: Sequence[str] | None = None):
        """A ``mindspore.dataset`` of the remaining steps' micro-batches (``finetune.dp.dataset``);
        ``arrays`` as for :meth:`batches` (arrays or one random-access source)."""
        from .dp.dataset import MicroBatchRows, make_dataset

        self.guard.check_next()  # no step left: one line, not MindSpore's error on an empty dataset
        data = _Rows(arrays, self.dataset_size)
        width = data.width
        names = list(column_names) if column_names is not None else [f"x{k}" for k in range(width)]
        if len(names) != width:
            raise EngineConfigError(f"{len(names)} column names for {width} data columns")
        plan = [(step, self._local(idx)) for step, idx in self.plan()]
        rows = MicroBatchRows(data.take, plan, self.micro_batch_size, self.ticket)
        return make_dataset(rows, names)

    def train_network(self):
        """The DP step as a ``mindspore.train.Model`` network (rows of :meth:`dataset`)."""
        from .dp.dataset import DPTrainStep

        return DPTrainStep(self.optimizer, self.guard, self.ticket)

    def callback(self):
        """``PrivacyBudgetCallback``: ends ``Model.train`` before a step the certificate does not cover."""
        from .dp.guard import PrivacyBudgetCallback

        return PrivacyBudgetCallback(self.guard)

    # ---- the certified table ---------------------------------------------------------------------
    @property
    def table(self):
        """The noise table (``accountant.table.NoiseTable``, in units of C, sensitivity 1) in memory."""
        if self._table is None:
            self._table = _in_memory_table(self)
        return self._table

    # ---- checkpoints -----------------------------------------------------------------------------
    def _identity(self) -> dict:
        noise = self.noise
        return {"private": self.private, "sampling": self.sampling, "relation": self.relation,
                "dataset_size": self.dataset_size, "batch_size": self.batch_size, "steps": self.steps,
                "sampling_rate": self.sampling_rate, "delta": self.delta, "geometry": self.geometry,
                "noise": None if noise is None else noise.family,
                "params": None if noise is None else noise.params,
                "max_grad_norm": self.optimizer.max_grad_norm if self.private else None,
                "secure": self.secure} | ({} if self.unit == "record" else {
                "unit": self.unit, "n_units": self.n_units, "max_rows_per_unit": self.max_rows_per_unit})

    def state_dict(self) -> dict:
        """The run's state for a checkpoint: steps taken, the ledger, the sampler's position (its
        generator and the current shuffle order; sampling is data-independent) and the noise
        generator (none for ``secure=True``: a resumed secure run is keyed afresh).  When
        ``DPOptimizer`` has ``state_dict`` (weights and the MindSpore optimizer's moments as numpy
        arrays) it is included under ``"optimizer"``; otherwise save the weights yourself
        (``mindspore.save_checkpoint``).  Everything but ``"optimizer"`` is JSON."""
        state = {"format": STATE_FORMAT, "version": STATE_VERSION, "run": self._identity(),
                 "guard": self.guard.state_dict(), "sample_rng": _rng_state(self._sample_rng),
                 "noise_rng": _rng_state(self._noise_rng), "optimizer": None}
        if self.sampling == "shuffle":
            state["shuffle"] = self.sampler.state_dict()
        if hasattr(self.optimizer, "state_dict"):
            inner = dict(self.optimizer.state_dict())
            inner["ledger"] = None          # the engine's guard carries the ledger (releases, not steps)
            state["optimizer"] = inner
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue a run from :meth:`state_dict` (into a fresh engine); refuse another run's state."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise CheckpointMismatch("not a make_private engine state")
        if state.get("version") != STATE_VERSION:
            raise CheckpointMismatch(f"unsupported engine state version {state.get('version')!r}")
        mine = self._identity()
        theirs = dict(state.get("run", {}))
        theirs.setdefault("private", True)
        if not self.private:
            theirs.setdefault("max_grad_norm", None)
        diff = [k for k in mine if theirs.get(k) != mine[k]]
        if diff:
            raise CheckpointMismatch("the saved state belongs to another run: "
                                     + ", ".join(f"{k} {theirs.get(k)!r} != {mine[k]!r}" for k in diff))
        if self.guard.steps_taken or getattr(self.guard.ledger, "steps", 0):
            raise EngineConfigError("this engine has already taken steps; load a state into a new engine")
        try:
            self.guard.load_state_dict(state["guard"])
        except ValueError as exc:
            raise CheckpointMismatch(str(exc)) from None
        if state.get("optimizer") is not None:
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except ValueError as exc:
                raise CheckpointMismatch(f"the saved weights or optimizer state do not fit: {exc}") from None
        for rng, key in ((self._sample_rng, "sample_rng"), (self._noise_rng, "noise_rng")):
            saved = state.get(key)
            if saved is not None and isinstance(rng, np.random.Generator):
                rng.bit_generator.state = saved
        if self.sampling == "shuffle":
            self.sampler.load_state_dict(state.get("shuffle", {}))

    def save(self, path, *, extra: dict | None = None, overwrite: bool = False) -> None:
        """Write the run to one checkpoint file (``finetune.checkpointing``: safetensors arrays
        ``params/*`` and ``optimizer/*``, the rest of :meth:`state_dict` as JSON under ``"engine"``,
        sha256 over both; written atomically).  ``extra`` (JSON) is stored beside it, e.g. a
        script's own progress.  An existing file is refused unless ``overwrite=True``.  Continue
        with ``make_private(..., resume=path)``."""
        from .checkpointing import save_checkpoint

        if not overwrite and Path(path).exists():
            raise EngineConfigError(f"{str(path)!r} exists; choose another path or pass overwrite=True")
        state = self.state_dict()
        inner = dict(state.pop("optimizer"))
        arrays = {f"params/{k}": v for k, v in inner.pop("params").items()}
        arrays.update({f"optimizer/{k}": v for k, v in inner.pop("optimizer").items()})
        state["optimizer"] = inner
        save_checkpoint(path, arrays, {**(extra or {}), "engine": state})

    def _resume(self, resume) -> dict:
        """Load a checkpoint (a path, or ``(arrays, state)`` of ``load_checkpoint``) into this fresh
        engine; returns the checkpoint's whole JSON state (with any ``extra`` of :meth:`save`)."""
        from .checkpointing import CheckpointFileError, load_checkpoint

        if isinstance(resume, (str, os.PathLike)):
            try:
                resume = load_checkpoint(resume)
            except CheckpointFileError as exc:
                raise CheckpointMismatch(str(exc)) from None
        arrays, state = resume
        if not isinstance(state, dict) or not isinstance(state.get("engine"), dict):
            raise CheckpointMismatch("the checkpoint holds no make_private engine state (written by "
                                     "another version or tool)")
        engine_state = dict(state["engine"])
        inner = dict(engine_state.get("optimizer") or {})
        inner["params"] = {k[len("params/"):]: v for k, v in arrays.items() if k.startswith("params/")}
        inner["optimizer"] = {k[len("optimizer/"):]: v for k, v in arrays.items()
                              if k.startswith("optimizer/")}
        engine_state["optimizer"] = inner
        self.load_state_dict(engine_state)
        return state


def _in_memory_table(engine: PrivateEngine):
    """A ``NoiseTable`` for the engine's law: q and T of its releases, certificate at sensitivity 1."""
    from accountant.table import NoiseTable, tabulate

    mech = _table_mechanism(engine)
    cert = engine.certificate if sensitivity(engine.relation) == 1.0 else certify(mech, engine.delta)
    noise = engine.noise
    sigma = engine.noise_multiplier
    meta = {"format_version": 1, "law": noise.family, "family": noise.family, "params": noise.params,
            "eps_target": engine.epsilon_target or cert.epsilon, "delta": engine.delta,
            "sampling_rate": mech.sampling_rate, "steps": mech.steps, "geometry": engine.geometry,
            "certified_epsilon": {k: r["upper"] for k, r in cert.routes.items()} | {"final": cert.epsilon},
            "expected_abs": noise.expected_abs(), "gaussian_sigma": sigma,
            "gaussian_expected_abs": None if sigma is None else sigma * math.sqrt(2 / math.pi),
            "sampling": engine.sampling, "relation": engine.relation}
    return NoiseTable(noise, meta, tabulate(noise))


def _table_mechanism(engine: PrivateEngine) -> Mechanism:
    """The run as a table describes it: sensitivity 1, the releases' rate and count."""
    run = run_mechanism(engine.noise, engine.geometry, engine.sampling, engine.relation, engine.steps,
                        engine.sampling_rate, engine.steps_in_epoch)
    return Mechanism(run.noise, 1.0, run.geometry, run.sampling_rate, run.steps)


def _load(noise):
    from accountant.table import NoiseTable, TableError, load_table

    if isinstance(noise, NoiseTable):
        return noise
    if isinstance(noise, (str, os.PathLike)):
        try:
            return load_table(noise)
        except TableError as exc:
            raise EngineConfigError(str(exc)) from None
    raise EngineConfigError("noise= takes a table path or an accountant.table.NoiseTable, got "
                            f"{type(noise).__name__}")


def _check_save_path(path, table) -> None:
    """Refuse, before any work, a table path that exists or cannot be written."""
    from accountant.output_path import OutputPathError, check_output_file

    if table is not None:
        raise EngineConfigError("save_table writes a calibrated table; noise= already is one")
    if Path(path).exists():
        raise EngineConfigError(f"save_table {str(path)!r} exists; choose another path "
                                "(a table is never overwritten)")
    try:
        check_output_file(path, what="save_table")
    except OutputPathError as exc:
        raise EngineConfigError(str(exc)) from None


# delta * N must stay at or below this: see _check_delta.
MAX_DELTA_TIMES_N = 0.1


def _check_delta(delta: float, n: int) -> None:
    """Refuse a delta that is not well below 1/N.  A mechanism that publishes each example in full
    with probability delta is (0, delta)-DP (Dwork & Roth, "The Algorithmic Foundations of
    Differential Privacy", 2014, Section 2.3) and publishes N delta examples on average; delta must
    therefore be well below 1/N: here ``N delta <= 0.1``."""
    if delta * n > MAX_DELTA_TIMES_N:
        raise EngineConfigError(
            f"delta {delta:g} is not well below 1/dataset_size = {1 / n:.3g}: (epsilon, delta)-DP "
            f"allows publishing each example in full with probability delta, {delta * n:.3g} of the "
            f"{n} examples on average; use delta <= {MAX_DELTA_TIMES_N / n:.3g} (e.g. 1e-5)")


def _check_optimizer_params(net, optimizer) -> None:
    """The optimizer must update the network's own Parameters: one built over another network's
    would apply pure noise to those while ``net`` never changes, and the run would still certify."""
    mine = {id(p) for p in net.get_parameters()}
    foreign = [p.name for p in getattr(optimizer, "parameters", ()) if id(p) not in mine]
    if foreign:
        raise EngineConfigError(
            f"the optimizer updates {len(foreign)} parameter(s) that are not the network's (e.g. "
            f"{foreign[0]!r}); build it over net.trainable_params() of the network you pass")
    if not list(getattr(optimizer, "parameters", ())):
        raise EngineConfigError("the optimizer has no parameters to update")


def _positive_int(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise EngineConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _fmt_routes(cert: Certificate) -> str:
    return ", ".join(f"{name.upper()} {r['upper']:.4f}" for name, r in cert.routes.items())


@dataclass(frozen=True)
class _Plan:
    """The run's length and what is accounted: ``releases`` of the mechanism at ``accounted_rate``."""

    q: float                  # B / N (Poisson: the sampling rate)
    steps: int
    epochs: float
    steps_in_epoch: int | None
    expected_batch: float     # the divisor of the noisy sum
    accounted_rate: float     # q (Poisson) or 1 (one unsampled release per shuffled epoch)
    releases: int


def _plan(sampling, n, batch_size, epochs, steps, table) -> _Plan:
    """q and T from batch size and epochs (or steps, or the table); refuse a table that does not fit."""
    from .dp.guard import TableMismatchError, check_table

    if batch_size is not None and batch_size > n:
        raise EngineConfigError(f"batch_size {batch_size} exceeds dataset_size {n}")
    if sampling == "poisson":
        if batch_size is None and table is None:
            raise EngineConfigError("batch_size is required (the expected number of examples per step)")
        q = table.sampling_rate if batch_size is None else batch_size / n
        per_epoch = steps_per_epoch(n, max(1, round(q * n)))   # as many steps as a shuffled epoch
        if steps is None and epochs is not None:
            steps = epochs * per_epoch
        if table is not None:
            try:
                q, steps = check_table(table, dataset_size=n, sampling_rate=q, steps=steps)
            except TableMismatchError as exc:
                raise EngineConfigError(str(exc)) from None
        if steps is None:
            raise EngineConfigError("give epochs= or steps=")
        return _Plan(q, steps, steps / per_epoch, None, q * n, q, steps)
    if sampling == "fixed":
        if batch_size is None:
            raise EngineConfigError("sampling='fixed' needs batch_size (exactly that many examples per step)")
        if table is not None:
            raise EngineConfigError("noise tables certify Poisson or shuffled runs; with sampling='fixed' give "
                                    "noise_multiplier= or target_epsilon=")
        per_epoch = steps_per_epoch(n, batch_size)
        steps = epochs * per_epoch if steps is None and epochs is not None else steps
        if steps is None:
            raise EngineConfigError("give epochs= or steps=")
        return _Plan(batch_size / n, steps, steps / per_epoch, None, float(batch_size), batch_size / n, steps)
    if batch_size is None:
        raise EngineConfigError("sampling='shuffle' needs batch_size")
    per_epoch = steps_per_epoch(n, batch_size)
    if steps is None:
        if epochs is None:
            raise EngineConfigError("give epochs= or steps=")
        steps = epochs * per_epoch
    epochs_run = -(-steps // per_epoch)
    if table is not None:
        if table.sampling_rate != 1.0:
            raise EngineConfigError(
                f"the table certifies Poisson sampling at rate {table.sampling_rate:g}; a shuffled run "
                "is one unsampled release per epoch and needs a table with sampling rate 1 "
                "(make_private(..., sampling='shuffle', save_table=PATH) writes one)")
        if table.steps < epochs_run:
            raise EngineConfigError(f"the table certifies {table.steps} releases but the shuffled run "
                                    f"has {epochs_run} epochs")
    return _Plan(batch_size / n, steps, epochs_run, per_epoch, float(batch_size), 1.0, epochs_run)


def _noise_and_certificate(plan: _Plan, sampling, relation, delta, table, target_epsilon,
                           noise_multiplier, n_coordinates, verbose):
    """(noise law, clipping geometry, Gaussian sigma or None, certificate of the whole run).

    The certificate is always computed here for this run's mechanism, also for a table (whose
    stored claim is never copied)."""
    from .dp.optimizer import GeometryError, clip_geometry

    s = sensitivity(relation)
    if table is not None:
        noise_law, geometry = table.noise, table.geometry
        try:
            clip_geometry(geometry, n_coordinates)
        except GeometryError as exc:
            raise EngineConfigError(str(exc)) from None
        release = release_mechanism(noise_law, geometry, sampling, relation, plan.accounted_rate)
        cert = certify(release.with_steps(plan.releases), delta)
        if target_epsilon is not None and cert.epsilon > target_epsilon:
            raise EngineConfigError(f"the table's law certifies epsilon {cert.epsilon:.4g} for this run, "
                                    f"above target_epsilon {target_epsilon:g}")
        sigma = noise_law.params.get("sigma") if isinstance(noise_law, Gaussian) else None
        return noise_law, geometry, sigma, cert
    kind = "fixed" if sampling == "fixed" else "poisson"     # shuffle: q 1, the pair is symmetric
    if noise_multiplier is not None:
        sigma = float(noise_multiplier)
        cert = certify(Mechanism(Gaussian(sigma), s, "l2", plan.accounted_rate, plan.releases, sampling=kind),
                       delta)
    else:
        log.debug("make_private: calibrating Gaussian noise to epsilon %g at delta %g (%d releases)",
                  target_epsilon, delta, plan.releases)
        sigma, cert = calibrate(Gaussian, float(target_epsilon), delta, plan.accounted_rate, plan.releases,
                                "l2", sensitivity=s, sampling=kind)
    return Gaussian(sigma), "l2", sigma, cert


def make_private(net, optimizer, *, dataset_size: int, batch_size: int | None = None,
                 epochs: int | None = None, steps: int | None = None,
                 target_epsilon: float | None = None, target_delta: float | None = None,
                 max_grad_norm: float = 1.0, noise_multiplier: float | None = None, noise=None,
                 sampling: str = "poisson", relation: str | None = None, secure: bool | None = None,
                 seed: int | None = None, micro_batch_size: int | None = None,
                 per_example: str = "auto", save_table=None, compare_poisson: bool = True,
                 epsilon_budget: float | None = None, resume=None, dist=None,
                 verbose: bool = False, unit_ids=None, max_rows_per_unit: int | None = None,
                 unit_name: str = "unit", record_people=None, person_cap: int | None = None
                 ) -> PrivateEngine:
    """Make ``optimizer`` (any MindSpore optimizer over the parameters to train) private for ``net``.

    ``net(*inputs)`` returns per-example losses (shape [B]; a mean loss is refused at the first
    step, before any gradient, by a set-up forward on zeros of the batch's shapes) and
    ``optimizer`` updates ``net``'s own Parameters.  Give exactly one noise source:

    * ``target_epsilon`` (with ``target_delta``): calibrate Gaussian noise (l2 clipping) to it;
    * ``noise_multiplier`` (with ``target_delta``): Gaussian sigma in units of ``max_grad_norm``; the
      engine certifies the epsilon it buys;
    * ``noise``: a table path or ``NoiseTable`` (searched or calibrated; any certified law and
      geometry).  Its q, T and geometry must fit the run: Poisson runs take the table's q (and its T
      unless fewer ``steps``/``epochs`` are asked for); shuffle runs need a q = 1 table certified
      for at least as many epochs.  The printed certificate is always re-computed from the table's
      law for this exact run, never copied from the table's metadata.

    Length: ``epochs`` (``ceil(N / batch_size)`` steps each) or ``steps``.  ``sampling`` is
    ``"poisson"`` or ``"shuffle"``; ``relation`` (shuffle only) ``"zero-out"`` or ``"substitution"``.
    ``micro_batch_size`` is the fixed shape of one compiled call (default ``min(batch_size, 32)``).
    ``target_delta`` must be well below ``1 / dataset_size`` (``delta * N <= 0.1``).
    ``per_example``: ``"auto"`` (book-keeping where it is exact, else vmap; the reason is
    ``engine.per_example_reason`` and a line of the summary), ``"vmap"`` or ``"bookkeeping"``.
    ``save_table=PATH`` writes the calibrated table (refuses an existing file).  Logs one INFO
    line (``finetune.engine`` logger); ``verbose=True`` also prints the full summary.  The numbers
    are attributes of the returned :class:`PrivateEngine`.

    Randomness: secure by default (OS-keyed ChaCha20 for sampling and noise); ``seed`` warns and
    makes the run reproducible; ``secure=False`` without a seed uses OS-seeded PCG64.
    ``resume``: a checkpoint path of :meth:`PrivateEngine.save` (or ``(arrays, state)`` of
    ``finetune.checkpointing.load_checkpoint``) of the same configuration; the engine continues it.
    ``dist``: ``finetune.dp.distributed.Distributed`` under ``msrun``: every rank draws the same
    global batch and noise, trains on its shard, and the clipped sums are summed exactly before the
    noise is added once.

    ``epsilon_budget`` (e.g. a table's claimed epsilon; ``train()`` passes it): a ceiling: a run
    whose certificate exceeds it stops before the first step that would take the certified epsilon
    above it (``PrivacyBudgetExceeded`` at once if no step fits).

    Unit-level (e.g. person-level) DP, ``finetune.dp.units``: ``unit_ids`` (one id per row) and
    ``max_rows_per_unit`` ``m``; ``batch_size`` then counts units (``q = batch_size / n_units``, Poisson
    over units), a sampled unit contributes at most ``m`` rows and its summed gradient is clipped as
    one; ``micro_batch_size`` (rows) must be a multiple of ``m``.  ``unit_name`` names the units in
    the summary (``"person"``).  A record-level run given ``record_people`` (the person ids of each
    row) reports the person-level epsilon of its most frequent person (or of ``person_cap``).
    """
    from .dp.optimizer import DPOptimizer
    from .dp.release_guard import ReleaseGuard

    try:
        relation = check_sampling(sampling, relation)
    except ValueError as exc:
        raise EngineConfigError(str(exc)) from None
    n = _positive_int("dataset_size", dataset_size)
    if n is None:
        raise EngineConfigError("dataset_size is required (the number of examples, e.g. len(x))")
    batch_size, epochs, steps = (_positive_int("batch_size", batch_size), _positive_int("epochs", epochs),
                                 _positive_int("steps", steps))
    sources = [k for k, v in (("target_epsilon", target_epsilon), ("noise_multiplier", noise_multiplier),
                              ("noise", noise)) if v is not None]
    if len(sources) != 1 and sources != ["target_epsilon", "noise"]:
        raise EngineConfigError("give one noise source: target_epsilon=, noise_multiplier= or noise= "
                                f"(got {', '.join(sources) or 'none'})")
    if epochs is not None and steps is not None:
        raise EngineConfigError("give epochs= or steps=, not both")
    try:
        max_grad_norm = float(max_grad_norm)
    except (TypeError, ValueError):
        max_grad_norm = math.nan
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise EngineConfigError(f"max_grad_norm must be a positive number, got {max_grad_norm!r}")
    if target_epsilon is not None and not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise EngineConfigError(f"target_epsilon must be positive, got {target_epsilon!r}")
    if noise_multiplier is not None and not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise EngineConfigError(f"noise_multiplier must be positive, got {noise_multiplier!r}")
    if epsilon_budget is not None and not (math.isfinite(epsilon_budget) and epsilon_budget > 0):
        raise EngineConfigError(f"epsilon_budget must be positive, got {epsilon_budget!r}")
    table = _load(noise) if noise is not None else None
    if save_table is not None and sampling == "fixed":
        raise EngineConfigError("save_table writes a table certified for Poisson or shuffled runs, not for "
                                "sampling='fixed'")
    if save_table is not None:
        _check_save_path(save_table, table)
    if table is not None:
        if target_delta is not None and float(target_delta) != table.delta:
            raise EngineConfigError(f"target_delta {target_delta:g} differs from the table's delta "
                                    f"{table.delta:g}")
        delta = table.delta
    else:
        if target_delta is None:
            raise EngineConfigError("target_delta is required (e.g. 1e-5, well below 1/dataset_size)")
        delta = float(target_delta)
        if not 0 < delta < 1:
            raise EngineConfigError(f"target_delta must lie in (0, 1), got {target_delta!r}")
    _check_delta(delta, n)
    _check_optimizer_params(net, optimizer)

    micro_batch_size = _positive_int("micro_batch_size", micro_batch_size)
    dist = dist if dist is not None and dist.world_size > 1 else None
    units = _unit_plan(unit_ids, max_rows_per_unit, n, sampling, batch_size, micro_batch_size)
    if units is not None and dist is not None:
        raise EngineConfigError("unit-level runs train in one process (no msrun data parallelism yet)")
    sample_rng, noise_rng, secure = _rng_pair(seed, secure, dist)
    plan_n = n if units is None else units.n_units           # q is over units in a unit-level run
    plan = _plan(sampling, plan_n, batch_size, epochs, steps, table)
    n_coords = int(sum(int(np.prod(p.shape)) for p in optimizer.parameters))
    noise_law, geometry, sigma, cert = _noise_and_certificate(
        plan, sampling, relation, delta, table, target_epsilon, noise_multiplier, n_coords, verbose)
    q, steps, steps_in_epoch, expected_batch = plan.q, plan.steps, plan.steps_in_epoch, plan.expected_batch

    if units is not None:   # Poisson over units, rows by the unit-local rule
        from .dp.units import UnitSampler

        sampler = UnitSampler(units, q, steps, rng=sample_rng)
    else:
        sampler = _sampler(sampling, n, q, batch_size, plan, sample_rng)
    release = release_mechanism(noise_law, geometry, sampling, relation, plan.accounted_rate)
    guard = ReleaseGuard(release, sampling=sampling, relation=relation, steps=steps,
                         steps_in_epoch=steps_in_epoch, delta=delta, budget=cert.epsilon,
                         expected_batch_size=expected_batch, cap=epsilon_budget)
    dp = DPOptimizer(optimizer, net, _NoiseSpec(noise_law, geometry), max_grad_norm=max_grad_norm,
                     expected_batch_size=expected_batch, per_example=per_example, rng=noise_rng,
                     guard=guard, reduce_sum=None if dist is None else dist.allreduce_sum_f64,
                     rows_per_unit=None if units is None else units.max_rows_per_unit)
    engine = PrivateEngine(
        dp_optimizer=dp, guard=guard, sampler=sampler, sampling=sampling, relation=relation,
        dataset_size=n, batch_size=batch_size if batch_size is not None else q * plan_n,
        micro_batch_size=micro_batch_size or _default_micro(expected_batch, units),
        steps=steps, epochs=plan.epochs, sampling_rate=q, delta=delta, noise=noise_law, geometry=geometry,
        certificate=cert, noise_multiplier=sigma, epsilon_target=target_epsilon, secure=secure,
        sample_rng=sample_rng, noise_rng=noise_rng, steps_in_epoch=steps_in_epoch, table=table,
        dist=dist, seeded=seed is not None)
    _unit_report(engine, units, unit_name, record_people, person_cap)
    if sampling in ("shuffle", "fixed") and compare_poisson:
        engine.poisson_epsilon = certify(Mechanism(noise_law, 1.0, geometry, q, steps), delta).epsilon
    if sampling == "fixed" and compare_poisson:
        shuffled = run_mechanism(noise_law, geometry, "shuffle", "substitution", steps, q,
                                 steps_per_epoch(n, batch_size))
        engine.shuffle_epsilon = certify(shuffled, delta).epsilon
    engine.summary = _summary(engine, max_grad_norm)
    if save_table is not None:
        _save(engine, save_table)
        engine.summary += f"\n  table written to {save_table}"
    return _finish(engine, net, resume, verbose)


def _sampler(sampling, n, q, batch_size, plan, rng):
    """The run's sampler: Poisson at rate ``q``, exactly ``batch_size`` without replacement each step
    (``fixed``), or a shuffle into batches of ``batch_size``."""
    from .dp.sampling import FixedSizeSampler, PoissonSampler
    from .dp.shuffle import ShuffleSampler

    if sampling == "poisson":
        return PoissonSampler(n, q, plan.steps, rng=rng)
    if sampling == "fixed":
        return FixedSizeSampler(n, batch_size, plan.steps, rng=rng)
    return ShuffleSampler(n, batch_size, plan.epochs, rng=rng)


def _finish(engine: PrivateEngine, net, resume, verbose: bool) -> PrivateEngine:
    """Resume (if asked), check data-parallel replicas, report."""
    if resume is not None:
        engine.checkpoint_state = engine._resume(resume)
    if engine.dist is not None:
        engine.dist.assert_in_sync(net.get_parameters())
    head = engine.summary.splitlines()[0] if engine.summary else "make_private"
    cert = (f"epsilon {engine.certificate.epsilon:.4g} at delta {engine.delta:g} ({engine.relation})"
            if engine.certificate is not None else "no certificate")
    log.info("%s; %s; %d steps%s", head, cert, engine.steps,
             f", resumed at step {engine.guard.steps_taken}" if resume is not None else "")
    if verbose:
        print(engine.summary, flush=True)
    return engine


def make_baseline(net, optimizer, *, dataset_size: int, sampling_rate: float, steps: int,
                  seed: int | None = None, secure: bool | None = None,
                  micro_batch_size: int | None = None, resume=None, dist=None,
                  verbose: bool = False) -> PrivateEngine:
    """The same engine without clipping or noise: a NON-private baseline (no certificate).

    Poisson sampling at ``sampling_rate`` for ``steps`` steps, the summed gradient divided by the
    expected batch size; ``engine.epsilon()`` is ``inf``.  For comparisons only."""
    from .dp.optimizer import DPOptimizer
    from .dp.release_guard import StepCounter

    n = _positive_int("dataset_size", dataset_size)
    steps = _positive_int("steps", steps)
    if n is None or steps is None or not 0 < float(sampling_rate) <= 1:
        raise EngineConfigError("make_baseline needs dataset_size, steps and a sampling_rate in (0, 1]")
    _check_optimizer_params(net, optimizer)
    dist = dist if dist is not None and dist.world_size > 1 else None
    sample_rng, noise_rng, secure = _rng_pair(seed, secure, dist)
    q = float(sampling_rate)
    expected = q * n
    plan = _Plan(q, steps, steps / steps_per_epoch(n, max(1, round(expected))), None, expected, q, steps)
    guard = StepCounter(steps, expected)
    dp = DPOptimizer(optimizer, net, None, expected_batch_size=expected, rng=noise_rng, guard=guard,
                     private=False, reduce_sum=None if dist is None else dist.allreduce_sum_f64)
    engine = PrivateEngine(
        dp_optimizer=dp, guard=guard, sampler=_sampler("poisson", n, q, None, plan, sample_rng),
        sampling="poisson", relation=None, dataset_size=n, batch_size=expected,
        micro_batch_size=_positive_int("micro_batch_size", micro_batch_size)
        or int(min(32, max(1, round(expected)))),
        steps=steps, epochs=plan.epochs, sampling_rate=q, delta=None, noise=None, geometry=None,
        certificate=None, noise_multiplier=None, epsilon_target=None, secure=secure,
        sample_rng=sample_rng, noise_rng=noise_rng, steps_in_epoch=None, dist=dist, private=False,
        seeded=seed is not None)
    engine.summary = (f"make_baseline: NON-PRIVATE, no clipping or noise; poisson sampling at rate "
                      f"{q:.6g}, {steps} steps")
    return _finish(engine, net, resume, verbose)


def _summary(e: PrivateEngine, max_grad_norm: float) -> str:
    law = (f"Gaussian noise, noise multiplier {e.noise_multiplier:.4f} (std {e.noise_multiplier:.4f} x "
           f"max_grad_norm {max_grad_norm:g})" if e.noise_multiplier is not None
           else f"{e.noise.family} noise {e.noise.params} x max_grad_norm {max_grad_norm:g}")
    lines = [f"make_private: {law}, {e.geometry} clipping"]
    if e.sampling == "fixed":
        lines.append(f"  sampling: fixed, exactly {e.batch_size} of {e.dataset_size} examples per step without "
                     f"replacement (gamma = {e.sampling_rate:.6g}), T = {e.steps} steps ({e.epochs:.3g} epochs)")
    elif e.sampling == "poisson":
        lines.append(f"  sampling: poisson, rate q = {e.sampling_rate:.6g} (expected batch "
                     f"{e.sampling_rate * e.dataset_size:.4g} of {e.dataset_size}), T = {e.steps} steps "
                     f"({e.epochs:.3g} epochs)")
    else:
        lines.append(f"  sampling: shuffle, {e.steps_in_epoch} batches of {e.batch_size} per epoch, "
                     f"{e.epochs} epochs, {e.steps} steps; no amplification: one release per epoch")
    target = f" (target {e.epsilon_target:g})" if e.epsilon_target is not None else ""
    lines.append(f"  certificate: epsilon {e.certificate.epsilon:.4f}{target} at delta {e.delta:g}, "
                 f"relation {_relation_text(e)}; accountants {_fmt_routes(e.certificate)}")
    lines.append(f"  per-example gradients: {e.optimizer.grads.method_reason}")
    if e.unit != "record":
        lines[1] = (f"  sampling: poisson over {e.n_units} {e.unit}s, rate q = {e.sampling_rate:.6g} "
                    f"(expected {e.sampling_rate * e.n_units:.4g} {e.unit}s of at most "
                    f"{e.max_rows_per_unit} rows each, {e.dataset_size} rows), T = {e.steps} steps "
                    f"({e.epochs:.3g} epochs)")
    lines.append("  " + _person_line(e))
    if e.poisson_epsilon is not None:
        lines.append(f"  Poisson sampling at q = {e.sampling_rate:.6g} for {e.steps} steps with the same "
                     "noise "
                     f"would certify epsilon {e.poisson_epsilon:.4f} (add/remove) instead "
                     f"of {e.certificate.epsilon:.4f}: "
                     f"{e.certificate.epsilon / e.poisson_epsilon:.2f}x smaller")
    if getattr(e, "shuffle_epsilon", None) is not None:
        lines.append(f"  shuffling into batches of {e.batch_size} for the same steps with the same noise would "
                     f"certify epsilon {e.shuffle_epsilon:.4f} (substitution, no amplification) instead of "
                     f"{e.certificate.epsilon:.4f}")
    return "\n".join(lines)


def _save(engine: PrivateEngine, path) -> None:
    """Write the engine's table (law, releases' q and count, geometry; certificate at sensitivity 1)."""
    from accountant.table import write_certified_table

    mech = _table_mechanism(engine)
    cert = engine.certificate if sensitivity(engine.relation) == 1.0 else None
    target = engine.epsilon_target or engine.certificate.epsilon
    engine._table = write_certified_table(
        Path(path), engine.noise, eps_target=target, delta=engine.delta, sampling_rate=mech.sampling_rate,
        steps=mech.steps, geometry=engine.geometry, certificate=cert, gaussian_sigma=engine.noise_multiplier,
        extra={"sampling": engine.sampling, "relation": engine.relation})


# ---- unit-level runs and the person-level report (finetune.dp.units) ---------------------------
def _unit_plan(unit_ids, max_rows_per_unit, n, sampling, batch_size, micro_batch_size):
    """The unit layout of a unit-level run (``None`` for a record-level run); refusals in one line."""
    from .dp.units import UnitConfigError, UnitLayout

    if unit_ids is None:
        if max_rows_per_unit is not None:
            raise EngineConfigError("max_rows_per_unit needs unit_ids (one unit id per row)")
        return None
    if sampling != "poisson":
        raise EngineConfigError(f"sampling={sampling!r} with unit_ids: only Poisson sampling over units "
                                "has a certificate for unit-level runs")
    try:
        units = UnitLayout(unit_ids, max_rows_per_unit, dataset_size=n)
    except UnitConfigError as exc:
        raise EngineConfigError(str(exc)) from None
    if batch_size is not None and batch_size > units.n_units:
        raise EngineConfigError(f"batch_size counts units with unit_ids: {batch_size} exceeds the "
                                f"{units.n_units} units")
    if micro_batch_size is not None and micro_batch_size % units.max_rows_per_unit:
        raise EngineConfigError(f"micro_batch_size {micro_batch_size} must be a multiple of "
                                f"max_rows_per_unit {units.max_rows_per_unit} (whole units per call)")
    return units


def _default_micro(expected_batch, units) -> int:
    """Rows per compiled call: up to 32 examples, or whole units (at least one) of ``m`` rows."""
    if units is None:
        return int(min(32, max(1, round(expected_batch))))
    m = units.max_rows_per_unit
    return m * int(max(1, min(round(expected_batch), 32 // m)))


def _unit_report(engine, units, unit_name, record_people, person_cap) -> None:
    from .dp.units import person_report

    if units is not None:
        engine.unit, engine.n_units, engine.max_rows_per_unit = str(unit_name), units.n_units, \
            units.max_rows_per_unit
    run = _table_mechanism(engine)
    mech = Mechanism(engine.noise, sensitivity(engine.relation), engine.geometry, run.sampling_rate, run.steps)
    try:
        report = person_report(engine.certificate.epsilon, mech, engine.delta, unit=engine.unit,
                               sampling=engine.sampling, record_people=record_people,
                               person_cap=person_cap)
    except ValueError as exc:
        raise EngineConfigError(str(exc)) from None
    engine.person_epsilon, engine.person_k, engine.person_method, engine.record_epsilon = (
        report["person_epsilon"], report["person_k"], report["person_method"], report["record_epsilon"])


def _relation_text(e: PrivateEngine) -> str:
    text = RELATION_TEXT[e.relation]
    return text if e.unit == "record" else text.replace("one example", f"one {e.unit} (all its rows)")


def _person_line(e: PrivateEngine) -> str:
    if e.person_epsilon is None:
        return f"person-level epsilon: not computed ({e.person_method})"
    k = "" if e.person_k is None else f", k = {e.person_k} records"
    line = f"person-level epsilon {e.person_epsilon:.4f} at delta {e.delta:g} ({e.person_method}{k})"
    if e.unit != "record":
        from .dp.units import record_epsilon_text

        line += "; " + record_epsilon_text(e.record_epsilon)
    return line
