"""The book-keeping core (Bu, Wang, Zha, Karypis, "Differentially private optimization on large
model at small cost", ICML 2023): per-example norms and the clipped sum from each tap's output
gradient and saved input, dispatched to the layer rules in :mod:`.rules`.  No per-example gradient
of a whole model is ever materialised.

The output gradients ``g`` are obtained (in both modes; hooks are ignored in graph mode) by adding a
zero "probe" to each tapped layer output and differentiating the summed masked loss with respect
to the probes; the layer inputs are kept during the forward pass.

Units (person-level DP, ``rows_per_unit = m``): the micro-batch is unit-major (the ``m`` rows of a
unit contiguous, padding rows masked 0).  A unit's gradient is ``G_u = sum_{i in u} G_i = R_u^T A_u``
with ``A_u``, ``R_u`` the unit's rows stacked along the token axis, so every "sum over tokens" rule
(linear weight, LoRA, bias, norm gain and shift, token lookup, tied embedding) applies unchanged to
the taps reshaped to [U, m T, d]; the position embedding sums its rows over the unit before
squaring (:func:`.rules.embedding.position_unit`).  The ghost/materialise choice uses ``m T``.
"""
from __future__ import annotations

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops

from .common import MaskedSum, clip_factors, part, unit_mask
from .rules import dense, embedding, layernorm

_VECTOR_ROLES = ("bias", "beta", "gamma")


def _use_ghost(slot, in_shapes, out_shapes, l1: bool, rows_per_unit: int = 1) -> bool:
    """MixOpt (Bu et al. 2023): per layer, the cheaper of the ghost norm (two T x T Gram matrices
    per example: ~2 T^2 (d_in + d_out) flops) and the materialised per-example gradient
    (~2 T d_in d_out flops and d_in d_out floats per example), with ``T -> m T`` for units of
    ``m`` rows.  The L1 norm needs the materialised gradient (no Gram identity for it)."""
    if l1:
        return False
    if slot.role in ("wte", "embedding"):  # the tap's output is the looked-up rows [B, T, d]
        t = int(np.prod(out_shapes[slot.tap][1:-1])) * int(rows_per_unit)
        d_in, d_out = out_shapes[slot.tap][-1], int(slot.other.shape[0])
        return t * (d_in + d_out) < d_in * d_out
    t = int(np.prod(in_shapes[slot.tap][1:-1])) if len(in_shapes[slot.tap]) > 2 else 1
    t *= int(rows_per_unit)
    if slot.role not in dense.ROLES:
        return False
    d_in, d_out = dense.dims(slot.role, in_shapes[slot.tap][-1], out_shapes[slot.tap][-1], slot.other)
    return t * (d_in + d_out) < d_in * d_out


