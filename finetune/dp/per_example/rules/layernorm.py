"""Rule for LayerNorm over the last axis (Ba et al. 2016), ``y = xhat * gamma + beta``.

Per-example gradients: ``gamma``: ``sum_t g_t * xhat_t``; ``beta``: ``sum_t g_t`` (vectors [B, d],
computed once and used for both the norm and the clipped sum; they are small, so the materialised
form is the book-keeping form)."""
from __future__ import annotations

from dataclasses import dataclass

from mindspore import nn, ops

from ..common import buffer, probe, token_sum


def gain(g, xhat):
    """Per-example gradient of a normalisation gain: ``sum_t g_t * xhat_t``, [B, d]."""
    return token_sum(g * xhat)


@dataclass(frozen=True)
class LayerNormRule:
    def roles(self, cell):
        return [(cell.gamma, "gamma"), (cell.beta, "beta")]

    def probed(self, cell, tag, in_shape, out_shape):
        return ProbedLayerNorm(cell.gamma, cell.beta, cell.epsilon, tag, in_shape)


def rule(cell):
    """``nn.LayerNorm`` normalising the last axis only."""
    if (type(cell) is nn.LayerNorm and len(cell.normalized_shape) == 1
            and cell.begin_norm_axis in (-1,) and cell.begin_params_axis in (-1,)):
        return LayerNormRule()
    return None


class ProbedLayerNorm(nn.Cell):
    """LayerNorm over the last axis, ``xhat * gamma + beta``; saves ``xhat`` and probes the output."""

    def __init__(self, gamma, beta, eps: float, tag: str, in_shape, out_shape=None):
        super().__init__(auto_prefix=False)
        self.gamma = gamma
        self.beta = beta
        self.eps = float(eps)
        self.in_shape = self.out_shape = tuple(in_shape)
        self.probe = probe(self.in_shape, tag)
        self.act = buffer(self.in_shape, tag)

    def _normalise(self, x):
        mean = x.mean(-1, keep_dims=True)
        var = ops.square(x - mean).mean(-1, keep_dims=True)
        return (x - mean) * ops.rsqrt(var + self.eps)

    def construct(self, x):
        xhat = self._normalise(x)
        ops.assign(self.act, xhat)
        return xhat * self.gamma + self.beta + self.probe
