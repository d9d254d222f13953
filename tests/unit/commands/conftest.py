"""Tests here run one intra-op thread: the 2-core CI machine is shared with other test processes."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_intra_op_thread):
    """Every test in this folder takes tests/conftest.py's one_intra_op_thread."""
