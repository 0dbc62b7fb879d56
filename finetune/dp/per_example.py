"""Per-example gradients, clipped and summed, in MindSpore graph and PyNative mode.

DP-SGD (Abadi et al. 2016, Algorithm 1) needs every example's gradient ``g_i``, clipped to norm at
most ``C`` (``g_i * min(1, C / ||g_i||)``) and summed.  Two ways, same result:

``vmap``
    ``ops.vmap(ms.value_and_grad(loss_of_one_example))`` materialises every example's gradient
    (memory: batch x trainable parameters).  Works for any trainable parameter.

``bookkeeping``
    Book-keeping / ghost clipping (Bu, Wang, Zha, Karypis, "Differentially private optimization on
    large model at small cost", ICML 2023; ghost norm: Goodfellow 2015, Li et al. ICLR 2022).  For a
    Dense layer ``y = x W^T + b`` applied to the tokens of example ``i``, the weight gradient is
    ``G_i = sum_t g_it a_it^T`` with ``a`` the layer input and ``g = dL/dy``.  Its norm needs no ``G_i``:
    ``||G_i||_F^2 = sum_{t,t'} (a_it . a_it')(g_it . g_it')`` (ghost norm), and the clipped sum is
    ``sum_i c_i G_i = (c * g)^T a``, a single matmul.  Per layer the cheaper of the ghost norm
    (``~T^2 (in + out)`` per example) and the materialised per-layer gradient (``~T in out``) is used
    (MixOpt, Bu et al. 2023).  ``g`` is obtained (in both modes; hooks are ignored in graph mode) by
    adding a zero "probe" tensor to each layer output and differentiating the summed loss with
    respect to the probes; the layer input is kept during the forward pass.  A probe is a
    Parameter with ``requires_grad=True``: PyNative mode returns a zero gradient for one with
    ``requires_grad=False``.  Covered layers: ``nn.Dense`` (no
    activation), ``nn.LayerNorm`` over the last axis, any layer registered with
    :func:`register_dense`, and in a tapped model (``finetune.models.gpt2``) also the token and
    position embeddings, the token embedding tied to the output head counted once (its per-example
    gradient is the sum of the lookup and the head parts, so its norm has a cross term; see
    :class:`_Slot`).  No per-example gradient of a whole model is ever materialised.

    Nothing is stored in the user's network: for a plain Cell the probed layers and their buffers
    belong to an engine-owned structural copy that shares the user's Parameters
    (:func:`_shadow_network`); a tapped model gets its probes as inputs and returns what it keeps.

Book-keeping keeps one input per layer, so it is exact only for a layer that runs once per
forward.  ``auto`` picks book-keeping when every trainable parameter sits in a covered layer, no
trained parameter is held by two layers (tied weights) and, found at the first micro-batch by a
set-up forward on zeros (no data), every covered layer runs exactly once; ``vmap`` otherwise (with a
warning when found at the first micro-batch).  ``method="bookkeeping"`` refuses those networks
(:class:`SharedLayerError`).  ``method_reason`` says which method runs and why.  The set-up forward
also checks that the network returns per-example losses of shape [B] (:class:`LossShapeError`).

Geometry: ``l2`` clips the Euclidean norm of the concatenated per-example gradient (Gaussian tables),
``l1`` the sum of absolute values (Laplace-type tables, docs/soundness.md rule 2).  Norms are computed in
float32; the clip factor keeps a relative margin ``CLIP_MARGIN`` (1e-4, orders of magnitude above
the float32 rounding of these sums) so that rounding does not push a clipped gradient above ``C``.
The tests recompute every clipped per-example gradient in float64 and check the bound.
"""
from __future__ import annotations

import copy
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

__all__ = ["PerExampleGradients", "SummedGradients", "register_dense", "bookkeeping_coverage", "CLIP_MARGIN",
           "GEOMETRIES", "METHODS", "SharedLayerError", "LossShapeError"]

CLIP_MARGIN = 1e-4
GEOMETRIES = ("l1", "l2")
METHODS = ("auto", "vmap", "bookkeeping")
_TINY = 1e-30


# --------------------------------------------------------------------------------------------
# Layer rules for book-keeping.  A rule says how to run a layer functionally and which of its
# parameters are a "weight" (per-example grad g^T a) or a "bias" (per-example grad sum_t g).
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _DenseRule:
    """A layer computing ``x @ W^T + b`` with ``W`` stored [out, in] (attribute names given)."""

    weight: str = "weight"
    bias: str | None = "bias"


_DENSE_RULES: dict[type, _DenseRule] = {}


def register_dense(cls: type, weight: str = "weight", bias: str | None = "bias") -> None:
    """Declare that cells of class ``cls`` compute ``x @ W^T + b`` with ``W`` stored [out, in].

    The class's ``construct`` is replaced by an equivalent ``ops.dense`` during book-keeping, so only
    register layers for which that is exactly true (no activation, no dropout, no extra terms).
    """
    _DENSE_RULES[cls] = _DenseRule(weight, bias)


def _dense_rule(cell: nn.Cell) -> _DenseRule | None:
    if type(cell) in _DENSE_RULES:
        return _DENSE_RULES[type(cell)]
    if type(cell) is nn.Dense and not getattr(cell, "activation_flag", False):
        return _DenseRule("weight", "bias" if getattr(cell, "has_bias", True) else None)
    return None


def _is_layernorm(cell: nn.Cell) -> bool:
    return (type(cell) is nn.LayerNorm and len(cell.normalized_shape) == 1
            and cell.begin_norm_axis in (-1,) and cell.begin_params_axis in (-1,))


