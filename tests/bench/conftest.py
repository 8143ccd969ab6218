"""Benchmark tests share one small demo federation (generated on first use; same seed and size)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """Run config ``demo-root`` for the benchmark tests: ``ensure_demo_site`` fills it once per site."""
    return tmp_path_factory.mktemp("bench-demo")
