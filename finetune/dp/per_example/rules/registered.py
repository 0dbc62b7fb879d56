"""Rule for user layers declared linear with :func:`register_dense` (the dense rule, any attribute
names)."""
from __future__ import annotations

from .dense import DenseRule

_DENSE_RULES: dict[type, DenseRule] = {}


def register_dense(cls: type, weight: str = "weight", bias: str | None = "bias") -> None:
    """Declare that cells of class ``cls`` compute ``x @ W^T + b`` with ``W`` stored [out, in].

    The class's ``construct`` is replaced by an equivalent ``ops.dense`` during book-keeping, so only
    register layers for which that is exactly true (no activation, no dropout, no extra terms).
    """
    _DENSE_RULES[cls] = DenseRule(weight, bias)


def rule(cell):
    return _DENSE_RULES.get(type(cell))
