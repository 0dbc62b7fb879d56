"""One book-keeping rule per layer role.  Each rule module gives the per-example gradient of its
parameters in the two forms book-keeping uses (a ghost norm from the layer's output gradient and
input, and the materialised per-example gradient as fallback) and its contribution to the clipped
sum; for plain Cells it also gives the probed layer that replaces the original in the engine's copy
of the network (``finetune.dp.per_example.shadow``).

* :mod:`.dense`: linear layers with or without bias, LoRA factors A and B;
* :mod:`.registered`: user layers declared linear with ``register_dense``;
* :mod:`.layernorm`: LayerNorm gain and shift;
* :mod:`.rmsnorm`: RMSNorm gain (and ``register_rmsnorm`` for a user's own RMS norm);
* :mod:`.embedding`: token lookup (``nn.Embedding``), tied token embedding, position embedding.

A new layer role goes in a new module here, with a ``rule(cell)`` for plain Cells and its role
names added to the dispatch of ``finetune.dp.per_example.bookkeeping.BookkeepingCore``.
"""
from __future__ import annotations

from dataclasses import dataclass

from mindspore import Parameter

from . import dense, embedding, layernorm, registered, rmsnorm
from .registered import register_dense
from .rmsnorm import register_rmsnorm

__all__ = ["Slot", "plain_rule", "PROBED", "register_dense", "register_rmsnorm"]

# registered classes first: a user's registration wins over the built-in match
_PLAIN = (registered, rmsnorm, dense, layernorm, embedding)
PROBED = (dense.ProbedDense, layernorm.ProbedLayerNorm, rmsnorm.ProbedRMSNorm, embedding.ProbedEmbedding)


def plain_rule(cell):
    """The rule covering ``cell`` in a plain (untapped) Cell, or None."""
    for module in _PLAIN:
        found = module.rule(cell)
        if found is not None:
            return found
    return None


@dataclass
class Slot:
    """Where one trainable parameter's gradient comes from: tap ``tap`` (output gradient and saved
    input), its ``role`` (``weight``, ``bias``, ``lora_A``, ``lora_B``: :mod:`.dense`; ``gamma``,
    ``beta``: :mod:`.layernorm` / :mod:`.rmsnorm`; ``embedding``, ``wte`` (tied), ``wpe``:
    :mod:`.embedding`).  ``other``: the other LoRA factor, or the embedding table (its row count);
    ``scale``: the LoRA scaling; ``tap2``: the logits tap of a tied embedding (its saved input is
    the head input ``h``)."""

    tap: int
    role: str
    other: Parameter | None = None
    scale: float = 1.0
    tap2: int = -1