class BookkeepingCore(nn.Cell):
    """Per-unit norms and the clipped sum from tap output gradients ``gs`` and inputs ``acts``."""

    def __init__(self, slots, in_shapes, out_shapes, geometry, rows_per_unit: int = 1):
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
        self.m = int(rows_per_unit)
        self.ghost = tuple(_use_ghost(s, in_shapes, out_shapes, self.l1, self.m) for s in slots)
        # taps whose saved input is the token ids (kept [B, T], not reshaped to [B, T, d])
        ids_taps = {s.tap for s in slots if s.role in ("wte", "embedding")}
        self.ids_tap = tuple(i in ids_taps for i in range(len(in_shapes)))
        self.rows = tuple(int(s.other.shape[0]) if s.role in ("wte", "wpe", "embedding") else 0
                          for s in slots)
        self.empty = Tensor(np.zeros((1, 1), np.float32))

    def _tokens(self, x):
        """[B, ..., d] -> [U, m T, d] (no reshape when already so: every op here is a buffer)."""
        if (self.m == 1 and x.ndim == 3) or x.shape[0] < self.m:  # (placeholders of unread taps)
            return x
        return x.reshape(x.shape[0] // self.m, -1, x.shape[-1])

    def _ids(self, x):
        """[B, ...] token ids -> [U, m T]."""
        if (self.m == 1 and x.ndim == 2) or x.shape[0] < self.m:
            return x
        return x.reshape(x.shape[0] // self.m, -1)

    def _other(self, i):
        return self.others[self.other_idx[i]] if self.other_idx[i] >= 0 else None

    def prepare(self, probe_grads, saved):
        """Tap output gradients and inputs as [U, m T, d] (token ids [U, m T]), and the per-unit
        gradients of the vector parameters (bias, norm gain and shift) as [U, d] (and of the
        position embedding, for units, as [U, T, d]), computed once for the norms and the sum."""
        gs = [self._tokens(g) for g in probe_grads]
        acts = []
        for k in range(len(saved)):
            acts.append(self._ids(saved[k]) if self.ids_tap[k] else self._tokens(saved[k]))
        vectors = []
        for i in range(len(self.roles)):
            role, g = self.roles[i], gs[self.taps[i]]
            if role == "gamma":
                vectors.append(layernorm.gain(g, acts[self.taps[i]]))
            elif role in ("bias", "beta"):
                vectors.append(dense.vector(g))
            elif role == "wpe" and self.m > 1:
                vectors.append(embedding.position_unit(g, self.m))
            else:
                vectors.append(self.empty)
        return gs, acts, vectors

    def norms(self, gs, acts, vectors, mask):
        """Per-unit norms in the clipping geometry, from the prepared taps."""
        total = ops.zeros_like(mask)
        for i in range(len(self.roles)):
            role, g, a = self.roles[i], gs[self.taps[i]], acts[self.taps[i]]
            if role == "wte":
                g_o, h = gs[self.taps2[i]], acts[self.taps2[i]]
                if self.ghost[i]:
                    total = total + embedding.tied_square_norm(g, g_o, h, a)
                else:  # materialised per-example gradient [B, V, d] (small vocabularies, l1)
                    total = total + part(embedding.tied_per_example(g, g_o, h, a, self.rows[i]), self.l1)
            elif role == "embedding":
                if self.ghost[i]:
                    total = total + embedding.lookup_square_norm(g, a)
                else:
                    total = total + part(embedding.lookup_per_example(g, a, self.rows[i]), self.l1)
            elif role == "wpe":
                total = total + part(vectors[i] if self.m > 1 else g, self.l1)
            elif role in dense.ROLES:
                r, l = dense.factors(role, g, a, self._other(i), self.scales[i])
                total = total + dense.square_norm(r, l, self.ghost[i], self.l1)
            else:
                total = total + part(vectors[i], self.l1)
        return total if self.l1 else ops.sqrt(ops.maximum(total, ops.zeros_like(total)))

    def sums(self, gs, acts, vectors, factors):
        """``sum_u c_u G_u`` per parameter (``factors`` [U])."""
        out = []
        per_token = factors.reshape(-1, 1, 1)
        row = factors.reshape(1, -1)
        for i in range(len(self.roles)):
            role, g, a = self.roles[i], gs[self.taps[i]], acts[self.taps[i]]
            if role == "wte":
                g_o, h = gs[self.taps2[i]], acts[self.taps2[i]]
                out.append(embedding.tied_clipped_sum(g, g_o, h, a, per_token, self.rows[i]))
            elif role == "embedding":
                out.append(embedding.lookup_clipped_sum(g, a, per_token, self.rows[i]))
            elif role == "wpe":
                out.append(embedding.position_clipped_sum(vectors[i] if self.m > 1 else g, row, self.rows[i]))
            elif role in dense.ROLES:
                r, l = dense.factors(role, g, a, self._other(i), self.scales[i])
                out.append(dense.clipped_sum(r, l, per_token))
            else:
                out.append(ops.matmul(row, vectors[i]).reshape(-1))
        return tuple(out)

    def construct(self, probe_grads, saved, mask, clip):
        units = unit_mask(mask, self.m)
        gs, acts, vectors = self.prepare(probe_grads, saved)
        norms = self.norms(gs, acts, vectors, units)
        factors = clip_factors(norms, units, clip)
        return self.sums(gs, acts, vectors, factors), norms


class ProbedClipSum(nn.Cell):
    """Book-keeping front-end for plain Cells: probe/activation Parameters of the probed layers in
    the engine's copy of the network (:mod:`.shadow`)."""

    def __init__(self, network, layers, slots, geometry, rows_per_unit: int = 1):
        super().__init__(auto_prefix=False)
        self.probes = ms.ParameterTuple([layer.probe for layer in layers])
        self.acts = ms.ParameterTuple([layer.act for layer in layers])
        self.masked = MaskedSum(network)
        self.grad = ms.value_and_grad(self.masked, grad_position=None, weights=self.probes,
                                      has_aux=True)
        self.core = BookkeepingCore(slots, [layer.in_shape for layer in layers],
                                    [layer.out_shape for layer in layers], geometry, rows_per_unit)

    def construct(self, inputs, mask, clip):
        (_, losses), probe_grads = self.grad(inputs, mask)
        grads, norms = self.core(probe_grads, self.acts, mask, clip)
        return grads, losses * mask, norms


def needed_saved(slots, n_saved: int) -> tuple:
    """Which saved tap inputs book-keeping reads: a weight, LoRA factor or norm gain needs its
    tap's input, an embedding its ids (and, tied, the head input); a bias (or LayerNorm shift, or
    the position embedding) needs only the output gradient.  BiTFiT therefore keeps no activation."""
    need = [False] * n_saved
    for s in slots:
        if s.role in dense.ROLES + ("gamma", "embedding"):
            need[s.tap] = True
        elif s.role == "wte":
            need[s.tap2] = need[s.tap] = True
    return tuple(need)


class TapLoss(nn.Cell):
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


class TappedClipSum(nn.Cell):
    """Book-keeping front-end for tapped models (:mod:`.taps`): ``model.loss(*inputs, probes) ->
    (losses, saved)`` with one probe per tap."""

    def __init__(self, model, slots, in_shapes, out_shapes, geometry, rows_per_unit: int = 1):
        super().__init__(auto_prefix=False)
        self.tap_loss = TapLoss(model, needed_saved(slots, len(in_shapes)))
        # The probes are separate positional inputs: PyNative mode returns no gradient for a
        # tuple-valued input (graph mode does), so differentiate w.r.t. each position.
        positions = tuple(range(2, 2 + len(in_shapes)))
        self.single = len(positions) == 1
        self.grad = ms.value_and_grad(self.tap_loss, grad_position=positions, has_aux=True)
        self.core = BookkeepingCore(slots, in_shapes, out_shapes, geometry, rows_per_unit)

    def construct(self, inputs, probes, mask, clip):
        (_, losses, saved), probe_grads = self.grad(inputs, mask, *probes)
        if self.single:
            probe_grads = (probe_grads,)
        grads, norms = self.core(probe_grads, saved, mask, clip)
        return grads, losses * mask, norms
