"""Integration-test ordering."""

from __future__ import annotations


def pytest_collection_modifyitems(config, items):
    """The Docker image test runs last: .ci/run makes its stand-in base in the background (about 6 minutes on 2
    cores) while the rest of the suite runs, so the test rarely waits for it. Stable: every other order is kept."""
    items.sort(key=lambda item: item.path.name == "test_docker_image.py")
