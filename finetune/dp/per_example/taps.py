"""The taps protocol: how a model exposes its layers to book-keeping without the engine knowing the
model's algebra.  ``finetune.models.gpt2.GPT2LMHeadModel`` and ``finetune.models.llama.LlamaForCausalLM``
implement it; a new model that implements it gets book-keeping for every tapped parameter.

A tapped model has

``taps()``
    The book-keeping layers, in probe order, each run exactly once per forward.  A tap is either
    linear (``weight`` [out, in], ``bias`` or None, ``n_in``, ``n_out``; a LoRA layer adds
    ``lora_A``, ``lora_B``, ``scaling`` and ``merged``) or a normalisation (``normalise(x)``,
    ``weight`` the gain, ``bias`` the shift or None, ``n_out``).
``probe_shapes(B, T)``
    The output shape of every tap.
``loss(*inputs, probes)``
    The per-example losses [B] and ``saved``, one tensor per tap: its input (linear) or its
    normalised input ``xhat`` (normalisation).  Probe ``k`` is added to tap ``k``'s output.  A
    probe may be shaped [B, 1, d] (constant over tokens: all a bias or shift needs) or [1, 1, 1]
    (nothing of that tap is trained).
``embeddings()`` and ``embedding_probe_shapes(B, T)`` (optional)
    ``(token table, position table or None)`` and the shapes of two extra probes: probe
    ``n = len(taps())`` on the summed input embedding (its gradient gives every lookup part) and
    probe ``n + 1`` on the logits (its gradient gives the head part of a tied token table).  With
    these probes ``saved`` ends with ``(input_ids, h)``, ``h`` the head's input.
``ties_embedding()`` (optional, default True)
    Whether the token table is also the output head (counted once: lookup plus head part).  An
    untied head is an ordinary linear tap.

The rules that turn taps into per-example norms and clipped sums are in :mod:`.rules`.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from .bookkeeping import TappedClipSum
from .rules import Slot


def is_tapped(network) -> bool:
    return callable(getattr(network, "taps", None)) and callable(getattr(network, "loss", None))


def tap_roles(tap):
    """[(parameter, role, other, scale)] for one tap of a tapped model."""
    if hasattr(tap, "lora_A") and hasattr(tap, "lora_B"):
        if getattr(tap, "merged", False):
            raise ValueError("LoRA layers are merged; unmerge them before training")
        s = float(tap.scaling)
        return [(tap.weight, "weight", None, 1.0), (tap.bias, "bias", None, 1.0),
                (tap.lora_A, "lora_A", tap.lora_B, s), (tap.lora_B, "lora_B", tap.lora_A, s)]
    if callable(getattr(tap, "normalise", None)):
        return [(tap.weight, "gamma", None, 1.0), (getattr(tap, "bias", None), "beta", None, 1.0)]
    return [(tap.weight, "weight", None, 1.0), (getattr(tap, "bias", None), "bias", None, 1.0)]


def embeddings(network) -> tuple:
    """(token, position-or-None) embedding Parameters of a tapped model that probes them, else ()."""
    if callable(getattr(network, "embeddings", None)) and callable(
            getattr(network, "embedding_probe_shapes", None)):
        return tuple(network.embeddings())
    return ()


def ties_embedding(network) -> bool:
    tied = getattr(network, "ties_embedding", None)
    return bool(tied()) if callable(tied) else True


def covered(network) -> set:
    """ids of the Parameters book-keeping covers in a tapped model."""
    ids = {id(p) for tap in network.taps() for p, *_ in tap_roles(tap) if p is not None}
    ids.update(id(p) for p in embeddings(network) if p is not None)
    return ids


class LossOf(nn.Cell):
    """``model.loss`` as a Cell (tapped models return logits from ``construct``)."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, *inputs):
        return self.model.loss(*inputs)


def tapped_cell(network, params, inputs, geometry, rows_per_unit=1):
    """(book-keeping cell, zero probes) for a tapped model at the micro-batch shape of ``inputs``."""
    ids = {id(p): k for k, p in enumerate(params)}
    taps = list(network.taps())
    slots = [None] * len(params)
    batch, seq = inputs[0].shape[:2]
    out_shapes = [tuple(s) for s in network.probe_shapes(batch, seq)]
    in_shapes, probe_shapes = [], []
    for t, tap in enumerate(taps):
        n_in = getattr(tap, "n_in", out_shapes[t][-1])
        in_shapes.append(out_shapes[t][:-1] + (n_in,))
        roles = set()
        for p, role, other, scale in tap_roles(tap):
            if p is not None and id(p) in ids:
                slots[ids[id(p)]] = Slot(t, role, other, scale)
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
    tables = embeddings(network)
    if any(p is not None and id(p) in ids for p in tables):
        # two more probes: the summed input embedding (tap n) and the logits (tap n + 1);
        # saved gains (input_ids, h): saved[n] is the ids, saved[n + 1] the head input h
        n = len(taps)
        e_shape, o_shape = (tuple(s) for s in network.embedding_probe_shapes(batch, seq))
        in_shapes += [e_shape, e_shape]
        out_shapes = out_shapes + [e_shape, o_shape]
        token, position = tables
        tied = ties_embedding(network)
        if id(token) in ids:
            slots[ids[id(token)]] = Slot(n, "wte" if tied else "embedding", token, 1.0, tap2=n + 1)
        if position is not None and id(position) in ids:
            slots[ids[id(position)]] = Slot(n, "wpe", position, 1.0)
        head_trained = tied and id(token) in ids
        probe_shapes += [e_shape, o_shape if head_trained else (1,) * len(o_shape)]
    probes = ms.mutable(tuple(ops.zeros(s, ms.float32) for s in probe_shapes))
    return TappedClipSum(network, slots, in_shapes, out_shapes, geometry, rows_per_unit), probes
