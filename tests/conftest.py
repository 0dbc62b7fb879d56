"""Shared test set-up: keep MindSpore's global execution mode from leaking between tests.

Some tests switch to GRAPH_MODE (as the training CLI does); others are written for the default
PyNative mode with explicit ``ms.jit``. The mode is process-global, so without this a test's
outcome would depend on which files ran before it.
"""
import sys

import pytest


@pytest.fixture(autouse=True, scope="module")
def _default_mindspore_mode_per_module():
    """Every test file starts and ends in MindSpore's default (PyNative) mode."""
    ms = sys.modules.get("mindspore")
    if ms is not None:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms = sys.modules.get("mindspore")
    if ms is not None:
        ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture(autouse=True)
def _restore_mindspore_mode_per_test():
    """A test that switches mode does not change it for the next test of its file."""
    ms = sys.modules.get("mindspore")
    mode = ms.get_context("mode") if ms is not None else None
    yield
    ms = sys.modules.get("mindspore")
    if ms is not None:
        ms.set_context(mode=mode if mode is not None else ms.PYNATIVE_MODE)
