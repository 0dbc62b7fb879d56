"""The DP fine-tuning loop: Poisson batches -> clipped per-example sums -> table noise -> optimizer.

``train(...)`` is the functional loop the CLI (``python -m finetune``) runs; the pieces it wires are
usable on their own (``finetune.dp.sampling``, ``finetune.dp.per_example``, ``finetune.dp.optimizer``,
``finetune.dp.guard``).  For ``mindspore.train.Model`` use ``make_private(...)``'s
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

from accountant.randomness import make_rng, warn_known_seed

from .dp.distributed import Distributed, shard
from .dp.optimizer import DPOptimizer
from .dp.sampling import PoissonSampler, micro_batches
from .dp.guard import PrivacyBudgetExceeded, PrivacyGuard, TableMismatchError, check_table

__all__ = ["TrainResult", "TrainingInterrupted", "train", "perplexity", "peak_rss_mb", "loop_state",
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
    guard: PrivacyGuard | None
    optimizer: DPOptimizer


def _new_history(private_stats: bool) -> dict:
    """What the loop keeps between steps (and a checkpoint stores): step timing as an aggregate and,
    only with ``private_stats``, every step's loss and realised batch size (statistics of the
    private data that the epsilon does not cover)."""
    history = {"first_step_seconds": None, "later_seconds": 0.0, "later_steps": 0}
    if private_stats:
        history.update(losses=[], batch_sizes=[])
    return history


def loop_state(dp: DPOptimizer, sampler: PoissonSampler, history: dict, planned_steps: int):
    """``(arrays, state)`` of a training loop for ``finetune.checkpointing.save_checkpoint``:
    the optimizer's arrays under ``params/`` and ``optimizer/``, everything else as JSON."""
    dp_state = dp.state_dict()
    arrays = {f"params/{k}": v for k, v in dp_state.pop("params").items()}
    arrays.update({f"optimizer/{k}": v for k, v in dp_state.pop("optimizer").items()})
    guard = dp.guard
    state = {"dp": dp_state, "sampler": sampler.state_dict(), "history": history,
             "steps_done": dp.steps_taken, "planned_steps": int(planned_steps),
             "epsilon_spent": guard.epsilon_spent() if guard is not None else None}
    return arrays, state


