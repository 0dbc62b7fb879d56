"""Rules for embeddings: a token lookup table (``nn.Embedding`` in a user's Cell, an untied token
embedding of a tapped model), a token table tied to the output head (GPT-2, tied Qwen2), and
learned absolute positions (GPT-2 ``wpe``).

With ``g_t`` the gradient at the looked-up rows (the embedding output of token ``t``):

* lookup: ``E_i = sum_t onehot(id_t) g_t^T``; ghost norm
  ``||E_i||^2 = sum_{t,t'} [id_t = id_t'] (g_t . g_t')`` (repeated ids add up); clipped sum
  ``sum_i c_i E_i``, a segment sum of the scaled rows by id.  Materialised fallback: ``E_i`` as
  [B, V, d] (L1 geometry, small vocabularies).
* tied (counted once): ``G_i = E_i + O_i`` with the head part ``O_i = sum_t g_o,t h_t^T``, ``g_o``
  the gradient at the logits ``h W^T`` and ``h`` the head input, so
  ``||G_i||^2 = ||E_i||^2 + ||O_i||^2 + 2 <E_i, O_i>``, ``||O_i||^2`` the dense ghost norm and
  ``<E_i, O_i> = sum_{t,t'} g_o,t'[id_t] (h_t' . g_t)``.
* position: row ``t`` of ``G_i`` is ``g_t`` (positions within an example are distinct), so
  ``||G_i||^2 = sum_t ||g_t||^2``.  A unit of ``m`` rows repeats every position ``m`` times: its
  gradient row ``t`` is ``sum_j g_j,t``, summed before squaring (:func:`position_unit`).

Token ids are kept as [B, T] int32 (the saved input of an embedding tap).
"""
from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
from mindspore import Tensor, nn, ops

from ..common import buffer, gram, matmul_tn, outer_sum, probe


@dataclass(frozen=True)
class EmbeddingRule:
    def roles(self, cell):
        return [(cell.embedding_table, "embedding")]

    def probed(self, cell, tag, in_shape, out_shape):
        return ProbedEmbedding(cell.embedding_table, tag, in_shape, out_shape)


def rule(cell):
    """``nn.Embedding`` (gather or one-hot matmul: the same rows, the same gradient) in float32."""
    if type(cell) is nn.Embedding and cell.dtype == ms.float32:
        return EmbeddingRule()
    return None


class ProbedEmbedding(nn.Cell):
    """A token lookup with a zero probe on its output and its ids saved for book-keeping."""

    def __init__(self, table, tag: str, in_shape, out_shape):
        super().__init__(auto_prefix=False)
        self.table = table
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.probe = probe(self.out_shape, tag)
        self.act = buffer(self.in_shape, tag, ms.int32)

    def construct(self, ids):
        ops.assign(self.act, ids.astype(ms.int32))
        return ops.gather(self.table, ids, 0) + self.probe


def same_id(ids, dtype):
    """[B, T, T] indicator ``[id_t = id_t']``."""
    return ops.equal(ops.expand_dims(ids, 2), ops.expand_dims(ids, 1)).astype(dtype)


def lookup_per_example(g, ids, rows: int):
    """Materialised ``E_i`` [B, V, d]."""
    onehot = ops.one_hot(ids, rows, Tensor(1.0, g.dtype), Tensor(0.0, g.dtype))
    return outer_sum(onehot, g)


def lookup_square_norm(g, ids):
    """Ghost ``||E_i||^2``."""
    return (same_id(ids, g.dtype) * gram(g, g)).sum((1, 2))


def lookup_clipped_sum(g, ids, per_token, rows: int):
    d = g.shape[-1]
    return ops.unsorted_segment_sum((g * per_token).reshape(-1, d), ids.reshape(-1), rows)


def tied_square_norm(g_e, g_o, h, ids):
    """Ghost ``||E_i + O_i||^2`` of a tied token embedding."""
    lookup = (same_id(ids, g_e.dtype) * gram(g_e, g_e)).sum((1, 2))
    head = (gram(h, h) * gram(g_o, g_o)).sum((1, 2))
    # m[b, t', t] = g_o[b, t', ids[b, t]]
    index = ops.broadcast_to(ops.expand_dims(ids, 1), (ids.shape[0], ids.shape[1], ids.shape[1]))
    m = ops.gather_elements(g_o, 2, index)
    cross = (m * gram(h, g_e)).sum((1, 2))
    return lookup + head + 2.0 * cross


def tied_per_example(g_e, g_o, h, ids, rows: int):
    """Materialised ``E_i + O_i`` [B, V, d]."""
    onehot = ops.one_hot(ids, rows, Tensor(1.0, g_e.dtype), Tensor(0.0, g_e.dtype))
    return outer_sum(g_o, h) + outer_sum(onehot, g_e)


def tied_clipped_sum(g_e, g_o, h, ids, per_token, rows: int):
    d = g_e.shape[-1]
    lookup = ops.unsorted_segment_sum((g_e * per_token).reshape(-1, d), ids.reshape(-1), rows)
    head = matmul_tn(g_o.reshape(-1, g_o.shape[-1]), (h * per_token).reshape(-1, d))
    return lookup + head


def position_unit(g, rows_per_unit: int):
    """[U, m T, d] -> [U, T, d]: a unit's position-embedding gradient rows ``sum_j g_j,t``."""
    return g.reshape(g.shape[0], rows_per_unit, -1, g.shape[-1]).sum(1)


def position_clipped_sum(g, row, rows: int):
    """``sum_i c_i G_i`` [n_positions, d] from ``g`` [B, T, d] and ``row`` the factors [1, B]."""
    part = ops.matmul(row, g.reshape(g.shape[0], -1)).reshape(g.shape[1:])  # [T, d]
    if rows == part.shape[0]:
        return part
    pad = ops.zeros((rows - part.shape[0], part.shape[1]), part.dtype)
    return ops.concat((part, pad), 0)
