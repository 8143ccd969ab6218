"""Suite-wide: how pytest-xdist shares the tests between workers when run with ``pytest -n 2``.

``--dist loadgroup`` with one group per test file behaves like ``--dist loadfile`` (a file's
module fixtures are built once, on one worker). Integration tests (minutes each, mostly waiting
on Flower's polling) are spread one by one instead, and the files that start a Ray simulation
share one group, so two Ray clusters never start at once. Without ``-n`` the marks do nothing.
"""

from __future__ import annotations

import pytest

RAY_SIMULATION_FILES = {"tests/integration/test_simulation.py", "tests/integration/test_own_data.py"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        if path in RAY_SIMULATION_FILES:
            group = "ray-simulation"
        elif path.startswith("tests/integration/"):
            group = item.nodeid
        else:
            group = path
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """Run config ``demo-root`` shared by the in-process studies of the whole suite: generating a
    demo site (DICOM, then prep) costs seconds, and ``ensure_demo_site`` makes each site once per
    (site, seed, task, size). Tests that alter a demo site copy it first."""
    return tmp_path_factory.mktemp("shared-demo")


def share_demo(config: dict):
    """A module fixture (assign it in the test file) pointing ``config``, the file's run config,
    at the suite's demo sites: ``_shared_demo = share_demo(TINY)``."""

    @pytest.fixture(scope="module", autouse=True)
    def _shared_demo(demo_root):
        config["demo-root"] = str(demo_root)
        yield
        config.pop("demo-root")

    return _shared_demo
