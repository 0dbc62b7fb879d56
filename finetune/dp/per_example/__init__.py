"""Per-example gradients, clipped and summed, in MindSpore graph and PyNative mode.

DP-SGD (Abadi et al. 2016, Algorithm 1) needs every example's gradient ``g_i``, clipped to norm at
most ``C`` (``g_i * min(1, C / ||g_i||)``) and summed.  Two ways, same result:

``vmap`` (:mod:`.vmap`)
    ``ops.vmap(ms.value_and_grad(loss_of_one_example))`` materialises every example's gradient
    (memory: batch x trainable parameters).  Works for any trainable parameter.

``bookkeeping`` (:mod:`.bookkeeping`, rules in :mod:`.rules`)
    Book-keeping / ghost clipping (Bu, Wang, Zha, Karypis, ICML 2023; ghost norm: Goodfellow 2015,
    Li et al. ICLR 2022): each covered layer's per-example gradient norm and clipped-sum
    contribution from its output gradient and input, one rule per layer role (linear with or
    without bias and LoRA factors, LayerNorm, RMSNorm, token/tied/position embeddings, user layers
    registered with :func:`register_dense` / :func:`register_rmsnorm`).  A plain Cell's covered
    layers are ``nn.Dense`` (no activation), ``nn.LayerNorm`` over the last axis, ``nn.Embedding``
    and registered classes; they run probed in an engine-owned structural copy that shares the
    user's Parameters (:mod:`.shadow`).  A tapped model (:mod:`.taps`: GPT-2 and the Llama family)
    gets its probes as inputs and returns what it keeps.

Book-keeping keeps one input per layer, so it is exact only for a layer that runs once per
forward.  ``auto`` picks book-keeping when every trainable parameter sits in a covered layer, no
trained parameter is held by two layers (tied weights) and, found at the first micro-batch by a
set-up forward on zeros (no data), every covered layer runs exactly once; ``vmap`` otherwise (with a
warning when found at the first micro-batch).  ``method="bookkeeping"`` refuses those networks
(:class:`SharedLayerError`).  ``method_reason`` says which method runs and why.  The set-up forward
also checks that the network returns per-example losses of shape [B] (:class:`LossShapeError`).

Units (``rows_per_unit = m``, person-level DP): the micro-batch holds ``U`` units of ``m``
contiguous rows (padding rows masked 0); the clipped quantity is each unit's *summed* gradient
``sum_{i in u} g_i`` and the norms returned are per unit, [U].  ``m = 1`` is record-level DP-SGD.

Geometry: ``l2`` clips the Euclidean norm of the concatenated per-example gradient (Gaussian tables),
``l1`` the sum of absolute values (Laplace-type tables, docs/soundness.md rule 2).  Norms are computed in
float32; the clip factor keeps a relative margin ``CLIP_MARGIN`` (1e-4, orders of magnitude above
the float32 rounding of these sums) so that rounding does not push a clipped gradient above ``C``.
The tests recompute every clipped per-example gradient in float64 and check the bound.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn

from .bookkeeping import ProbedClipSum, TapLoss as _TapLoss  # noqa: F401  (benchmarks import it)
from .common import (CLIP_MARGIN, GEOMETRIES, METHODS, BookkeepingError, LossShapeError, MaskedSum,
                     SharedLayerError, check_losses, shown, zeros_like)
from .rules import PROBED, Slot, plain_rule, register_dense, register_rmsnorm
from .shadow import Recorder, shadow_network, walk_replaceable
from .taps import LossOf, covered, is_tapped, tapped_cell
from .vmap import VmapClipSum

__all__ = ["PerExampleGradients", "SummedGradients", "register_dense", "register_rmsnorm",
           "bookkeeping_coverage", "CLIP_MARGIN", "GEOMETRIES", "METHODS", "BookkeepingError", "SharedLayerError",
           "LossShapeError"]


def _shared_parameters(network: nn.Cell, params) -> list[str]:
    """Names of ``params`` held by more than one cell (weights shared between layers)."""
    owners: dict[int, set] = {}
    for _, cell in network.cells_and_names():
        for q in cell._params.values():  # pylint: disable=protected-access
            if q is not None:
                owners.setdefault(id(q), set()).add(id(cell))
    return [p.name for p in params if len(owners.get(id(p), ())) > 1]


def bookkeeping_coverage(network: nn.Cell, params: Sequence[Parameter]) -> list[str]:
    """Names of trainable ``params`` that book-keeping cannot handle (empty list: fully covered)."""
    if is_tapped(network):
        ids = covered(network)
        return [p.name for p in params if id(p) not in ids]
    ids = set()
    for _, _, child, _ in walk_replaceable(network):
        rule = plain_rule(child)
        if rule is not None:
            ids.update(id(p) for p, _ in rule.roles(child) if p is not None)
        elif isinstance(child, PROBED):
            ids.update(id(p) for p in child.get_parameters() if not p.name.startswith("_bk."))
    return [p.name for p in params if id(p) not in ids]


def _rows_per_unit(m) -> int:
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
        raise ValueError(f"rows_per_unit must be a positive integer, got {m!r}")
    return int(m)


class PerExampleGradients:
    """Clipped sums of per-example (or per-unit) gradients.

    ``network``: either a Cell whose ``construct(*inputs)`` takes a batch (leading axis = examples)
    and returns the per-example losses [B], or a tapped model (:mod:`.taps`: ``loss(*inputs)``
    gives the per-example losses, ``taps()`` the book-keeping layers).
    ``params``: the trainable parameters, in the order the gradients are returned (default
    ``network.trainable_params()``).  ``geometry``: ``"l2"`` or ``"l1"``.  ``method``: ``"auto"``,
    ``"vmap"`` or ``"bookkeeping"``.  ``rows_per_unit``: ``m``, the rows of one privacy unit
    (default 1: every row is a unit).

    :meth:`clipped_sum` takes inputs of one fixed micro-batch shape (``U * m`` rows, unit-major), a
    0/1 row mask (padding rows 0) and the clipping norm (``inf``: no clipping).  For plain Cells
    book-keeping runs an engine-owned structural copy of ``network`` (same Parameter objects, probed
    layers swapped in); ``network`` itself is never modified and its checkpoint holds only its own
    Parameters.
    """

    def __init__(self, network: nn.Cell, params: Sequence[Parameter] | None = None,
                 geometry: str = "l2", method: str = "auto", rows_per_unit: int = 1):
        if geometry not in GEOMETRIES:
            raise ValueError(f"per-example clipping needs geometry 'l1' or 'l2', got {geometry!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.rows_per_unit = _rows_per_unit(rows_per_unit)
        self.network = network
        self.params = list(params) if params is not None else list(network.trainable_params())
        if not self.params:
            raise ValueError("no trainable parameters: nothing to differentiate")
        self.param_names = [p.name for p in self.params]
        self.geometry = geometry
        self.tapped = is_tapped(network)
        self.loss_network = LossOf(network) if self.tapped else network
        self.requested = method
        self.method, self.method_reason = self._choose(method)
        self._cell = None
        self._shapes = None
        self._probes = None

    def _choose(self, method):
        """(method, reason): book-keeping only where it is exact, else vmap (never silently)."""
        if method == "vmap":
            return "vmap", "vmap: requested"
        uncovered = self.uncovered()
        shared = [] if self.tapped else _shared_parameters(self.network, self.params)
        if method == "bookkeeping":
            if uncovered:
                raise BookkeepingError("book-keeping covers Dense/Linear, LoRA, LayerNorm, RMSNorm and embedding "
                                       f"parameters only; not covered: {shown(uncovered)} (use method='vmap')")
            if shared:
                raise SharedLayerError(f"book-keeping is not exact for shared weights: {shown(shared)} "
                                       "held by more than one layer (use method='vmap')")
            return "bookkeeping", "book-keeping: requested"
        if uncovered:
            return "vmap", f"vmap: book-keeping does not cover {shown(uncovered)}"
        if shared:
            return "vmap", f"vmap: shared weights ({shown(shared)} held by more than one layer)"
        if self.tapped:
            return "bookkeeping", "book-keeping: every trained parameter sits in a tap of the model"
        return "bookkeeping", ("book-keeping: every trained parameter sits in a covered layer "
                               "(one not run exactly once per forward switches the run to vmap)")

    def uncovered(self) -> list[str]:
        """Names of trainable parameters book-keeping cannot handle."""
        return bookkeeping_coverage(self.network, self.params)

    # ---- set-up ---------------------------------------------------------------------------
    def _covered_layers(self):
        """[(path, layer, [(parameter, role)], rule)] of the covered layers holding a trained
        parameter, each layer once (a cell reachable by two paths is one layer)."""
        ids = {id(p) for p in self.params}
        seen, out = set(), []
        for _, _, child, path in list(walk_replaceable(self.network)):
            if id(child) in seen:
                continue
            rule = plain_rule(child)
            if rule is None:
                continue
            wanted = [(p, kind) for p, kind in rule.roles(child) if p is not None and id(p) in ids]
            if wanted:  # a frozen layer is left alone
                seen.add(id(child))
                out.append((path, child, wanted, rule))
        return out

    def _install_probes(self, example_inputs):
        """The book-keeping cell for a plain Cell, or the names of covered layers that do not run
        exactly once per forward (book-keeping keeps one input per layer: not exact for those).

        One set-up forward on zeros of the micro-batch's shapes and dtypes (no data), in the
        current execution mode (the global mode is never switched), through an engine-owned copy
        whose covered layers record their calls' shapes; it also checks the loss contract."""
        layers = self._covered_layers()
        recorders = {id(child): Recorder(child) for _, child, _, _ in layers}
        out = shadow_network(self.network, recorders)(*zeros_like(example_inputs))
        check_losses(out, example_inputs)
        calls = [recorders[id(child)].calls for _, child, _, _ in layers]
        reused = [f"{path} ({len(c)} calls)" for (path, *_), c in zip(layers, calls) if len(c) != 1]
        if reused:
            return reused
        ids = {id(p): k for k, p in enumerate(self.params)}
        slots, probed, replacements = [None] * len(self.params), [], {}
        for (path, child, wanted, rule), ((in_shape, out_shape),) in zip(layers, calls):
            layer = rule.probed(child, path, in_shape, out_shape)
            for p, kind in wanted:
                other = p if kind == "embedding" else None
                slots[ids[id(p)]] = Slot(len(probed), kind, other)
            replacements[id(child)] = layer
            probed.append(layer)
        # The probed layers go into an engine-owned copy of the network; the user's Cell is never
        # modified (docs/privacy.md: nothing data-derived in the user's objects).
        shadow = shadow_network(self.network, replacements)
        return ProbedClipSum(shadow, probed, slots, self.geometry, self.rows_per_unit)

    def _build(self, inputs):
        shapes = tuple(tuple(x.shape) for x in inputs)
        if self._cell is not None:
            if shapes != self._shapes:
                raise ValueError(f"micro-batch shapes changed from {self._shapes} to {shapes}; "
                                 "pad every micro-batch to one shape (finetune.dp.sampling)")
            return
        if shapes[0][0] % self.rows_per_unit:
            raise ValueError(f"a micro-batch of {shapes[0][0]} rows is not whole units of "
                             f"{self.rows_per_unit} rows")
        self._shapes = shapes
        if self.method == "bookkeeping" and self.tapped:
            self._cell, self._probes = tapped_cell(self.network, self.params, inputs, self.geometry,
                                                   self.rows_per_unit)
            return
        if self.method == "bookkeeping":
            cell = self._install_probes(inputs)
            if not isinstance(cell, list):
                self._cell = cell
                return
            why = (f"layers not run exactly once per forward (shared or unused): {shown(cell)}; "
                   "book-keeping keeps one input per layer and is exact only for a layer run once")
            if self.requested == "bookkeeping":
                raise SharedLayerError(f"{why} (use method='vmap')")
            self.method, self.method_reason = "vmap", f"vmap: {why}"
            warnings.warn(f"per-example gradients: {self.method_reason}", stacklevel=3)
        elif not self.tapped:
            check_losses(self.network(*zeros_like(inputs)), inputs)
        self._cell = VmapClipSum(self.loss_network, self.params, self.geometry, len(inputs),
                                 self.rows_per_unit)

    # ---- use --------------------------------------------------------------------------------
    def clipped_sum(self, inputs: Sequence, mask, clip: float):
        """Return (clipped sum per parameter as float32 Tensors, per-row losses, per-unit norms).

        Losses of padding rows and norms of all-padding units are 0.
        """
        inputs = [x if isinstance(x, Tensor) else Tensor(np.asarray(x)) for x in inputs]
        self._build(inputs)
        mask = mask if isinstance(mask, Tensor) else Tensor(np.asarray(mask, dtype=np.float32))
        clip_t = Tensor(np.float32(clip))
        batch = ms.mutable(tuple(inputs))
        if self._probes is not None:
            return self._cell(batch, self._probes, mask, clip_t)
        return self._cell(batch, mask, clip_t)


