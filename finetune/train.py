"""The DP fine-tuning loop: Poisson batches -> clipped per-example sums -> table noise -> optimizer.

``train(...)`` is the functional loop the CLI (``python -m finetune``) runs: a thin loop over the one
training engine, ``finetune.make_private`` (sampler, clipping, noise and ledger meet there).  For
``mindspore.train.Model`` use ``make_private(...)``'s
``engine.dataset(...)`` / ``engine.train_network()`` / ``engine.callback()``: its rows carry the
sampler's ticket, so a pipeline the ledger does not describe is refused.

Randomness (docs/finetune.md, "Randomness"): without a ``seed`` the Poisson sampler and the noise
come from ChaCha20 keyed by the OS (``accountant.randomness.SecureRandom``); a ``seed`` makes both
reproducible by anyone who knows it and warns (``accountant.randomness.KnownSeedWarning``).

Statistics of the private data (losses, realised batch sizes, perplexities) are not covered by the
epsilon: unless ``log_private_stats=True`` they are kept out of the progress bar, the checkpoint and
the metrics (docs/privacy.md, section 8).
"""
from __future__ import annotations

import hashlib
import math
import resource
import sys
import time
from dataclasses import dataclass

import numpy as np
from mindspore import Tensor, nn

from .dp.distributed import Distributed
from .dp.guard import PrivacyBudgetExceeded, TableMismatchError, certified_epsilon, check_table  # noqa: F401

__all__ = ["TrainResult", "TrainingInterrupted", "train", "perplexity", "peak_rss_mb",
           "DEFAULT_CHECKPOINT_SECONDS", "PRIVATE_STATS"]

#: metrics that are statistics of the private data, outside the certificate: recorded only with
#: ``log_private_stats=True`` (``train_perplexity`` / ``val_perplexity`` only with ``evaluate=True``)
PRIVATE_STATS = ("mean_batch_size", "final_train_loss", "train_perplexity", "val_perplexity")

#: default wall time between two periodic checkpoints
DEFAULT_CHECKPOINT_SECONDS = 300.0


class TrainingInterrupted(Exception):
    """Training stopped on request (SIGINT/SIGTERM) after a checkpoint of ``steps`` steps."""

    def __init__(self, steps: int, epsilon: float | None):
        super().__init__(f"interrupted after {steps} steps")
        self.steps, self.epsilon = int(steps), epsilon


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MiB.

    Linux: ``VmHWM`` from /proc/self/status (reset at exec; ``ru_maxrss`` of a child started by
    fork+exec can report its parent's size).  Elsewhere ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2 ** 20


class _EvalLoss(nn.Cell):
    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, ids, mask):
        return self.model.loss(ids, mask)


def perplexity(model, ids: np.ndarray, mask: np.ndarray, batch_size: int = 16,
               _cache: dict = {}) -> float:  # noqa: B006 - per-model compiled evaluator cache
    """exp(mean next-token NLL over all real target tokens) of a tapped GPT-2 model."""
    ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.float32)
    if len(ids) == 0:
        return float("nan")
    key = id(model)
    if key not in _cache or _cache[key][0] is not model:
        _cache[key] = (model, _EvalLoss(model))
    fn = _cache[key][1]
    total, count = 0.0, 0.0
    for start in range(0, len(ids), batch_size):
        b_ids = np.zeros((batch_size, ids.shape[1]), np.int32)
        b_mask = np.zeros((batch_size, ids.shape[1]), np.float32)
        part = slice(start, min(start + batch_size, len(ids)))
        n = part.stop - part.start
        b_ids[:n], b_mask[:n] = ids[part], mask[part]
        losses = fn(Tensor(b_ids), Tensor(b_mask)).asnumpy().astype(np.float64)[:n]
        tokens = (b_mask[:n, 1:] * b_mask[:n, :-1]).sum(1).astype(np.float64)
        total += float((losses * tokens).sum())
        count += float(tokens.sum())
    return math.exp(total / count) if count else float("nan")


@dataclass
class TrainResult:
    metrics: dict
    guard: object | None          # the engine's ReleaseGuard (its ledger holds what was spent)
    optimizer: object             # the engine's DPOptimizer
    engine: object = None         # the finetune.engine.PrivateEngine that ran


