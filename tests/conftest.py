"""Shared test setup: offline hubs, one thread, fixture paths."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download; fail fast if something tries

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures"  # copies of ../shared/fixtures/*.tsv (real checkpoint key manifests)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_intra_op_thread():
    """One intra-op thread for the test (the 2-core CI machine is shared with other test processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES
