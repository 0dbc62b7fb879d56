"""A drop-in DP-SGD wrapper around any MindSpore optimizer, with noise from a certified table.

One step (Abadi et al. 2016, Algorithm 1, with the noise law replaced by the table's):

1. per-example gradients of the Poisson-sampled examples (``finetune.dp.per_example``), each clipped
   to norm ``C`` in the norm the table's certificate covers: ``l2`` for Gaussian tables, ``l1`` for
   Laplace-type / LMO tables (docs/soundness.md rule 2); a ``scalar`` table certifies one real number and
   is refused for a gradient with more than one coordinate;
2. their sum ``S``, accumulated over the micro-batches in float32 on the device and copied to the
   host once per step (float64 there);
3. ``S + C * Z`` in float64 with ``Z = table.noise.sample(n, rng)`` drawn outside the compiled graph
   (float64, exact for the certified law including its tails, rule 1); only this noisy sum is cast
   to float32, which is post-processing of the certified release.  The noise does not depend on
   the data, so :meth:`DPOptimizer.step` draws it in a background thread while the device computes
   the clipped sum; the draw starts after the step's Poisson batch was sampled and finishes before
   the step returns, so a seeded generator is used in exactly the order of a sequential run (same
   batches, same noise), and an interrupted step restores the generator's state;
4. division by the *expected* batch size ``q * N`` (not the realised one, which would leak it);
5. the wrapped optimizer's update.

``secure=True`` draws the noise from ``accountant.randomness.make_rng(secure=True)`` (ChaCha20 keyed
from the OS CSPRNG, docs/soundness.md rule 8).  The optimizer is wrapped in a Cell, not subclassed
(subclassing ``nn.Adam`` breaks in PyNative mode).
"""
from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Sequence

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from accountant.randomness import make_rng

from .per_example import PerExampleGradients, SummedGradients

__all__ = ["DPOptimizer", "StepStats", "GeometryError", "ZeroGradientError", "clip_geometry"]


class GeometryError(ValueError):
    """The table's certificate does not cover the query being released."""


class ZeroGradientError(RuntimeError):
    """Every per-example gradient of a step was zero while the losses differ: the gradients do not
    reach the trained parameters, and the run would train on noise alone."""


def clip_geometry(table_geometry: str, n_coordinates: int) -> str:
    """The clipping norm a table's certificate requires for a gradient of ``n_coordinates``.

    ``l2`` -> clip the L2 norm; ``l1`` -> clip the L1 norm.  ``scalar`` certifies one real-valued
    query with sensitivity 1, which covers a gradient only if it has a single coordinate.
    """
    if table_geometry in ("l1", "l2"):
        return table_geometry
    if table_geometry == "scalar":
        if int(n_coordinates) == 1:
            return "l2"
        raise GeometryError(
            f"the noise table certifies a scalar query (geometry 'scalar'), but the gradient has "
            f"{n_coordinates} coordinates; a scalar certificate covers one real-valued query only. "
            "Use a table certified for geometry 'l2' (Gaussian) or 'l1' (Laplace-type, LMO).")
    raise GeometryError(f"unknown table geometry {table_geometry!r}; expected 'l1', 'l2' or 'scalar'")


class _AddTuple(nn.Cell):
    """Element-wise sum of two gradient tuples, on the device (one compiled launch)."""

    def __init__(self):
        super().__init__(auto_prefix=False)
        self.map = ops.HyperMap()
        self.add = ops.Add()

    def construct(self, a, b):
        return self.map(self.add, a, b)


class _Apply(nn.Cell):
    """The wrapped optimizer as a Cell taking a gradient tuple (compiled once)."""

    def __init__(self, optimizer):
        super().__init__(auto_prefix=False)
        self.optimizer = optimizer

    def construct(self, grads):
        return self.optimizer(grads)


@dataclass
class StepStats:
    loss: float           # mean per-example loss over the sampled examples (nan if none)
    batch_size: int       # realised Poisson batch size
    clipped_fraction: float
    noise_std: float      # standard deviation of the noise added to each coordinate of the sum