def _new_history(private_stats: bool) -> dict:
    """What the loop keeps between steps (and a checkpoint stores): step timing as an aggregate and,
    only with ``private_stats``, every step's loss and realised batch size (statistics of the
    private data that the epsilon does not cover)."""
    history = {"first_step_seconds": None, "later_seconds": 0.0, "later_steps": 0}
    if private_stats:
        history.update(losses=[], batch_sizes=[])
    return history


def _restored_history(saved, private_stats: bool) -> dict:
    history = _new_history(private_stats)
    saved = saved or {}
    for key in ("first_step_seconds", "later_seconds", "later_steps"):
        if key in saved:
            history[key] = saved[key]
    if private_stats:
        history["losses"] = [math.nan if v is None else v for v in saved.get("losses", [])]
        history["batch_sizes"] = list(saved.get("batch_sizes", []))
    return history


def _engine(model, n, table, private, optimizer, lr, max_grad_norm, sampling_rate, steps,
            micro_batch_size, per_example, seed, secure, dist, resume, units=None):
    """The run's ``PrivateEngine``: ``make_private`` over the table (its q, at most its T, its
    claim as the budget), or ``make_baseline`` without a table's noise for ``private=False``."""
    from .engine import make_baseline, make_private

    if private and table is None:
        raise TableMismatchError("a private run needs a certified noise table")
    if table is not None:
        q, t = check_table(table, dataset_size=n if units is None else units.n_units,
                           sampling_rate=sampling_rate, steps=steps)
    else:
        if sampling_rate is None or steps is None:
            raise ValueError("without a table, give sampling_rate and steps")
        q, t = float(sampling_rate), int(steps)
    if optimizer is None:
        optimizer = nn.Adam(list(model.trainable_params()), learning_rate=lr)
    if not private:
        return make_baseline(model, optimizer, dataset_size=n, sampling_rate=q, steps=t, seed=seed,
                             secure=secure, micro_batch_size=micro_batch_size, resume=resume,
                             dist=dist)
    return make_private(model, optimizer, dataset_size=n, noise=table, steps=t,
                        max_grad_norm=max_grad_norm, seed=seed, secure=secure,
                        micro_batch_size=micro_batch_size, per_example=per_example,
                        epsilon_budget=certified_epsilon(table), resume=resume, dist=dist,
                        **({} if units is None else {"unit_ids": units.ids, "unit_name": "person",
                                                     "max_rows_per_unit": units.max_rows_per_unit}))