class _Recorder(nn.Cell):
    """A covered layer run unchanged, recording ``(input shape, output shape)`` per call.

    The set-up forward runs in the current execution mode: in PyNative the attribute is set as
    the call runs, in graph mode when the compiled forward runs (shapes are static there)."""

    def __init__(self, layer: nn.Cell):
        super().__init__(auto_prefix=False)
        self.layer = layer
        self.calls = ()

    def construct(self, x):
        y = self.layer(x)
        self.calls = self.calls + ((x.shape, y.shape),)
        return y


def _probe(shape, tag):
    # requires_grad=True: PyNative mode returns a zero gradient for a Parameter with
    # requires_grad=False (graph mode does not), which made book-keeping sum to zero there.
    return Parameter(ops.zeros(shape, ms.float32), name=f"_bk.{tag}.probe", requires_grad=True)


def _buffer(shape, tag):
    return Parameter(ops.zeros(shape, ms.float32), name=f"_bk.{tag}.act", requires_grad=False)


class _ProbedDense(nn.Cell):
    """Dense layer with a zero probe on its output and its input saved for book-keeping."""

    def __init__(self, weight: Parameter, bias: Parameter | None, tag: str, in_shape, out_shape):
        super().__init__(auto_prefix=False)
        self.weight = weight
        self.bias = bias
        self.has_bias = bias is not None
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.probe = _probe(self.out_shape, tag)
        self.act = _buffer(self.in_shape, tag)

    def construct(self, x):
        ops.assign(self.act, x)
        if self.has_bias:
            return ops.dense(x, self.weight, self.bias) + self.probe
        return ops.dense(x, self.weight) + self.probe


class _ProbedLayerNorm(nn.Cell):
    """LayerNorm over the last axis, ``xhat * gamma + beta``; saves ``xhat`` and probes the output."""

    def __init__(self, gamma: Parameter, beta: Parameter, eps: float, tag: str, in_shape, out_shape=None):
        super().__init__(auto_prefix=False)
        self.gamma = gamma
        self.beta = beta
        self.eps = float(eps)
        self.in_shape = self.out_shape = tuple(in_shape)
        self.probe = _probe(self.in_shape, tag)
        self.act = _buffer(self.in_shape, tag)

    def _normalise(self, x):
        mean = x.mean(-1, keep_dims=True)
        var = ops.square(x - mean).mean(-1, keep_dims=True)
        return (x - mean) * ops.rsqrt(var + self.eps)

    def construct(self, x):
        xhat = self._normalise(x)
        ops.assign(self.act, xhat)
        return xhat * self.gamma + self.beta + self.probe


def _walk_replaceable(network: nn.Cell):
    """Yield (parent, child_name, child, path) for every direct child of every cell."""
    for path, parent in network.cells_and_names():
        for name, child in list(parent._cells.items()):  # pylint: disable=protected-access
            if child is None:
                continue
            yield parent, name, child, f"{path}.{name}" if path else name


def _subtree_ids(cell: nn.Cell) -> set[int]:
    return {id(c) for _, c in cell.cells_and_names()}


def _clone_cell(cell: nn.Cell, children: dict) -> nn.Cell:
    """A new Cell of the same class whose attributes are ``cell``'s (same Parameter objects), with
    the sub-cells in ``children`` (old id -> new cell) swapped in: in ``_cells`` and in any list or
    tuple attribute holding cells (``nn.SequentialCell.cell_list``).  ``cell`` is not modified."""
    new = copy.copy(cell)  # Cell.__setstate__ would share cell.__dict__: give it its own below
    state = dict(cell.__dict__)
    state["_cells"] = OrderedDict((k, children.get(id(v), v) if v is not None else None)
                                  for k, v in cell.__dict__["_cells"].items())
    for key in ("_params", "_buffers", "_params_list"):
        if isinstance(state.get(key), dict):
            state[key] = type(state[key])(state[key])
    for key, value in list(state.items()):
        if isinstance(value, (list, tuple)) and any(id(v) in children for v in value):
            state[key] = type(value)(children.get(id(v), v) for v in value)
    # fresh compilation identity: the clone must never reuse (or evict) the original's graphs
    state["_create_time"] = time.time_ns()
    state["_compile_cache"] = None
    state["_phase_cache"] = None
    state["_compiled"] = False
    object.__setattr__(new, "__dict__", state)
    nn.Cell.total_instance_count += 1
    return new


def _shadow_network(network: nn.Cell, replacements: dict) -> nn.Cell:
    """A structural copy of ``network`` in which the sub-cells ``replacements`` (id -> new cell)
    are swapped in.  Only the cells on a path from the root to a replaced cell are copied; every
    other sub-cell and every Parameter is shared.  ``network`` itself is left untouched (classes,
    children, Parameters), so it keeps running at any shape and ``save_checkpoint(network)`` sees
    only its own Parameters."""
    memo: dict[int, nn.Cell] = {}

    def visit(cell):
        if id(cell) in replacements:
            return replacements[id(cell)]
        if id(cell) in memo:
            return memo[id(cell)]
        kids = {}
        for child in cell.__dict__["_cells"].values():
            if child is not None and (_subtree_ids(child) & replacements.keys()):
                kids[id(child)] = visit(child)
        memo[id(cell)] = _clone_cell(cell, kids) if kids else cell
        return memo[id(cell)]

    return visit(network)


class SharedLayerError(ValueError):
    """Book-keeping was asked for a network whose weights are used by more than one layer call."""


class LossShapeError(ValueError):
    """The network does not return per-example losses of shape [B]."""


def _shown(names, k=5) -> str:
    return ", ".join(names[:k]) + (" ..." if len(names) > k else "")


