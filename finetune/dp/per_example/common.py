"""Shared pieces of the per-example package: constants, errors, the clip factor, the set-up checks
and the batched products every book-keeping rule uses."""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops

CLIP_MARGIN = 1e-4
GEOMETRIES = ("l1", "l2")
METHODS = ("auto", "vmap", "bookkeeping")
_TINY = 1e-30


class BookkeepingError(ValueError):
    """Book-keeping was asked for a network it cannot treat exactly (a layer no rule covers)."""


class SharedLayerError(BookkeepingError):
    """Book-keeping was asked for a network whose weights are used by more than one layer call."""


class LossShapeError(ValueError):
    """The network does not return per-example losses of shape [B]."""


def shown(names, k=5) -> str:
    return ", ".join(names[:k]) + (" ..." if len(names) > k else "")


def zeros_like(inputs) -> list:
    """Zeros of the inputs' shapes and dtypes: set-up forwards never see the data."""
    return [ops.zeros(tuple(x.shape), x.dtype) for x in inputs]


def check_losses(out, inputs) -> None:
    """The network's contract: per-example losses, shape [B] (not a mean, not a tuple)."""
    batch = int(inputs[0].shape[0])
    shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
    if shape != (batch,):
        raise LossShapeError(
            f"the network returned {shape} for a micro-batch of {batch} examples; DP-SGD clips each "
            f"example's gradient and needs the per-example losses, shape [{batch}] (e.g. "
            "ops.cross_entropy(..., reduction='none'), not a mean loss)")


def clip_factors(norms, mask, clip):
    """``mask_i * min(1, C (1 - margin) / ||g_i||)``; ``clip`` may be +inf (no clipping)."""
    scale = clip * (1.0 - CLIP_MARGIN) / ops.maximum(norms, _TINY)
    return mask * ops.minimum(scale, ops.ones_like(scale))


def unit_mask(mask, rows_per_unit: int):
    """[U * m] row mask -> [U] unit mask (a unit counts when any of its rows is real)."""
    if rows_per_unit == 1:
        return mask
    return _reduce_max(mask.reshape(-1, rows_per_unit), 1)


_reduce_max = ops.ReduceMax(keep_dims=False)


class MaskedSum(nn.Cell):
    """``(sum_i mask_i loss_i, losses)``: padding rows contribute no gradient."""

    def __init__(self, network):
        super().__init__(auto_prefix=False)
        self.network = network

    def construct(self, inputs, mask):
        losses = self.network(*inputs)
        return (losses * mask).sum(), losses


# Products with a transposed operand use the kernels' transpose flags: an explicit transpose is a
# copy, and MindSpore's CPU backend keeps a graph's intermediate buffers for the whole launch
# (measured, GPT-2 small full fine-tuning at batch 8: the core's extra memory 3.7 GB -> 1.7 GB for
# the Dense layers alone, and 5.1 s -> 3.4 s).
gram = ops.BatchMatMul(transpose_b=True)        # [B, T, d] x [B, T', d] -> [B, T, T']
outer_sum = ops.BatchMatMul(transpose_a=True)   # [B, T, m] x [B, T, n] -> [B, m, n] = sum_t r_t l_t^T
matmul_tn = ops.MatMul(transpose_a=True)        # [N, m] x [N, n] -> [m, n]


def token_sum(x):
    """[B, T, d] -> [B, d], the sum over tokens as a batched product with ones (a reduction over
    the middle axis is several times slower on this backend, and keeps a copy)."""
    ones = ops.ones((x.shape[0], 1, x.shape[1]), x.dtype)
    return ops.bmm(ones, x).reshape(x.shape[0], x.shape[2])


def part(x, l1: bool):
    """Per-example ``||x_i||_1`` or ``||x_i||_2^2`` of a [B, ...] tensor."""
    flat = x.reshape(x.shape[0], -1)
    return ops.abs(flat).sum(1) if l1 else ops.square(flat).sum(1)


def probe(shape, tag):
    # requires_grad=True: PyNative mode returns a zero gradient for a Parameter with
    # requires_grad=False (graph mode does not), which made book-keeping sum to zero there.
    return ms.Parameter(ops.zeros(shape, ms.float32), name=f"_bk.{tag}.probe", requires_grad=True)


def buffer(shape, tag, dtype=ms.float32):
    return ms.Parameter(ops.zeros(shape, dtype), name=f"_bk.{tag}.act", requires_grad=False)
