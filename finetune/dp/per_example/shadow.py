"""The engine-owned structural copy of a plain Cell in which covered layers are swapped for probed
ones, and the recorder used by the set-up forward.

Nothing is stored in the user's network: the probed layers and their buffers belong to a copy that
shares the user's Parameters (:func:`shadow_network`); the user's Cell keeps its classes, children
and Parameters, so it runs at any shape and ``save_checkpoint(network)`` sees only its own
Parameters.
"""
from __future__ import annotations

import copy
import time
from collections import OrderedDict

from mindspore import nn


class Recorder(nn.Cell):
    """A covered layer run unchanged, recording ``(input shape, output shape)`` per call.

    The set-up forward runs in the current execution mode: in PyNative the attribute is set as
    the call runs, in graph mode when the compiled forward runs (shapes are static there)."""

    def __init__(self, layer: nn.Cell):
        super().__init__(auto_prefix=False)
        self.layer = layer
        self.calls = ()

    def construct(self, x):
        y = self.layer(x)
        self.calls = self.calls + ((x.shape, y.shape),)
        return y


def walk_replaceable(network: nn.Cell):
    """Yield (parent, child_name, child, path) for every direct child of every cell."""
    for path, parent in network.cells_and_names():
        for name, child in list(parent._cells.items()):  # pylint: disable=protected-access
            if child is None:
                continue
            yield parent, name, child, f"{path}.{name}" if path else name


def _subtree_ids(cell: nn.Cell) -> set[int]:
    return {id(c) for _, c in cell.cells_and_names()}


def _clone_cell(cell: nn.Cell, children: dict) -> nn.Cell:
    """A new Cell of the same class whose attributes are ``cell``'s (same Parameter objects), with
    the sub-cells in ``children`` (old id -> new cell) swapped in: in ``_cells`` and in any list or
    tuple attribute holding cells (``nn.SequentialCell.cell_list``).  ``cell`` is not modified."""
    new = copy.copy(cell)  # Cell.__setstate__ would share cell.__dict__: give it its own below
    state = dict(cell.__dict__)
    state["_cells"] = OrderedDict((k, children.get(id(v), v) if v is not None else None)
                                  for k, v in cell.__dict__["_cells"].items())
    for key in ("_params", "_buffers", "_params_list"):
        if isinstance(state.get(key), dict):
            state[key] = type(state[key])(state[key])
    for key, value in list(state.items()):
        if isinstance(value, (list, tuple)) and any(id(v) in children for v in value):
            state[key] = type(value)(children.get(id(v), v) for v in value)
    # fresh compilation identity: the clone must never reuse (or evict) the original's graphs
    state["_create_time"] = time.time_ns()
    state["_compile_cache"] = None
    state["_phase_cache"] = None
    state["_compiled"] = False
    object.__setattr__(new, "__dict__", state)
    nn.Cell.total_instance_count += 1
    return new


def shadow_network(network: nn.Cell, replacements: dict) -> nn.Cell:
    """A structural copy of ``network`` in which the sub-cells ``replacements`` (id -> new cell)
    are swapped in.  Only the cells on a path from the root to a replaced cell are copied; every
    other sub-cell and every Parameter is shared."""
    memo: dict[int, nn.Cell] = {}

    def visit(cell):
        if id(cell) in replacements:
            return replacements[id(cell)]
        if id(cell) in memo:
            return memo[id(cell)]
        kids = {}
        for child in cell.__dict__["_cells"].values():
            if child is not None and (_subtree_ids(child) & replacements.keys()):
                kids[id(child)] = visit(child)
        memo[id(cell)] = _clone_cell(cell, kids) if kids else cell
        return memo[id(cell)]

    return visit(network)
