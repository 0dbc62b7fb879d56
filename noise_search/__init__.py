"""Offline search for the noise with the least E|Z| whose certified epsilon meets a target.

``search(eps, delta, ...)`` runs the search and writes a certified table (format v1,
docs/table-format.md); ``load_table(path)`` (the same function as ``accountant.table.load_table``)
reads and verifies it; ``load_table(path).noise.sample(n, rng)`` draws exactly the certified law.
Command line: ``python -m noise_search --help``.  It builds on ``accountant`` only and never imports
``finetune`` (docs/architecture.md).
"""
from __future__ import annotations

from noise_search.search import DEFAULT_SAMPLING_RATE, DEFAULT_STEPS, SearchResult, TargetError, search

__all__ = ["search", "load_table", "SearchResult", "TargetError", "DEFAULT_SAMPLING_RATE", "DEFAULT_STEPS"]


def __getattr__(name):
    # re-exported lazily so importing the search does not load the accountant's table module
    if name == "load_table":
        from accountant.table import load_table
        return load_table
    raise AttributeError(f"module 'noise_search' has no attribute {name!r}")