def _zeros_like(inputs) -> list:
    """Zeros of the inputs' shapes and dtypes: set-up forwards never see the data."""
    return [ops.zeros(tuple(x.shape), x.dtype) for x in inputs]


def _check_losses(out, inputs) -> None:
    """The network's contract: per-example losses, shape [B] (not a mean, not a tuple)."""
    batch = int(inputs[0].shape[0])
    shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
    if shape != (batch,):
        raise LossShapeError(
            f"the network returned {shape} for a micro-batch of {batch} examples; DP-SGD clips each "
            f"example's gradient and needs the per-example losses, shape [{batch}] (e.g. "
            "ops.cross_entropy(..., reduction='none'), not a mean loss)")


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
    covered = set()
    for _, _, child, _ in _walk_replaceable(network):
        rule = _dense_rule(child)
        if rule is not None:
            covered.add(id(getattr(child, rule.weight)))
            if rule.bias is not None and getattr(child, rule.bias, None) is not None:
                covered.add(id(getattr(child, rule.bias)))
        elif _is_layernorm(child):
            covered.update({id(child.gamma), id(child.beta)})
        elif isinstance(child, (_ProbedDense, _ProbedLayerNorm)):
            covered.update(id(p) for p in child.get_parameters() if not p.name.startswith("_bk."))
    return [p.name for p in params if id(p) not in covered]


# --------------------------------------------------------------------------------------------
# Clip factors
# --------------------------------------------------------------------------------------------
def _clip_factors(norms, mask, clip):
    """``mask_i * min(1, C (1 - margin) / ||g_i||)``; ``clip`` may be +inf (no clipping)."""
    scale = clip * (1.0 - CLIP_MARGIN) / ops.maximum(norms, _TINY)
    return mask * ops.minimum(scale, ops.ones_like(scale))


# --------------------------------------------------------------------------------------------
# vmap route
# --------------------------------------------------------------------------------------------
class _SingleLoss(nn.Cell):
    """Loss of one example: the batched network applied to a batch of one."""

    def __init__(self, network):
        super().__init__(auto_prefix=False)
        self.network = network

    def construct(self, *inputs):
        batched = [ops.expand_dims(x, 0) for x in inputs]
        return self.network(*batched)[0]


