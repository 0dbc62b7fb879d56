"""Rule for a linear layer ``y = x W^T + b`` (``W`` stored [out, in]), with or without bias, and
for the LoRA factors of a linear layer (Hu et al., "LoRA", arXiv 2106.09685).

With ``a`` the layer input and ``g = dL/dy`` the output gradient of example ``i`` over its tokens:

* weight: ``G_i = sum_t g_it a_it^T``.  Book-keeping norm, either the ghost norm
  ``||G_i||_F^2 = sum_{t,t'} (a_it . a_it')(g_it . g_it')`` (Goodfellow 2015; Li et al., ICLR 2022)
  or the materialised ``G_i``, whichever is cheaper (MixOpt, Bu et al., ICML 2023).  Clipped-sum
  contribution ``sum_i c_i G_i = (c * g)^T a``, one matmul.
* bias: ``sum_t g_it`` (a vector parameter, see :func:`vector`).
* LoRA ``y = ... + s (x A^T) B^T``: ``dL/dB = s sum_t g_t (A x_t)^T`` and
  ``dL/dA = s sum_t (B^T g_t) x_t^T``; both are "weight" products ``sum_t R_t L_t^T`` of
  :func:`factors`.

Materialised fallback (L1 geometry, or where the ghost norm costs more): ``G_i`` itself, [B, out, in].
"""
from __future__ import annotations

from dataclasses import dataclass

from mindspore import nn, ops

from ..common import buffer, gram, matmul_tn, outer_sum, part, probe, token_sum

ROLES = ("weight", "lora_A", "lora_B")


@dataclass(frozen=True)
class DenseRule:
    """A layer computing ``x @ W^T + b`` with ``W`` stored [out, in] (attribute names given)."""

    weight: str = "weight"
    bias: str | None = "bias"

    def roles(self, cell):
        b = getattr(cell, self.bias) if self.bias is not None else None
        return [(getattr(cell, self.weight), "weight"), (b, "bias")]

    def probed(self, cell, tag, in_shape, out_shape):
        b = getattr(cell, self.bias) if self.bias is not None else None
        return ProbedDense(getattr(cell, self.weight), b, tag, in_shape, out_shape)


def rule(cell):
    """``nn.Dense`` without activation."""
    if type(cell) is nn.Dense and not getattr(cell, "activation_flag", False):
        return DenseRule("weight", "bias" if getattr(cell, "has_bias", True) else None)
    return None


class ProbedDense(nn.Cell):
    """Dense layer with a zero probe on its output and its input saved for book-keeping."""

    def __init__(self, weight, bias, tag: str, in_shape, out_shape):
        super().__init__(auto_prefix=False)
        self.weight = weight
        self.bias = bias
        self.has_bias = bias is not None
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.probe = probe(self.out_shape, tag)
        self.act = buffer(self.in_shape, tag)

    def construct(self, x):
        ops.assign(self.act, x)
        if self.has_bias:
            return ops.dense(x, self.weight, self.bias) + self.probe
        return ops.dense(x, self.weight) + self.probe


def dims(role, d_in, d_out, other):
    """(d_in, d_out) of the product ``sum_t R_t L_t^T`` a role's gradient is."""
    if role == "lora_A":
        return d_in, other.shape[1]
    if role == "lora_B":
        return other.shape[0], d_out
    return d_in, d_out


def factors(role, g, a, other, scale):
    """(R, L) with per-example gradient ``sum_t R_t L_t^T``."""
    if role == "lora_B":
        return g * scale, ops.dense(a, other)
    if role == "lora_A":
        return ops.matmul(g, other) * scale, a
    return g, a


def square_norm(r, l, ghost: bool, l1: bool):
    """Per-example ``||sum_t R_t L_t^T||`` (squared for L2; L1 norm for L1)."""
    if ghost:
        return (gram(l, l) * gram(r, r)).sum((1, 2))
    return part(outer_sum(r, l), l1)


def clipped_sum(r, l, per_token):
    """``sum_i c_i sum_t R_it L_it^T`` with ``per_token`` the factors [B, 1, 1]."""
    if r.shape[-1] <= l.shape[-1]:  # scale the narrower factor (same sum, less work)
        r = r * per_token
    else:
        l = l * per_token
    return matmul_tn(r.reshape(-1, r.shape[-1]), l.reshape(-1, l.shape[-1]))


def vector(g):
    """Per-example bias gradient ``sum_t g_t``, [B, d]."""
    return token_sum(g)