def _restore(dp: DPOptimizer, sampler: PoissonSampler, resume, private_stats: bool = False) -> dict:
    arrays, state = resume
    dp_state = dict(state["dp"])
    dp_state["params"] = {k[len("params/"):]: v for k, v in arrays.items() if k.startswith("params/")}
    dp_state["optimizer"] = {k[len("optimizer/"):]: v for k, v in arrays.items()
                             if k.startswith("optimizer/")}
    dp.load_state_dict(dp_state)
    sampler.load_state_dict(state["sampler"])
    if not sampler.position == dp.steps_taken == int(state["steps_done"]):
        raise ValueError("inconsistent checkpoint: sampler, optimizer and step count disagree")
    if dp.guard is not None and dp.guard.steps_taken != dp.steps_taken:
        raise ValueError("inconsistent checkpoint: the ledger and the step count disagree")
    saved = state["history"]
    history = _new_history(private_stats)
    if "times" in saved:  # checkpoint format of earlier versions: one time per step
        times = [float(v) for v in saved["times"]]
        saved = {"first_step_seconds": times[0] if times else None,
                 "later_seconds": float(sum(times[1:])), "later_steps": max(0, len(times) - 1),
                 **{k: saved[k] for k in ("losses", "batch_sizes") if k in saved}}
    for key in ("first_step_seconds", "later_seconds", "later_steps"):
        history[key] = saved[key]
    if private_stats:
        history["losses"] = [math.nan if v is None else v for v in saved.get("losses", [])]
        history["batch_sizes"] = list(saved.get("batch_sizes", []))
    return history


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

    The sampling rate and number of steps come from ``table`` (a run that does not match it is
    refused, :func:`finetune.dp.guard.check_table`); ``steps`` may lower the number of steps.  The
    noisy sum is divided by the expected batch size ``q * N``.  Returns the metrics (``steps``,
    ``epsilon_spent``, ``delta``, ``train_perplexity``, ``val_perplexity``, ``seconds_per_step``,
    ``peak_rss_mb``, ...), the privacy guard (its ledger holds what was spent) and the optimizer.
    ``evaluate=False`` skips the perplexity passes (the keys are then absent).

    Randomness: ``seed=None`` (default) draws the Poisson batches and the noise from ChaCha20 keyed
    with fresh OS entropy (``secure`` defaults to ``seed is None``); ``secure=False`` without a seed
    uses PCG64 seeded from the OS (fresh, not a CSPRNG).  A ``seed`` makes sampling and noise
    reproducible by anyone who knows it, which voids the guarantee against such an adversary: it
    warns (``KnownSeedWarning``) and ``metrics["randomness"]`` says ``"seeded"``.

    Private statistics: the per-step loss and realised batch size (``mean_batch_size``,
    ``final_train_loss``), shown in the progress bar and stored in checkpoints only with
    ``log_private_stats=True``; they, and the perplexities (``evaluate``), describe the private
    data and are not covered by the epsilon.

    Data parallel (``msrun``): pass ``dist=finetune.dp.distributed.Distributed.from_env()``. With more
    than one worker every rank draws the identical global Poisson batch (at the global rate ``q``,
    the table's) from a shared generator and trains on its shard ``idx[rank::N]``; the clipped sums
    are summed exactly across workers before the noise is added once (``DPOptimizer(reduce_sum=)``),
    so the release, the ledger and the result equal a one-process run with the same seed (up to
    float32 rounding of the per-micro-batch sums). Every rank returns the same metrics; only rank 0
    should write files. ``check_sync_every > 0`` verifies bit-identical replicas every that many
    steps (they are always verified at the start and the end). With ``dist=None`` or one worker
    this is the plain single-process loop.

    Checkpoints: ``checkpoint(arrays, state, reason)`` is called with :func:`loop_state` every
    ``checkpoint_every`` steps (or, if that is ``None``, every ``checkpoint_seconds`` of wall time),
    after the last step (``reason="final"``) and when ``stop_event`` (e.g. a ``threading.Event``
    set by a signal handler) is set (``reason="interrupted"``, then :class:`TrainingInterrupted` is
    raised); if it has a ``rearm()`` method, it is called after every step (MindSpore's
    runtime installs its own SIGINT handler when it runs a graph).  ``resume=(arrays, state)`` from ``finetune.checkpointing.load_checkpoint`` continues
    such a run: with the same arguments a seeded run then ends with the same ledger and weights as
    an uninterrupted one; a secure run continues with a fresh OS key (``metrics["secure_rekeys"]``).
    A table that cannot afford a single step raises ``PrivacyBudgetExceeded`` before any step; a run
    that stops before its planned steps says why in ``metrics["stopped_early"]``.  The progress bar
    shows ``non-private`` or an upper bound on the epsilon spent after every step
    (``finetune.dp.epsilon_trace``).

    Unit-level (person-level) DP: ``units`` (``finetune.dp.units.UnitLayout`` of the training rows)
    samples units at the table's rate ``q`` (Poisson over units), at most ``m`` rows each, clips
    each unit's summed gradient as one and divides by ``q * n_units``; a micro-batch holds
    ``max(1, micro_batch_size // m)`` whole units.  One process only.
    """
    if dist is not None and dist.world_size == 1:
        dist = None
    n = int(len(train_ids))
    if units is not None:
        if dist is not None:
            raise ValueError("unit-level training runs in one process (no msrun)")
        if units.dataset_size != n:
            raise ValueError(f"the unit layout has {units.dataset_size} rows, the training data {n}")
        micro_batch_size = units.max_rows_per_unit * max(1, micro_batch_size // units.max_rows_per_unit)
        n = units.n_units            # q, the table check and the divisor q * n are over units
    if dist is not None:
        dist.check_same("the training data", hashlib.blake2b(
            np.ascontiguousarray(train_ids).tobytes() + np.ascontiguousarray(train_mask).tobytes())
            .digest())
    if private and table is None:
        raise TableMismatchError("a private run needs a certified noise table")
    if table is not None:
        q, t = check_table(table, dataset_size=n, sampling_rate=sampling_rate, steps=steps)
    else:
        if sampling_rate is None or steps is None:
            raise ValueError("without a table, give sampling_rate and steps")
        q, t = float(sampling_rate), int(steps)
    guard = PrivacyGuard(table, dataset_size=n, sampling_rate=q, steps=t) if private else None
    if guard is not None and guard.limit == 0:
        raise PrivacyBudgetExceeded(
            f"the table cannot afford a single step: one step costs more than its budget epsilon "
            f"{guard.budget:.4g} (delta {guard.delta:g}); nothing was trained")
    params = list(model.trainable_params())
    if optimizer is None:
        optimizer = nn.Adam(params, learning_rate=lr)
    secure = seed is None if secure is None else bool(secure)
    if secure and seed is not None:
        raise ValueError("a secure generator cannot be seeded; drop the seed or pass secure=False")
    if seed is not None:
        warn_known_seed(seed)
    if dist is None:
        rng, reduce_sum = make_rng(seed=seed, secure=secure), None
    else:  # one generator shared by all ranks: the same global batch and the same noise draw
        dist.assert_in_sync(model.get_parameters())
        rng = dist.shared_rng(seed, secure=secure)
        reduce_sum = dist.allreduce_sum_f64
    dp = DPOptimizer(optimizer, model, table if private else None, max_grad_norm=max_grad_norm,
                     expected_batch_size=q * n, per_example=per_example, rng=rng, guard=guard,
                     private=private, reduce_sum=reduce_sum,
                     rows_per_unit=None if units is None else units.max_rows_per_unit)
    if units is not None:
        from .dp.units import UnitSampler
        sampler = UnitSampler(units, q, t, rng=rng)
    else:
        sampler = PoissonSampler(n, q, t, rng=rng)
    history = _new_history(log_private_stats)
    if resume is not None:
        history = _restore(dp, sampler, resume, log_private_stats)
    start_step = dp.steps_taken
    writes = checkpoint is not None and (dist is None or dist.is_main)

    def save(reason):
        if writes:
            arrays, state = loop_state(dp, sampler, history, t)
            checkpoint(arrays, state, reason)

    bar, trace = None, None
    if progress and (dist is None or dist.is_main):
        from tqdm import tqdm
        desc = "DP fine-tuning" if private else "fine-tuning (no DP)"
        if dist is not None:
            desc += f" x{dist.world_size} workers"
        bar = tqdm(total=t, initial=start_step, desc=desc, unit="step")
        if guard is not None:
            from .dp.epsilon_trace import EpsilonTrace
            trace = EpsilonTrace(guard.mechanism, guard.delta, guard.limit, guard.epsilon_at_limit)
    last_save = time.monotonic()
    try:
        for step in range(start_step, t):
            if guard is not None and guard.remaining() == 0:
                break
            if stop_event is not None and stop_event.is_set():
                break
            start = time.perf_counter()
            idx = sampler.sample()
            if dist is not None:  # this rank's share of the global batch
                idx = shard(idx, dist)
            mbs = [([train_ids[m.indices], train_mask[m.indices]], m.mask)
                   for m in micro_batches(idx, micro_batch_size)]
            stats = dp.step(mbs)
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
                privacy = (f"eps<={trace.upper_bound(step + 1):.3g}" if trace is not None
                           else "non-private")
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
        if trace is not None:
            trace.close()
    if stop_event is not None and stop_event.is_set() and dp.steps_taken < t and (
            guard is None or guard.remaining() > 0):
        save("interrupted")
        raise TrainingInterrupted(dp.steps_taken, guard.epsilon_spent() if guard is not None else None)
    save("final")
    if dist is not None:
        dist.assert_in_sync(params)
    eps = guard.epsilon_spent() if guard is not None else 0.0
    stop_reason = guard.stop_reason() if guard is not None else None
    first, later = history["first_step_seconds"], history["later_steps"]
    metrics = {
        "private": bool(private),
        "per_example": dp.method,
        "steps": dp.steps_taken,
        "sampling_rate": q,
        "expected_batch_size": q * n,
        "epsilon_spent": float(eps) if private else math.inf,
        "delta": float(table.delta) if table is not None else None,
        "certified_epsilon_of_table": float(guard.budget) if guard is not None else None,
        "max_grad_norm": max_grad_norm if private else None,
        "noise_std": dp.noise_std,
        # the first step includes graph compilation; report it separately
        "first_step_seconds": first,
        "seconds_per_step": history["later_seconds"] / later if later else first,
        "peak_rss_mb": peak_rss_mb(),
        "randomness": "secure" if secure else ("seeded" if seed is not None else "os-seeded"),
        "secure_rng": bool(secure),
        "secure_rekeys": int(getattr(dp, "secure_rekeys", 0)),
        "workers": 1 if dist is None else dist.world_size,
        "planned_steps": t,
        "stopped_early": (None if stop_reason is None else
                          {"reason": stop_reason, "steps": dp.steps_taken, "planned_steps": t}),
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
    return TrainResult(metrics, guard, dp)


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