class SummedGradients:
    """Non-private counterpart of :class:`PerExampleGradients`: the plain gradient of the masked
    loss sum (no per-example work, no clipping).  Same ``clipped_sum`` interface; ``clip`` must be inf.
    """

    method = "none"

    def __init__(self, network: nn.Cell, params: Sequence[Parameter] | None = None):
        self.network = network
        self.params = list(params) if params is not None else list(network.trainable_params())
        self.loss_network = LossOf(network) if is_tapped(network) else network
        self._cell = _PlainSum(self.loss_network, self.params)

    def clipped_sum(self, inputs: Sequence, mask, clip: float = float("inf")):
        if not np.isinf(clip):
            raise ValueError("SummedGradients does not clip; use PerExampleGradients")
        inputs = [x if isinstance(x, Tensor) else Tensor(np.asarray(x)) for x in inputs]
        mask = mask if isinstance(mask, Tensor) else Tensor(np.asarray(mask, dtype=np.float32))
        return self._cell(ms.mutable(tuple(inputs)), mask)


class _PlainSum(nn.Cell):
    def __init__(self, network, params):
        super().__init__(auto_prefix=False)
        self.masked = MaskedSum(network)
        self.params = ms.ParameterTuple(params)
        self.grad = ms.value_and_grad(self.masked, grad_position=None, weights=self.params,
                                      has_aux=True)

    def construct(self, inputs, mask):
        (_, losses), grads = self.grad(inputs, mask)
        return grads, losses * mask, ms.ops.zeros_like(mask)