class DPOptimizer:
    """Wrap ``optimizer`` (any MindSpore optimizer: SGD, Adam, AdamWeightDecay, ...) for DP-SGD.

    Parameters
    ----------
    optimizer: the MindSpore optimizer; its ``parameters`` are the ones trained.
    network: a Cell returning per-example losses, or a tapped model (``finetune.models.gpt2``).
    table: a certified ``accountant.table.NoiseTable`` (noise law and geometry); ``None`` only with
        ``private=False``.
    max_grad_norm: clipping norm ``C`` (in the table's geometry); the noise is ``C * Z``.
    expected_batch_size: ``q * N``; the noisy sum is divided by it.
    per_example: ``"auto"``, ``"vmap"`` or ``"bookkeeping"``.
    seed / secure / rng: the noise source (seeded PCG64, OS-keyed ChaCha20, or your own).
    guard: optional ``finetune.dp.release_guard.ReleaseGuard`` (built by ``finetune.make_private``,
        the one training engine); checked before and charged after each step.
    private: ``False`` runs the same pipeline without clipping or noise (non-private baseline).
    add_noise: testing switch; ``False`` makes the step non-private.
    reduce_sum: data-parallel hook. ``None`` (one process) or a callable that receives one float64
        vector -- this worker's clipped sum (parameters in order, flattened) followed by its three
        step statistics (loss sum, example count, clipped count) -- and returns the element-wise
        sum of that vector over all workers, identical on every worker. It is called once per step,
        *before* the noise is added, so the noise is added once to the global sum (never per worker
        and then averaged, which would divide its variance by the number of workers).
        ``finetune.dp.distributed.Distributed.allreduce_sum_f64`` is such a callable.
    rows_per_unit: unit-level clipping (``finetune.dp.units``): micro-batches are unit-major with
        this many rows per unit and each unit's summed gradient is clipped as one.
    prefetch_noise: draw each step's noise in a background thread while the device computes
        (:meth:`step` only; same draws as without).  ``last_timings`` holds the host-side phases
        of the last step in seconds (``clipped_sum``: device work of all micro-batches; ``d2h``;
        ``noise_draw`` (in the thread) and ``noise_wait`` (what the step still waited for it);
        ``noise_add``; ``h2d``; ``update``).
    """

    def __init__(self, optimizer: nn.Optimizer, network: nn.Cell, table=None, *,
                 max_grad_norm: float = 1.0, expected_batch_size: float,
                 per_example: str = "auto", seed: int | None = None, secure: bool = False,
                 rng=None, guard=None, private: bool = True, add_noise: bool = True,
                 reduce_sum=None, prefetch_noise: bool = True, rows_per_unit: int | None = None):
        if reduce_sum is not None and not callable(reduce_sum):
            raise TypeError("reduce_sum must be a callable (or None for one process)")
        self.reduce_sum = reduce_sum
        self.rows_per_unit = int(rows_per_unit or 1)
        self.optimizer = optimizer
        self.params = list(optimizer.parameters)
        self._sizes = [int(np.prod(p.shape)) for p in self.params]
        self.n_coordinates = int(sum(self._sizes))
        if not expected_batch_size > 0:
            raise ValueError(f"expected_batch_size must be positive, got {expected_batch_size}")
        self.expected_batch_size = float(expected_batch_size)
        self.private = bool(private)
        self.add_noise = bool(add_noise) and self.private
        self.guard = guard
        if self.private:
            if table is None:
                raise ValueError("a private run needs a certified noise table")
            self.geometry = clip_geometry(table.geometry, self.n_coordinates)
            self.max_grad_norm = float(max_grad_norm)
            if not (self.max_grad_norm > 0 and (math.isfinite(self.max_grad_norm) or not self.add_noise)):
                raise ValueError(f"max_grad_norm must be positive and finite, got {max_grad_norm}")
            self.noise = table.noise
            self.grads = PerExampleGradients(network, self.params, geometry=self.geometry,
                                             method=per_example, rows_per_unit=self.rows_per_unit)
        else:
            self.geometry = None
            self.max_grad_norm = math.inf
            self.noise = None
            self.grads = SummedGradients(network, self.params)
        if rng is not None and (seed is not None or secure):
            raise ValueError("pass either rng or seed/secure, not both")
        self.rng = rng if rng is not None else make_rng(seed=seed, secure=secure)
        self.secure = bool(secure)
        self._apply = _Apply(optimizer)
        self._add = _AddTuple()
        self._reset_step()
        self.steps_taken = 0
        self.prefetch_noise = bool(prefetch_noise)
        self._noise_future = None
        self._rng_state = None
        self._pool = None
        self.last_timings: dict = {}

    def _reset_step(self) -> None:
        """Forget the current step's accumulation (after it was applied, or when it failed)."""
        self._sum = None
        self._stats = [0.0, 0, 0]                  # loss sum, examples, clipped examples
        self._zero = [False, math.inf, -math.inf]  # any nonzero norm, lowest and highest loss
        self._t_clip = 0.0

    @property
    def method(self) -> str:
        return self.grads.method

    @property
    def noise_std(self) -> float:
        """Per-coordinate standard deviation of the noise added to the clipped sum."""
        if not self.add_noise:
            return 0.0
        return self.max_grad_norm * math.sqrt(self.noise.variance())

    # ---- accumulation over micro-batches -----------------------------------------------------
    def accumulate(self, inputs: Sequence, mask) -> None:
        """Add one micro-batch's clipped per-example gradients to the running sum (on the device)."""
        start = time.perf_counter()
        mask = np.asarray(mask, dtype=np.float32)
        grads, losses, norms = self.grads.clipped_sum(inputs, mask, self.max_grad_norm)
        # mutable: a plain tuple of Tensors is a graph constant, which recompiles every call and
        # makes MindSpore print the (un-noised) clipped sums in a warning on stderr
        self._sum = grads if self._sum is None else self._add(ms.mutable(tuple(self._sum)), ms.mutable(tuple(grads)))
        real = mask > 0
        self._stats[0] += float(losses.asnumpy()[real].astype(np.float64).sum())
        self._stats[1] += int(real.sum())
        if self.private:      # one norm per unit (per row when rows_per_unit is 1)
            norms = norms.asnumpy()[real.reshape(-1, self.rows_per_unit).any(axis=1)]
            self._stats[2] += int((norms > self.max_grad_norm * (1 - 1e-4)).sum())
            self._track_zero_norms(norms, losses.asnumpy()[real])
        self._t_clip += time.perf_counter() - start

    def _track_zero_norms(self, norms, losses) -> None:
        """Run-time guard state: any nonzero norm this step, and the range of the losses."""
        if norms.size:
            nonzero, lo, hi = self._zero
            self._zero = [nonzero or bool((norms != 0).any()), min(lo, float(losses.min())),
                          max(hi, float(losses.max()))]

    def _check_zero_gradients(self) -> None:
        """Stop (before any noise is added) when every per-example norm of the step is 0 while the
        per-example losses differ: the loss is not constant, so a zero gradient for every example
        means the gradients do not reach the trained parameters (an optimizer over parameters the
        loss does not use, or a per-example method that returns nothing).  One process only: with
        ``reduce_sum`` the workers would not agree on stopping."""
        nonzero, lo, hi = self._zero
        if self.private and self.reduce_sum is None and self._stats[1] and not nonzero and hi > lo:
            self._cancel_noise()
            self._reset_step()
            raise ZeroGradientError(
                f"step {self.steps_taken}: every per-example gradient norm is 0 while the per-example "
                f"losses differ; the gradients do not reach the trained parameters ({self.method}), "
                "so the run would train on noise alone: stopped before the noisy update")

    # ---- noise ----------------------------------------------------------------------------------
    NOISE_CHUNK = 1 << 22

    def _draw(self):
        """One float64 buffer per parameter, filled chunk by chunk from the table's law: the
        samplers' temporaries (a Laplace draw and its scale for LMO, say) cost a chunk, not the
        gradient's size twice over (GPT-2 small: 124M coordinates, 1 GB per float64 vector), and
        each buffer can be released as soon as its parameter's update is on the device.  The
        draws are i.i.d. in parameter order, so the split does not change the law."""
        start = time.perf_counter()
        out = []
        for size in self._sizes:
            z = np.empty(size, np.float64)
            for k in range(0, size, self.NOISE_CHUNK):
                m = min(self.NOISE_CHUNK, size - k)
                z[k:k + m] = self.noise.sample(m, self.rng)
            out.append(z)
        return out, time.perf_counter() - start

    def _start_noise(self) -> None:
        """Begin drawing this step's noise in the background (data-independent)."""
        if not (self.add_noise and self.prefetch_noise) or self._noise_future is not None:
            return
        bg = getattr(self.rng, "bit_generator", None)
        self._rng_state = bg.state if bg is not None else None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dp-noise")
        self._noise_future = self._pool.submit(self._draw)

    def _cancel_noise(self) -> None:
        """Discard a background draw of a step that did not happen; rewind a seeded generator."""
        future, self._noise_future = self._noise_future, None
        if future is None:
            return
        try:
            future.result()
        finally:
            if self._rng_state is not None:
                self.rng.bit_generator.state = self._rng_state
            self._rng_state = None

    def _take_noise(self):
        future, self._noise_future = self._noise_future, None
        self._rng_state = None
        if future is None:
            return self._draw()
        return future.result()

    def apply(self) -> StepStats:
        """Add noise to the accumulated sum, divide by the expected batch size, update.

        With no accumulated micro-batch (an empty Poisson batch) the sum is zero and the noise is
        still added: every step of the certified mechanism releases a noisy sum.
        """
        self._check_zero_gradients()
        if self.guard is not None:
            try:
                self.guard.check_next()
            except BaseException:
                self._cancel_noise()
                raise
        timings = {"clipped_sum": self._t_clip, "noise_wait": 0.0}
        t0 = time.perf_counter()
        if self.reduce_sum is None:
            # Per parameter: the float32 device sum S is copied once into the float64 buffer,
            # S + C Z is formed there, divided by q N and only then cast (docs/soundness.md rule 1).
            if self.add_noise:
                bufs, timings["noise_draw"] = self._take_noise()
                timings["noise_wait"] = time.perf_counter() - t0
                for z in bufs:
                    z *= self.max_grad_norm
            else:
                bufs = [np.zeros(size, np.float64) for size in self._sizes]
        else:
            flat = np.zeros(self.n_coordinates, np.float64)
            self._add_sum_into(flat)
            timings["d2h"] = time.perf_counter() - t0
            self._sum = None
            flat = self._reduce(flat)   # the global sum: noise is added once, after the reduction
            bufs = list(np.split(flat, np.cumsum(self._sizes)[:-1]))
            del flat
            if self.add_noise:
                t1 = time.perf_counter()
                z, timings["noise_draw"] = self._take_noise()
                timings["noise_wait"] = time.perf_counter() - t1
                for b, zp in zip(bufs, z):
                    zp *= self.max_grad_norm
                    b += zp
                del z
        t1 = time.perf_counter()
        grads, d2h, h2d = [], timings.get("d2h", 0.0), 0.0
        parts = list(self._sum) if self._sum is not None else None   # None: nothing left to copy
        self._sum = None
        for k, p in enumerate(self.params):
            buf, bufs[k] = bufs[k], None
            if parts is not None:
                t = time.perf_counter()
                buf += parts[k].asnumpy().reshape(-1)
                parts[k] = None              # the device buffer is released once copied
                d2h += time.perf_counter() - t
            buf /= self.expected_batch_size
            t = time.perf_counter()
            grads.append(Tensor(buf.astype(np.float32).reshape(p.shape)))
            h2d += time.perf_counter() - t
            del buf
        t3 = time.perf_counter()
        timings["d2h"] = d2h
        timings["h2d"] = h2d
        timings["noise_add"] = t3 - t1 - d2h - h2d
        self._apply(ms.mutable(tuple(grads)))
        timings["update"] = time.perf_counter() - t3
        if self.guard is not None:
            self.guard.record_step()
        loss_sum, n, clipped = self._stats
        stats = StepStats(loss=loss_sum / n if n else float("nan"), batch_size=n,
                          clipped_fraction=clipped / n if n else 0.0, noise_std=self.noise_std)
        self._reset_step()
        self.last_timings = timings
        self.steps_taken += 1
        return stats

    def _add_sum_into(self, flat: np.ndarray) -> None:
        """``flat += S``: the device's float32 clipped sum, copied to the host once, in float64."""
        if self._sum is None:
            return
        k = 0
        for g in self._sum:
            part = g.asnumpy().reshape(-1)
            flat[k:k + part.size] += part
            k += part.size

    def _reduce(self, flat: np.ndarray) -> np.ndarray:
        """Global clipped sum and statistics via ``reduce_sum`` (see the class docstring)."""
        local = np.concatenate([flat, np.asarray(self._stats, np.float64)])
        total = np.asarray(self.reduce_sum(local), dtype=np.float64).reshape(-1)
        if total.shape != local.shape:
            raise ValueError(f"reduce_sum returned {total.shape[0]} values, expected {local.size}")
        k = flat.size
        self._stats = [float(total[k]), int(round(total[k + 1])), int(round(total[k + 2]))]
        return total[:k]

    def step(self, micro_batches: Iterable) -> StepStats:
        """One DP step over a logical batch given as ``(inputs, mask)`` micro-batches."""
        if self.guard is not None:
            self.guard.check_next()
        self._start_noise()
        try:
            for inputs, mask in micro_batches:
                self.accumulate(inputs, mask)
        except BaseException:
            self._cancel_noise()
            self._reset_step()
            raise
        return self.apply()

    # ---- checkpoints ---------------------------------------------------------------------------
    STATE_VERSION = 1

    def _optimizer_state(self) -> dict:
        """The wrapped optimizer's own Parameters (moments, step counters, learning rate), by name."""
        trained = {id(p) for p in self.params}
        return {name: p for name, p in self.optimizer.parameters_and_names() if id(p) not in trained}

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue this one exactly.

        ``params`` and ``optimizer`` map names to numpy arrays (the trained weights; the wrapped
        optimizer's state); the rest is JSON-serialisable: ``steps_taken``, ``rng`` (a seeded numpy
        generator's bit-generator state, or ``{"secure": true}``: a secure key is never saved, a
        restored secure optimizer keeps its fresh OS-keyed generator), ``secure_rekeys`` (how many
        times a secure run was continued with a fresh key) and ``ledger`` (the guard's
        ``PrivacyLedger`` as JSON, ``None`` without a guard)."""
        rng = (self.rng.bit_generator.state if isinstance(self.rng, np.random.Generator)
               else {"secure": True})
        return {"version": self.STATE_VERSION, "private": self.private, "method": self.method,
                "steps_taken": self.steps_taken, "rng": rng,
                "secure_rekeys": int(getattr(self, "secure_rekeys", 0)),
                "ledger": (self.guard.ledger.to_json()
                           if getattr(self.guard, "ledger", None) is not None else None),
                "params": {p.name: p.asnumpy().copy() for p in self.params},
                "optimizer": {n: p.asnumpy().copy() for n, p in self._optimizer_state().items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`: weights, optimizer state, step count, generator state and the
        guard's ledger (which then reports what was spent).  Refuses a state of another shape, kind
        (private or not, seeded or secure) or a saved ledger with no guard to carry it."""
        if state.get("version") != self.STATE_VERSION:
            raise ValueError(f"unsupported optimizer state version {state.get('version')!r}")
        if bool(state["private"]) != self.private:
            raise ValueError("the saved state is of a " + ("private" if state["private"] else
                             "non-private") + " run")
        seeded = isinstance(self.rng, np.random.Generator)
        if seeded != ("secure" not in state["rng"]):
            raise ValueError("the saved state used another kind of generator (seeded vs secure)")
        if state["ledger"] is not None and self.guard is None:
            raise ValueError("the saved state holds a privacy ledger; give the optimizer a guard")
        targets = {p.name: p for p in self.params}
        inner = self._optimizer_state()
        for what, saved, have in (("parameters", state["params"], targets),
                                  ("optimizer state", state["optimizer"], inner)):
            if set(saved) != set(have):
                raise ValueError(f"the saved {what} do not match: missing "
                                 f"{sorted(set(have) - set(saved))[:3]}, unexpected "
                                 f"{sorted(set(saved) - set(have))[:3]}")
            for name, p in have.items():  # a scalar Parameter may read back as shape (1,)
                if np.size(saved[name]) != int(np.prod(p.shape)):
                    raise ValueError(f"saved {name} has shape {np.shape(saved[name])}, "
                                     f"expected {tuple(p.shape)}")
        for name, p in list(targets.items()) + list(inner.items()):
            value = state["params"][name] if name in targets else state["optimizer"][name]
            value = np.asarray(value).astype(ms.dtype_to_nptype(p.dtype), copy=False)
            p.set_data(Tensor(value.reshape(tuple(p.shape))))
        if state["ledger"] is not None:    # the guard checks that the ledger is this run's
            self.guard.load_state_dict({"steps_taken": int(state["steps_taken"]),
                                        "ledger": state["ledger"]})
        if seeded:
            self.rng.bit_generator.state = state["rng"]
            self.secure_rekeys = int(state.get("secure_rekeys", 0))
        else:  # the key is never saved: this generator was keyed afresh from the OS
            self.secure_rekeys = int(state.get("secure_rekeys", 0)) + 1
        self.steps_taken = int(state["steps_taken"])