class _VmapClipSum(nn.Cell):
    """Per-example gradients by vmap, clipped and summed.  With ``rows_per_unit = m`` the rows come
    unit-major (``finetune.dp.units``): each unit's ``m`` masked per-example gradients are summed
    first and the unit's gradient is clipped as one; its norm is reported on each of its real rows."""

    def __init__(self, network, params, geometry, n_inputs, rows_per_unit=None):
        super().__init__(auto_prefix=False)
        self.params = ms.ParameterTuple(params)
        self.single = _SingleLoss(network)
        grad = ms.value_and_grad(self.single, grad_position=None, weights=self.params)
        self.per_example = ops.vmap(grad, in_axes=tuple([0] * n_inputs))
        self.l1 = geometry == "l1"
        self.m = rows_per_unit

    def _norms(self, grads):
        total = None
        for g in grads:
            flat = g.reshape(g.shape[0], -1)
            part = ops.abs(flat).sum(1) if self.l1 else ops.square(flat).sum(1)
            total = part if total is None else total + part
        return total if self.l1 else ops.sqrt(total)

    def _units(self, grads, mask):
        """Segment sums of the masked per-example gradients over each unit's ``m`` rows."""
        out = []
        for g in grads:
            rows = g * mask.reshape((-1,) + (1,) * (g.ndim - 1))
            out.append(rows.reshape((g.shape[0] // self.m, self.m) + g.shape[1:]).sum(1))
        return tuple(out)

    def construct(self, inputs, mask, clip):
        losses, grads = self.per_example(*inputs)
        if self.m is not None:
            units = self._units(grads, mask)
            unit_mask = ops.minimum(mask.reshape(-1, self.m).sum(1), 1.0)   # 1 iff a real row
            unit_norms = self._norms(units)
            factors = _clip_factors(unit_norms, unit_mask, clip)
            out = []
            for g in units:
                shape = (-1,) + (1,) * (g.ndim - 1)
                out.append((g * factors.reshape(shape)).sum(0))
            row_norms = ops.broadcast_to(unit_norms.reshape(-1, 1), (unit_norms.shape[0], self.m))
            return tuple(out), losses * mask, row_norms.reshape(-1) * mask
        norms = self._norms(grads)
        factors = _clip_factors(norms, mask, clip)
        out = []
        for g in grads:
            shape = (-1,) + (1,) * (g.ndim - 1)
            out.append((g * factors.reshape(shape)).sum(0))
        return tuple(out), losses * mask, norms * mask


# --------------------------------------------------------------------------------------------
# book-keeping route
# --------------------------------------------------------------------------------------------
@dataclass
class _Slot:
    """Where one trainable parameter's gradient comes from.

    ``role``: ``weight`` (``sum_t g_t a_t^T``), ``bias``/``beta`` (``sum_t g_t``), ``gamma``
    (``sum_t g_t * xhat_t``), ``lora_A`` / ``lora_B`` (LoRA factors, Hu et al. 2021: with
    ``y = ... + s (x A^T) B^T``, ``dL/dB = s sum_t g_t (A x_t)^T`` and ``dL/dA = s sum_t (B^T g_t) x_t^T``).
    ``other``: the other LoRA factor; ``scale``: the LoRA scaling ``s``.

    Embeddings (full fine-tuning of a tapped model), with ``g_e`` the gradient at the summed input
    embedding ``x0 = wte[ids] + wpe[pos]`` (tap ``tap``) and ``g_o`` the gradient at the logits
    ``h wte^T`` (tap ``tap2``, saved input ``h``):
    ``wpe``: row ``t`` of example i's gradient is ``g_e,t`` (positions are distinct), so
    ``||G_i||^2 = sum_t ||g_e,t||^2``;
    ``wte`` (tied, counted once): ``G_i = E_i + O_i`` with the lookup part
    ``E_i = sum_t onehot(id_t) g_e,t^T`` and the head part ``O_i = sum_t g_o,t h_t^T``, so
    ``||G_i||^2 = ||E_i||^2 + ||O_i||^2 + 2 <E_i, O_i>`` with
    ``||E_i||^2 = sum_{t,t'} [id_t = id_t'] (g_e,t . g_e,t')``,
    ``||O_i||^2 = sum_{t,t'} (h_t . h_t')(g_o,t . g_o,t')`` (ghost norm) and the cross term
    ``<E_i, O_i> = sum_{t,t'} g_o,t'[id_t] (h_t' . g_e,t)``.
    """

    tap: int
    role: str
    other: Parameter | None = None
    scale: float = 1.0
    tap2: int = -1


def _use_ghost(slot, in_shapes, out_shapes, l1: bool) -> bool:
    """MixOpt (Bu et al. 2023): per layer, the cheaper of the ghost norm (two T x T Gram matrices
    per example: ~2 T^2 (d_in + d_out) flops) and the materialised per-example gradient
    (~2 T d_in d_out flops and d_in d_out floats per example).  The L1 norm needs the
    materialised gradient (no Gram identity for it)."""
    if l1:
        return False
    t = int(np.prod(in_shapes[slot.tap][1:-1])) if len(in_shapes[slot.tap]) > 2 else 1
    if slot.role == "wte":
        d_in, d_out = in_shapes[slot.tap][-1], int(slot.other.shape[0])
        return t * (d_in + d_out) < d_in * d_out
    if slot.role not in ("weight", "lora_A", "lora_B"):
        return False
    d_in, d_out = in_shapes[slot.tap][-1], out_shapes[slot.tap][-1]
    if slot.role == "lora_A":
        d_out = slot.other.shape[1]
    elif slot.role == "lora_B":
        d_in = slot.other.shape[0]
    return t * (d_in + d_out) < d_in * d_out


# Products with a transposed operand use the kernels' transpose flags: an explicit transpose is a
# copy, and MindSpore's CPU backend keeps a graph's intermediate buffers for the whole launch
# (measured, GPT-2 small full fine-tuning at batch 8: the core's extra memory 3.7 GB -> 1.7 GB for
# the Dense layers alone, and 5.1 s -> 3.4 s).
_gram = ops.BatchMatMul(transpose_b=True)        # [B, T, d] x [B, T', d] -> [B, T, T']
_outer_sum = ops.BatchMatMul(transpose_a=True)   # [B, T, m] x [B, T, n] -> [B, m, n] = sum_t r_t l_t^T
_matmul_tn = ops.MatMul(transpose_a=True)        # [N, m] x [N, n] -> [m, n]


def _token_sum(x):
    """[B, T, d] -> [B, d], the sum over tokens as a batched product with ones (a reduction over
    the middle axis is several times slower on this backend, and keeps a copy)."""
    ones = ops.ones((x.shape[0], 1, x.shape[1]), x.dtype)
    return ops.bmm(ones, x).reshape(x.shape[0], x.shape[2])


class _BookkeepingCore(nn.Cell):
    """Per-example norms and the clipped sum from tap output gradients ``gs`` and inputs ``acts``."""

    def __init__(self, slots, in_shapes, out_shapes, geometry):
        super().__init__(auto_prefix=False)
        self.roles = tuple(s.role for s in slots)
        self.taps = tuple(s.tap for s in slots)
        self.scales = tuple(float(s.scale) for s in slots)
        lora = [s.role in ("lora_A", "lora_B") for s in slots]
        others = [s.other for s, is_lora in zip(slots, lora) if is_lora]
        self.others = ms.ParameterTuple(others) if others else ()
        idx, k = [], 0
        for is_lora in lora:
            idx.append(k if is_lora else -1)
            k += is_lora
        self.other_idx = tuple(idx)
        self.taps2 = tuple(s.tap2 for s in slots)
        self.l1 = geometry == "l1"
        self.ghost = tuple(_use_ghost(s, in_shapes, out_shapes, self.l1) for s in slots)
        # taps whose saved input is the token ids (kept [B, T], not reshaped to [B, T, d])
        ids_taps = {s.tap2 - 1 for s in slots if s.role == "wte"}
        self.ids_tap = tuple(i in ids_taps for i in range(len(in_shapes)))
        self.rows = tuple(int(s.other.shape[0]) if s.role in ("wte", "wpe") else 0 for s in slots)
        self.empty = Tensor(np.zeros((1, 1), np.float32))

    @staticmethod
    def _tokens(x):
        """[B, ..., d] -> [B, T, d] (no reshape when already so: every op here is a buffer)."""
        if x.ndim == 3:
            return x
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def _outer(self, i, g, a):
        """(R, L) with per-example gradient sum_t R_t L_t^T."""
        role = self.roles[i]
        if role == "lora_B":
            return g * self.scales[i], ops.dense(a, self.others[self.other_idx[i]])
        if role == "lora_A":
            return ops.matmul(g, self.others[self.other_idx[i]]) * self.scales[i], a
        return g, a

    def _part(self, x):
        flat = x.reshape(x.shape[0], -1)
        return ops.abs(flat).sum(1) if self.l1 else ops.square(flat).sum(1)

    def _embedding_parts(self, i, gs, acts):
        """(g_e, g_o, h, ids) of the tied embedding slot ``i`` (see :class:`_Slot`)."""
        t2 = self.taps2[i]
        return gs[self.taps[i]], gs[t2], acts[t2], acts[t2 - 1]

    def _wte_square_norm(self, i, gs, acts):
        g_e, g_o, h, ids = self._embedding_parts(i, gs, acts)
        if not self.ghost[i]:  # materialised per-example gradient [B, V, d] (small vocabularies, l1)
            return self._part(self._wte_per_example(i, g_e, g_o, h, ids))
        same = ops.equal(ops.expand_dims(ids, 2), ops.expand_dims(ids, 1)).astype(g_e.dtype)
        lookup = (same * _gram(g_e, g_e)).sum((1, 2))
        head = (_gram(h, h) * _gram(g_o, g_o)).sum((1, 2))
        # m[b, t', t] = g_o[b, t', ids[b, t]]
        index = ops.broadcast_to(ops.expand_dims(ids, 1), (ids.shape[0], ids.shape[1], ids.shape[1]))
        m = ops.gather_elements(g_o, 2, index)
        cross = (m * _gram(h, g_e)).sum((1, 2))
        return lookup + head + 2.0 * cross

    def _wte_per_example(self, i, g_e, g_o, h, ids):
        onehot = ops.one_hot(ids, self.rows[i], Tensor(1.0, g_e.dtype), Tensor(0.0, g_e.dtype))
        return _outer_sum(g_o, h) + _outer_sum(onehot, g_e)

    def _wte_clipped_sum(self, i, gs, acts, factors):
        g_e, g_o, h, ids = self._embedding_parts(i, gs, acts)
        d = g_e.shape[-1]
        lookup = ops.unsorted_segment_sum((g_e * factors).reshape(-1, d), ids.reshape(-1), self.rows[i])
        head = _matmul_tn(g_o.reshape(-1, g_o.shape[-1]), (h * factors).reshape(-1, d))
        return lookup + head

    def _wpe_clipped_sum(self, i, g_e, row):
        part = ops.matmul(row, g_e.reshape(g_e.shape[0], -1)).reshape(g_e.shape[1:])  # [T, d]
        if self.rows[i] == part.shape[0]:
            return part
        pad = ops.zeros((self.rows[i] - part.shape[0], part.shape[1]), part.dtype)
        return ops.concat((part, pad), 0)

    def prepare(self, probe_grads, saved):
        """Tap output gradients and inputs as [B, T, d] (token ids stay [B, T]), and the
        per-example gradients of the vector parameters (bias, LayerNorm gain and shift) as [B, d],
        computed once for both the norms and the clipped sum."""
        gs = [self._tokens(g) for g in probe_grads]
        acts = []
        for k in range(len(saved)):
            acts.append(saved[k] if self.ids_tap[k] else self._tokens(saved[k]))
        vectors = []
        for i in range(len(self.roles)):
            role, g = self.roles[i], gs[self.taps[i]]
            if role == "gamma":
                vectors.append(_token_sum(g * acts[self.taps[i]]))
            elif role in ("bias", "beta"):
                vectors.append(_token_sum(g))
            else:
                vectors.append(self.empty)
        return gs, acts, vectors

    def norms(self, gs, acts, vectors, mask):
        """Per-example norms in the clipping geometry, from the prepared taps."""
        total = ops.zeros_like(mask)
        for i in range(len(self.roles)):
            role, g, a = self.roles[i], gs[self.taps[i]], acts[self.taps[i]]
            if role == "wte":
                total = total + self._wte_square_norm(i, gs, acts)
            elif role == "wpe":
                total = total + self._part(g)
            elif role in ("weight", "lora_A", "lora_B"):
                r, l = self._outer(i, g, a)
                if self.ghost[i]:
                    total = total + (_gram(l, l) * _gram(r, r)).sum((1, 2))
                else:
                    total = total + self._part(_outer_sum(r, l))
            else:
                total = total + self._part(vectors[i])
        return total if self.l1 else ops.sqrt(ops.maximum(total, ops.zeros_like(total)))

    def sums(self, gs, acts, vectors, factors):
        """``sum_i c_i G_i`` per parameter (``factors`` [B])."""
        out = []
        per_token = factors.reshape(-1, 1, 1)
        row = factors.reshape(1, -1)
        for i in range(len(self.roles)):
            role, g, a = self.roles[i], gs[self.taps[i]], acts[self.taps[i]]
            if role == "wte":
                out.append(self._wte_clipped_sum(i, gs, acts, per_token))
            elif role == "wpe":
                out.append(self._wpe_clipped_sum(i, g, row))
            elif role in ("weight", "lora_A", "lora_B"):
                r, l = self._outer(i, g, a)
                if r.shape[-1] <= l.shape[-1]:  # scale the narrower factor (same sum, less work)
                    r = r * per_token
                else:
                    l = l * per_token
                out.append(_matmul_tn(r.reshape(-1, r.shape[-1]), l.reshape(-1, l.shape[-1])))
            else:
                out.append(ops.matmul(row, vectors[i]).reshape(-1))
        return tuple(out)

    def construct(self, probe_grads, saved, mask, clip):
        gs, acts, vectors = self.prepare(probe_grads, saved)
        norms = self.norms(gs, acts, vectors, mask)
        factors = _clip_factors(norms, mask, clip)
        return self.sums(gs, acts, vectors, factors), norms


class _MaskedSum(nn.Cell):
    def __init__(self, network):
        super().__init__(auto_prefix=False)
        self.network = network

    def construct(self, inputs, mask):
        losses = self.network(*inputs)
        return (losses * mask).sum(), losses


class _ProbedClipSum(nn.Cell):
    """Book-keeping front-end for plain Cells: probe/activation Parameters installed in the model."""

    def __init__(self, network, layers, slots, geometry):
        super().__init__(auto_prefix=False)
        self.probes = ms.ParameterTuple([layer.probe for layer in layers])
        self.acts = ms.ParameterTuple([layer.act for layer in layers])
        self.masked = _MaskedSum(network)
        self.grad = ms.value_and_grad(self.masked, grad_position=None, weights=self.probes,
                                      has_aux=True)
        outs = [layer.out_shape if isinstance(layer, _ProbedDense) else layer.in_shape
                for layer in layers]
        self.core = _BookkeepingCore(slots, [layer.in_shape for layer in layers], outs, geometry)

    def construct(self, inputs, mask, clip):
        (_, losses), probe_grads = self.grad(inputs, mask)
        grads, norms = self.core(probe_grads, self.acts, mask, clip)
        return grads, losses * mask, norms


def _needed_saved(slots, n_saved: int) -> tuple:
    """Which saved tap inputs book-keeping reads: a weight, LoRA factor or LayerNorm gain needs its
    tap's input, the tied embedding its ids and head input; a bias (or LayerNorm shift, or the
    position embedding) needs only the output gradient.  BiTFiT therefore keeps no activation."""
    need = [False] * n_saved
    for s in slots:
        if s.role in ("weight", "lora_A", "lora_B", "gamma"):
            need[s.tap] = True
        elif s.role == "wte":
            need[s.tap2] = need[s.tap2 - 1] = True
    return tuple(need)


class _TapLoss(nn.Cell):
    """The masked loss sum of a tapped model, returning only the saved inputs in ``need`` (a
    placeholder of one element elsewhere): an unread activation returned from the graph would be
    kept alive to the end of the step (for BiTFiT, every layer's input)."""

    def __init__(self, model, need=None):
        super().__init__(auto_prefix=False)
        self.model = model
        self.need = tuple(need) if need is not None else None
        self.empty = Tensor(np.zeros((1,), np.float32))

    def construct(self, inputs, mask, *probes):
        losses, saved = self.model.loss(*inputs, probes)
        if self.need is None:
            return (losses * mask).sum(), losses, saved
        kept = ()
        for k in range(len(saved)):
            if self.need[k]:
                kept = kept + (saved[k],)
            else:
                kept = kept + (self.empty,)
        return (losses * mask).sum(), losses, kept


class _TappedClipSum(nn.Cell):
    """Book-keeping front-end for models exposing taps (``finetune.models.gpt2`` protocol):
    ``model.loss(*inputs, probes) -> (losses, saved)`` with one probe per tap."""

    def __init__(self, model, slots, in_shapes, out_shapes, geometry):
        super().__init__(auto_prefix=False)
        self.tap_loss = _TapLoss(model, _needed_saved(slots, len(in_shapes)))
        # The probes are separate positional inputs: PyNative mode returns no gradient for a
        # tuple-valued input (graph mode does), so differentiate w.r.t. each position.
        positions = tuple(range(2, 2 + len(in_shapes)))
        self.single = len(positions) == 1
        self.grad = ms.value_and_grad(self.tap_loss, grad_position=positions, has_aux=True)
        self.core = _BookkeepingCore(slots, in_shapes, out_shapes, geometry)

    def construct(self, inputs, probes, mask, clip):
        (_, losses, saved), probe_grads = self.grad(inputs, mask, *probes)
        if self.single:
            probe_grads = (probe_grads,)
        grads, norms = self.core(probe_grads, saved, mask, clip)
        return grads, losses * mask, norms


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------
def _is_tapped(network) -> bool:
    """The ``finetune.models.gpt2`` book-keeping protocol: ``taps()``, ``loss(*inputs[, probes])``."""
    return callable(getattr(network, "taps", None)) and callable(getattr(network, "loss", None))


def _tap_roles(tap):
    """[(parameter, role, other, scale)] for one tap of a tapped model."""
    if hasattr(tap, "lora_A") and hasattr(tap, "lora_B"):
        if getattr(tap, "merged", False):
            raise ValueError("LoRA layers are merged; unmerge them before training")
        s = float(tap.scaling)
        return [(tap.weight, "weight", None, 1.0), (tap.bias, "bias", None, 1.0),
                (tap.lora_A, "lora_A", tap.lora_B, s), (tap.lora_B, "lora_B", tap.lora_A, s)]
    if callable(getattr(tap, "normalise", None)):
        return [(tap.weight, "gamma", None, 1.0), (tap.bias, "beta", None, 1.0)]
    return [(tap.weight, "weight", None, 1.0), (getattr(tap, "bias", None), "bias", None, 1.0)]


def _embeddings(network) -> tuple:
    """(token, position) embedding Parameters of a tapped model that probes them, else ()."""
    if callable(getattr(network, "embeddings", None)) and callable(
            getattr(network, "embedding_probe_shapes", None)):
        return tuple(network.embeddings())
    return ()


class _LossOf(nn.Cell):
    """``model.loss`` as a Cell (tapped models return logits from ``construct``)."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, *inputs):
        return self.model.loss(*inputs)


class PerExampleGradients:
    """Clipped sums of per-example gradients.

    ``network``: either a Cell whose ``construct(*inputs)`` takes a batch (leading axis = examples)
    and returns the per-example losses [B], or a tapped model (``finetune.models.gpt2.GPT2LMHeadModel``:
    ``loss(*inputs)`` gives the per-example losses, ``taps()`` the book-keeping layers).
    ``params``: the trainable parameters, in the order the gradients are returned (default
    ``network.trainable_params()``).  ``geometry``: ``"l2"`` or ``"l1"``.  ``method``: ``"auto"``,
    ``"vmap"`` or ``"bookkeeping"``.

    :meth:`clipped_sum` takes inputs of one fixed micro-batch shape, a 0/1 mask (padding rows 0)
    and the clipping norm (``inf``: no clipping).  For plain Cells book-keeping runs an
    engine-owned structural copy of ``network`` (same Parameter objects, probed layers swapped in);
    ``network`` itself is never modified and its checkpoint holds only its own Parameters.
    """

    def __init__(self, network: nn.Cell, params: Sequence[Parameter] | None = None,
                 geometry: str = "l2", method: str = "auto", rows_per_unit: int | None = None):
        if rows_per_unit is not None:
            if isinstance(rows_per_unit, bool) or int(rows_per_unit) != rows_per_unit or rows_per_unit < 1:
                raise ValueError(f"rows_per_unit must be a positive integer, got {rows_per_unit!r}")
            if method == "bookkeeping":
                raise ValueError("unit-level clipping (rows_per_unit) runs on vmap here; use "
                                 "method='vmap' or 'auto'")
            rows_per_unit = int(rows_per_unit)
        self.rows_per_unit = rows_per_unit
        if geometry not in GEOMETRIES:
            raise ValueError(f"per-example clipping needs geometry 'l1' or 'l2', got {geometry!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.network = network
        self.params = list(params) if params is not None else list(network.trainable_params())
        if not self.params:
            raise ValueError("no trainable parameters: nothing to differentiate")
        self.param_names = [p.name for p in self.params]
        self.geometry = geometry
        self.tapped = _is_tapped(network)
        self.loss_network = _LossOf(network) if self.tapped else network
        self.requested = method
        self.method, self.method_reason = self._choose(method)
        self._cell = None
        self._shapes = None
        self._probes = None

    def _choose(self, method):
        """(method, reason): book-keeping only where it is exact, else vmap (never silently)."""
        if method == "vmap":
            return "vmap", "vmap: requested"
        if self.rows_per_unit is not None:
            return "vmap", (f"vmap: unit-level clipping, the summed gradient of each unit's "
                            f"{self.rows_per_unit} rows clipped as one")
        uncovered = self.uncovered()
        shared = [] if self.tapped else _shared_parameters(self.network, self.params)
        if method == "bookkeeping":
            if uncovered:
                raise ValueError("book-keeping covers Dense/Linear, LoRA, LayerNorm and (GPT-2) embedding "
                                 f"parameters only; not covered: {_shown(uncovered)} (use method='vmap')")
            if shared:
                raise SharedLayerError(f"book-keeping is not exact for shared weights: {_shown(shared)} "
                                       "held by more than one layer (use method='vmap')")
            return "bookkeeping", "book-keeping: requested"
        if uncovered:
            return "vmap", f"vmap: book-keeping does not cover {_shown(uncovered)}"
        if shared:
            return "vmap", f"vmap: shared weights ({_shown(shared)} held by more than one layer)"
        if self.tapped:
            return "bookkeeping", "book-keeping: every trained parameter sits in a tap of the model"
        return "bookkeeping", ("book-keeping: every trained parameter sits in a covered layer "
                               "(one not run exactly once per forward switches the run to vmap)")

    def uncovered(self) -> list[str]:
        """Names of trainable parameters book-keeping cannot handle."""
        if not self.tapped:
            return bookkeeping_coverage(self.network, self.params)
        covered = {id(p) for tap in self.network.taps() for p, *_ in _tap_roles(tap) if p is not None}
        covered.update(id(p) for p in _embeddings(self.network))
        return [p.name for p in self.params if id(p) not in covered]

    # ---- set-up ---------------------------------------------------------------------------
    def _covered_layers(self):
        """[(path, layer, [(parameter, role)], probed-layer factory)] of the covered layers holding a
        trained parameter, each layer once (a cell reachable by two paths is one layer)."""
        ids = {id(p) for p in self.params}
        seen, out = set(), []
        for _, _, child, path in list(_walk_replaceable(self.network)):
            if id(child) in seen:
                continue
            rule = _dense_rule(child)
            if rule is not None:
                w = getattr(child, rule.weight)
                b = getattr(child, rule.bias) if rule.bias is not None else None
                roles = [(w, "weight"), (b, "bias")]
                make = (lambda w, b, t: lambda i, o: _ProbedDense(w, b, t, i, o))(w, b, path)
            elif _is_layernorm(child):
                roles = [(child.gamma, "gamma"), (child.beta, "beta")]
                make = (lambda c, t: lambda i, o: _ProbedLayerNorm(c.gamma, c.beta, c.epsilon, t, i))(
                    child, path)
            else:
                continue
            wanted = [(p, kind) for p, kind in roles if p is not None and id(p) in ids]
            if wanted:  # a frozen layer is left alone
                seen.add(id(child))
                out.append((path, child, wanted, make))
        return out

    def _install_probes(self, example_inputs):
        """The book-keeping cell for a plain Cell, or the names of covered layers that do not run
        exactly once per forward (book-keeping keeps one input per layer: not exact for those).

        One set-up forward on zeros of the micro-batch's shapes and dtypes (no data), in the
        current execution mode (the global mode is never switched), through an engine-owned copy
        whose covered layers record their calls' shapes; it also checks the loss contract."""
        layers = self._covered_layers()
        recorders = {id(child): _Recorder(child) for _, child, _, _ in layers}
        out = _shadow_network(self.network, recorders)(*_zeros_like(example_inputs))
        _check_losses(out, example_inputs)
        calls = [recorders[id(child)].calls for _, child, _, _ in layers]
        reused = [f"{path} ({len(c)} calls)" for (path, *_), c in zip(layers, calls) if len(c) != 1]
        if reused:
            return reused
        ids = {id(p): k for k, p in enumerate(self.params)}
        slots, probed, replacements = [None] * len(self.params), [], {}
        for (_, child, wanted, make), ((in_shape, out_shape),) in zip(layers, calls):
            for p, kind in wanted:
                slots[ids[id(p)]] = _Slot(len(probed), kind)
            replacements[id(child)] = make(in_shape, out_shape)
            probed.append(replacements[id(child)])
        # The probed layers go into an engine-owned copy of the network; the user's Cell is never
        # modified (docs/privacy.md: nothing data-derived in the user's objects).
        shadow = _shadow_network(self.network, replacements)
        return _ProbedClipSum(shadow, probed, slots, self.geometry)

    def _tapped_cell(self, inputs):
        ids = {id(p): k for k, p in enumerate(self.params)}
        taps = list(self.network.taps())
        slots = [None] * len(self.params)
        batch, seq = inputs[0].shape[:2]
        out_shapes = [tuple(s) for s in self.network.probe_shapes(batch, seq)]
        in_shapes, probe_shapes = [], []
        for t, tap in enumerate(taps):
            n_in = getattr(tap, "n_in", out_shapes[t][-1])
            in_shapes.append(out_shapes[t][:-1] + (n_in,))
            roles = set()
            for p, role, other, scale in _tap_roles(tap):
                if p is not None and id(p) in ids:
                    slots[ids[id(p)]] = _Slot(t, role, other, scale)
                    roles.add(role)
            # A probe broadcast over the tokens has gradient sum_t g_t: that is all a bias needs,
            # and the reduction happens inside the backward pass.  Taps without trainable
            # parameters get a probe of one element.
            shape = out_shapes[t]
            if not roles:
                shape = (1,) * len(shape)
            elif roles <= {"bias", "beta"}:
                shape = (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],)
            probe_shapes.append(shape)
        embeddings = _embeddings(self.network)
        if any(id(p) in ids for p in embeddings):
            # two more probes: the summed input embedding (tap n) and the logits (tap n + 1);
            # saved gains (input_ids, h): saved[n] is the ids, saved[n + 1] the head input h
            n = len(taps)
            e_shape, o_shape = (tuple(s) for s in self.network.embedding_probe_shapes(batch, seq))
            in_shapes += [e_shape, e_shape]
            out_shapes = out_shapes + [e_shape, o_shape]
            wte, wpe = embeddings
            if id(wte) in ids:
                slots[ids[id(wte)]] = _Slot(n, "wte", wte, 1.0, tap2=n + 1)
            if id(wpe) in ids:
                slots[ids[id(wpe)]] = _Slot(n, "wpe", wpe, 1.0)
            probe_shapes += [e_shape, o_shape if id(wte) in ids else (1,) * len(o_shape)]
        self._probes = ms.mutable(tuple(ops.zeros(s, ms.float32) for s in probe_shapes))
        return _TappedClipSum(self.network, slots, in_shapes, out_shapes, self.geometry)

    def _build(self, inputs):
        shapes = tuple(tuple(x.shape) for x in inputs)
        if self._cell is not None:
            if shapes != self._shapes:
                raise ValueError(f"micro-batch shapes changed from {self._shapes} to {shapes}; "
                                 "pad every micro-batch to one shape (finetune.dp.sampling)")
            return
        self._shapes = shapes
        if self.rows_per_unit is not None and shapes[0][0] % self.rows_per_unit:
            raise ValueError(f"a micro-batch of {shapes[0][0]} rows is not whole units of "
                             f"{self.rows_per_unit} rows (finetune.dp.units.unit_micro_batches)")
        if self.method == "bookkeeping" and self.tapped:
            self._cell = self._tapped_cell(inputs)
            return
        if self.method == "bookkeeping":
            cell = self._install_probes(inputs)
            if not isinstance(cell, list):
                self._cell = cell
                return
            why = (f"layers not run exactly once per forward (shared or unused): {_shown(cell)}; "
                   "book-keeping keeps one input per layer and is exact only for a layer run once")
            if self.requested == "bookkeeping":
                raise SharedLayerError(f"{why} (use method='vmap')")
            self.method, self.method_reason = "vmap", f"vmap: {why}"
            warnings.warn(f"per-example gradients: {self.method_reason}", stacklevel=3)
        elif not self.tapped:
            _check_losses(self.network(*_zeros_like(inputs)), inputs)
        self._cell = _VmapClipSum(self.loss_network, self.params, self.geometry, len(inputs),
                                  self.rows_per_unit)

    # ---- use --------------------------------------------------------------------------------
    def clipped_sum(self, inputs: Sequence, mask, clip: float):
        """Return (clipped sum per parameter as float32 Tensors, per-example losses, norms).

        Losses and norms of padding rows are 0.
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
        self.loss_network = _LossOf(network) if _is_tapped(network) else network
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
        self.masked = _MaskedSum(network)
        self.params = ms.ParameterTuple(params)
        self.grad = ms.value_and_grad(self.masked, grad_position=None, weights=self.params,
                                      has_aux=True)

    def construct(self, inputs, mask):
        (_, losses), grads = self.grad(inputs, mask)
        return grads, losses * mask, ops.zeros_like(mask)
