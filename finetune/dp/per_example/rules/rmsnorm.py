"""Rule for RMS normalisation (Zhang & Sennrich 2019), ``y = x / sqrt(mean(x^2) + eps) * g``, the
norm of Llama-family models.

Per-example gradient of the gain: ``sum_t g_t * xhat_t`` with ``xhat = x / sqrt(mean(x^2) + eps)``,
the same vector rule as a LayerNorm gain (:func:`.layernorm.gain`); there is no shift.  A user's
own RMS-norm class is covered once declared with :func:`register_rmsnorm`; in a tapped model
(``finetune.models.llama``) the norm is a tap whose saved input is ``xhat``."""
from __future__ import annotations

from dataclasses import dataclass

from mindspore import nn, ops

from ..common import buffer, probe

_RMS_RULES: dict[type, "RMSNormRule"] = {}


@dataclass(frozen=True)
class RMSNormRule:
    gain: str = "weight"
    eps: str = "eps"

    def roles(self, cell):
        return [(getattr(cell, self.gain), "gamma")]

    def probed(self, cell, tag, in_shape, out_shape):
        return ProbedRMSNorm(getattr(cell, self.gain), getattr(cell, self.eps), tag, in_shape)


def register_rmsnorm(cls: type, gain: str = "weight", eps: str = "eps") -> None:
    """Declare that cells of class ``cls`` compute ``x * rsqrt(mean(x^2, -1) + eps) * gain`` over
    the last axis and nothing else."""
    _RMS_RULES[cls] = RMSNormRule(gain, eps)


def rule(cell):
    return _RMS_RULES.get(type(cell))


class ProbedRMSNorm(nn.Cell):
    """RMSNorm over the last axis; saves ``xhat`` and probes the output."""

    def __init__(self, gain, eps: float, tag: str, in_shape):
        super().__init__(auto_prefix=False)
        self.gain = gain
        self.eps = float(eps)
        self.in_shape = self.out_shape = tuple(in_shape)
        self.probe = probe(self.in_shape, tag)
        self.act = buffer(self.in_shape, tag)

    def construct(self, x):
        xhat = x * ops.rsqrt((x * x).mean(-1, keep_dims=True) + self.eps)
        ops.assign(self.act, xhat)
        return xhat * self.gain + self.probe
