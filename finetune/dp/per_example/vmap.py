"""The vmap route: ``ops.vmap(ms.value_and_grad(loss_of_one_example))`` materialises every
example's gradient (memory: batch x trainable parameters) and works for any trainable parameter.

Units of ``m`` rows (person-level DP, rows of a unit contiguous): the masked per-row gradients are
summed per unit before the norms, so the clipped quantity is each unit's summed gradient."""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from .common import clip_factors, unit_mask


class SingleLoss(nn.Cell):
    """Loss of one example: the batched network applied to a batch of one."""

    def __init__(self, network):
        super().__init__(auto_prefix=False)
        self.network = network

    def construct(self, *inputs):
        batched = [ops.expand_dims(x, 0) for x in inputs]
        return self.network(*batched)[0]


class VmapClipSum(nn.Cell):
    def __init__(self, network, params, geometry, n_inputs, rows_per_unit: int = 1):
        super().__init__(auto_prefix=False)
        self.params = ms.ParameterTuple(params)
        self.single = SingleLoss(network)
        grad = ms.value_and_grad(self.single, grad_position=None, weights=self.params)
        self.per_example = ops.vmap(grad, in_axes=tuple([0] * n_inputs))
        self.l1 = geometry == "l1"
        self.m = int(rows_per_unit)

    def _norms(self, grads):
        total = None
        for g in grads:
            flat = g.reshape(g.shape[0], -1)
            part = ops.abs(flat).sum(1) if self.l1 else ops.square(flat).sum(1)
            total = part if total is None else total + part
        return total if self.l1 else ops.sqrt(total)

    def _units(self, grads, mask):
        """Per-row gradients [U m, ...] -> per-unit sums [U, ...] of the real rows."""
        out = ()
        for g in grads:
            rows = g * mask.reshape((-1,) + (1,) * (g.ndim - 1))
            out = out + (rows.reshape((-1, self.m) + g.shape[1:]).sum(1),)
        return out

    def construct(self, inputs, mask, clip):
        losses, grads = self.per_example(*inputs)
        if self.m > 1:
            grads = self._units(grads, mask)
        norms = self._norms(grads)
        units = unit_mask(mask, self.m)
        factors = clip_factors(norms, units, clip)
        out = []
        for g in grads:
            shape = (-1,) + (1,) * (g.ndim - 1)
            out.append((g * factors.reshape(shape)).sum(0))
        return tuple(out), losses * mask, norms * units