def train(model, train_ids: np.ndarray, train_mask: np.ndarray, val_ids: np.ndarray | None = None,
          val_mask: np.ndarray | None = None, *, table=None, private: bool = True,
          optimizer: nn.Optimizer | None = None, lr: float = 1e-3, max_grad_norm: float = 1.0,
          sampling_rate: float | None = None, steps: int | None = None,
          micro_batch_size: int = 16, per_example: str = "auto", seed: int | None = None,
          secure: bool | None = None, progress: bool = True, eval_batch_size: int = 16,
          evaluate: bool = True, dist=None, check_sync_every: int = 0, resume=None,
          checkpoint=None, checkpoint_every: int | None = None,
          checkpoint_seconds: float | None = DEFAULT_CHECKPOINT_SECONDS,
          stop_event=None, log_private_stats: bool = False, units=None) -> TrainResult:
    """Fine-tune ``model``'s trainable parameters with DP-SGD (or without, ``private=False``).

    A loop over ``finetune.make_private(model, optimizer, noise=table, ...)``: the engine samples,
    clips, adds the table's noise, charges its ledger and stops.  The sampling rate and number of
    steps come from ``table`` (a run that does not match it is refused,
    :func:`finetune.dp.guard.check_table`); ``steps`` may lower the number of steps; the table's
    claimed epsilon is the engine's ``epsilon_budget``.  ``private=False`` runs
    ``finetune.engine.make_baseline`` (same sampling and loop, no clipping or noise).  Returns the
    metrics (``steps``, ``epsilon_spent``, ``delta``, ``train_perplexity``, ``val_perplexity``,
    ``seconds_per_step``, ``peak_rss_mb``, ...), the guard (its ledger holds what was spent), the
    optimizer and the engine.  ``evaluate=False`` skips the perplexity passes.

    Randomness: as ``make_private``: ``seed=None`` (default) draws the batches and the noise from
    ChaCha20 keyed with fresh OS entropy; ``secure=False`` without a seed uses PCG64 seeded from the
    OS.  A ``seed`` warns (``KnownSeedWarning``) and ``metrics["randomness"]`` says ``"seeded"``.

    Private statistics: the per-step loss and realised batch size (``mean_batch_size``,
    ``final_train_loss``), shown in the progress bar and stored in checkpoints only with
    ``log_private_stats=True``; they, and the perplexities (``evaluate``), describe the private
    data and are not covered by the epsilon.

    Data parallel (``msrun``): ``dist=finetune.dp.distributed.Distributed.from_env()`` is passed to
    the engine (one global batch and one noise draw shared by all ranks, exact sum of the clipped
    sums before the noise; see ``make_private``).  ``check_sync_every > 0`` verifies bit-identical
    replicas every that many steps (always at the start and the end).

    Checkpoints: ``checkpoint(engine, state, reason)`` is called every ``checkpoint_every`` steps
    (or, if that is ``None``, every ``checkpoint_seconds`` of wall time), after the last step
    (``reason="final"``) and when ``stop_event`` is set (``reason="interrupted"``, then
    :class:`TrainingInterrupted` is raised); ``state`` is this loop's JSON (timing, private
    statistics if logged) for ``engine.save(path, extra=...)``.  If ``stop_event`` has ``rearm()``
    it is called after every step (MindSpore's runtime installs its own SIGINT handler).
    ``resume`` is a checkpoint path or ``(arrays, state)`` of ``finetune.checkpointing
    .load_checkpoint`` written by ``engine.save`` (the CLI's or a script's): a seeded run then ends
    with the same ledger and weights as an uninterrupted one; a secure run continues with a fresh
    OS key (``metrics["secure_rekeys"]``).  A table whose claim cannot afford one step raises
    ``PrivacyBudgetExceeded`` before any step; a run that stops before its planned steps says why
    in ``metrics["stopped_early"]``.  The progress bar shows ``non-private`` or ``engine.epsilon()``
    (an upper bound on the epsilon spent) after every step.

    Unit-level (person-level) DP: ``units`` (``finetune.dp.units.UnitLayout`` of the training rows)
    is passed to the engine (``make_private(unit_ids=..., max_rows_per_unit=...)``): Poisson over
    units at the table's rate ``q``, at most ``m`` rows each, each unit's summed gradient clipped as
    one, divided by ``q * n_units``; a micro-batch holds ``max(1, micro_batch_size // m)`` whole
    units.  One process only.
    """
    from .engine import refuse_pipeline

    refuse_pipeline(train_ids, train_mask, val_ids, val_mask)
    if dist is not None and dist.world_size == 1:
        dist = None
    n = int(len(train_ids))
    if units is not None:
        if dist is not None:
            raise ValueError("unit-level training runs in one process (no msrun)")
        if units.dataset_size != n:
            raise ValueError(f"the unit layout has {units.dataset_size} rows, the training data {n}")
        micro_batch_size = units.max_rows_per_unit * max(1, micro_batch_size // units.max_rows_per_unit)
    if dist is not None:
        dist.check_same("the training data", hashlib.blake2b(
            np.ascontiguousarray(train_ids).tobytes() + np.ascontiguousarray(train_mask).tobytes())
            .digest())
    engine = _engine(model, n, table, private, optimizer, lr, max_grad_norm, sampling_rate, steps,
                     micro_batch_size, per_example, seed, secure, dist, resume, units)
    dp, guard, t = engine.optimizer, engine.guard, engine.steps
    params = list(model.trainable_params())
    saved = (engine.checkpoint_state or {}).get("history")
    history = _restored_history(saved, log_private_stats)
    start_step = guard.steps_taken
    writes = checkpoint is not None and (dist is None or dist.is_main)

    def save(reason):
        if writes:
            checkpoint(engine, {"history": history, "planned_steps": t}, reason)

    bar = None
    if progress and (dist is None or dist.is_main):
        from tqdm import tqdm
        desc = "DP fine-tuning" if private else "fine-tuning (no DP)"
        if dist is not None:
            desc += f" x{dist.world_size} workers"
        bar = tqdm(total=t, initial=start_step, desc=desc, unit="step")
    last_save = time.monotonic()
    try:
        batches = engine.batches(train_ids, train_mask)
        for step in range(start_step, t):
            if guard.remaining() == 0 or stop_event is not None and stop_event.is_set():
                break
            start = time.perf_counter()
            stats = engine.step(next(batches))
            seconds = time.perf_counter() - start
            if history["first_step_seconds"] is None:
                history["first_step_seconds"] = seconds
            else:
                history["later_seconds"] += seconds
                history["later_steps"] += 1
            if log_private_stats:
                history["losses"].append(stats.loss)
                history["batch_sizes"].append(stats.batch_size)
            if dist is not None and check_sync_every and (step + 1) % check_sync_every == 0:
                dist.assert_in_sync(params)
            if bar is not None:
                privacy = f"eps<={engine.epsilon():.3g}" if private else "non-private"
                bar.set_postfix_str(f"loss={stats.loss:.3f}, {privacy}, batch={stats.batch_size}"
                                    if log_private_stats else privacy)
                bar.update(1)
            done = step + 1
            if hasattr(stop_event, "rearm"):
                stop_event.rearm()  # the runtime re-installs its own SIGINT handler when it runs
            if done < t and (checkpoint_every and done % checkpoint_every == 0 or (
                    not checkpoint_every and checkpoint_seconds is not None
                    and time.monotonic() - last_save >= checkpoint_seconds)):
                save("periodic")
                last_save = time.monotonic()
    finally:
        if bar is not None:
            bar.close()
        guard.close()
    if stop_event is not None and stop_event.is_set() and guard.steps_taken < t and guard.remaining() > 0:
        save("interrupted")
        raise TrainingInterrupted(guard.steps_taken, guard.epsilon_spent() if private else None)
    save("final")
    if dist is not None:
        dist.assert_in_sync(params)
    stop_reason = guard.stop_reason()
    first, later = history["first_step_seconds"], history["later_steps"]
    metrics = {
        "private": bool(private),
        "per_example": dp.method,
        "steps": guard.steps_taken,
        "sampling_rate": engine.sampling_rate,
        # the divisor of the noisy sum: q times the rows, or, in a person-unit run, the units
        "expected_batch_size": dp.expected_batch_size if private else engine.sampling_rate * n,
        "epsilon_spent": float(guard.epsilon_spent()) if private else math.inf,
        "delta": float(table.delta) if table is not None else None,
        "certified_epsilon_of_table": certified_epsilon(table) if private else None,
        "max_grad_norm": max_grad_norm if private else None,
        "noise_std": dp.noise_std,
        # the first step includes graph compilation; report it separately
        "first_step_seconds": first,
        "seconds_per_step": history["later_seconds"] / later if later else first,
        "peak_rss_mb": peak_rss_mb(),
        "randomness": "secure" if engine.secure else ("seeded" if engine.seeded else "os-seeded"),
        "secure_rng": bool(engine.secure),
        "secure_rekeys": int(getattr(dp, "secure_rekeys", 0)),
        "workers": 1 if dist is None else dist.world_size,
        "planned_steps": t,
        "stopped_early": (None if stop_reason is None else
                          {"reason": stop_reason, "steps": guard.steps_taken, "planned_steps": t}),
    }
    if evaluate:  # statistics of the (private) training and validation data
        metrics["train_perplexity"] = perplexity(model, train_ids, train_mask, eval_batch_size)
        metrics["val_perplexity"] = (perplexity(model, val_ids, val_mask, eval_batch_size)
                                     if val_ids is not None and len(val_ids) else None)
    if log_private_stats:
        losses, sizes = history["losses"], history["batch_sizes"]
        metrics["mean_batch_size"] = float(np.mean(sizes)) if sizes else 0.0
        metrics["final_train_loss"] = (float(np.nanmean(losses[-max(1, len(losses) // 10):]))
                                       if losses else None)
    return TrainResult(metrics, guard if private else None, dp, engine)


def train_distributed(model, train_ids, train_mask, val_ids=None, val_mask=None, *,
                      dist=None, check_sync_every: int = 0, **kwargs):
    """``finetune.train.train`` for N data-parallel workers (works unchanged with one process).

    The same loop (``train(..., dist=dist)``): same sampling, clipping, noise and ledger as one
    process; the global batch is drawn once (identically on all ranks) and sharded. Every rank
    returns the same metrics; let rank 0 write files. ``check_sync_every > 0`` verifies
    bit-identical replicas every that many steps.
    """
    dist = dist if dist is not None else Distributed.from_env()
    return train(model, train_ids, train_mask, val_ids, val_mask, dist=dist,
                 check_sync_every=check_sync_every, **kwargs)
