"""The app bundle (FAB) that ``flwr run`` ships to every site holds the app's code and nothing else.

Flower 1.41 packs every .py/.toml/.json/.md/.yaml file under the project folder that .gitignore
does not exclude, unless ``[tool.flwr.app] fab-include`` narrows it. A deployment folder or a
prepared site dataset inside the project folder (as a one-host trial invites) must not ship.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from data_prep.demo import write_demo_site
from deploy.init import init_main
from deploy.loopback import copy_checkout

APP_PACKAGES = ("app", "strategies", "tasks", "data_prep", "privacy", "fedimaging")


@pytest.fixture(scope="module")
def project_with_private_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder holding a deployment and a prepared site dataset with its state."""
    root = tmp_path_factory.mktemp("proj") / "fedimaging-study"
    root.mkdir()
    copy_checkout(root)
    assert init_main([str(root / "deployment"), "--sites", "site-a,site-b",
                      "--data-path", str(root / "trial-data" / "{site}"),
                      "--state-dir", str(root / "trial-data" / "{site}-state")]) == 0
    site = write_demo_site(root / "trial-data" / "site-a", "site-a", seed=5, size="small")
    assert (site / "private" / "mapping.json").is_file()
    state = root / "trial-data" / "site-a-state"
    state.mkdir()
    (state / "privacy_ledger.json").write_text(json.dumps({"spent": 1.5}))
    (site / "node-config.toml").write_text('data-path = "."\n')
    return root


def _fab_names(project: Path) -> list[str]:
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(project))) as fab:
        return fab.namelist()


def _expected(project: Path) -> set[str]:
    """Every module of the app packages (Flower itself drops test_*.py / *_test.py)."""
    names = {"pyproject.toml", ".info/CONTENT"}
    for package in APP_PACKAGES:
        for path in (project / package).rglob("*.py"):
            if "__pycache__" in path.parts or path.name.startswith("test_") or path.name.endswith("_test.py"):
                continue
            names.add(path.relative_to(project).as_posix())
    return names


def test_bundle_holds_only_the_app_code(project_with_private_files: Path) -> None:
    names = _fab_names(project_with_private_files)
    assert set(names) == _expected(project_with_private_files)
    for name in names:
        assert not name.startswith(("deployment/", "trial-data/", "tests/", "bench/", "deploy/")), name
        assert not name.endswith((".json", ".key", ".crt", ".pub", ".env")), name
    assert "node-config.toml" not in {Path(n).name for n in names}
    assert "README.md" not in names


def test_files_of_the_deployment_and_dataset_exist_but_do_not_ship(project_with_private_files: Path) -> None:
    """Guard for the test above: the private files are really there, in shippable formats."""
    root = project_with_private_files
    private = [root / "deployment" / "sites" / "site-a" / "node-config.toml",
               root / "deployment" / "superlink" / "flwr-home" / "config.toml",
               root / "trial-data" / "site-a" / "private" / "mapping.json",
               root / "trial-data" / "site-a" / "dataset.json",
               root / "trial-data" / "site-a" / "node-config.toml",
               root / "trial-data" / "site-a-state" / "privacy_ledger.json"]
    names = set(_fab_names(root))
    for path in private:
        assert path.is_file(), path
        assert path.relative_to(root).as_posix() not in names


@pytest.mark.slow
def test_the_bundle_alone_is_a_working_app(project_with_private_files: Path, tmp_path: Path) -> None:
    """Unpacked without the project (editable install hidden), ServerApp and ClientApp import from it."""
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(project_with_private_files))) as fab:
        fab.extractall(tmp_path / "fab")
    probe = f"""
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__ + repr(f)]
sys.path[:] = [{str(tmp_path / "fab")!r}] + [p for p in sys.path if "site-packages" in p or "lib/python" in p]
from flwr.supercore.object_ref import load_app
from flwr.serverapp import ServerApp
from flwr.clientapp import ClientApp
assert isinstance(load_app("app.server_app:app", ValueError), ServerApp)
assert isinstance(load_app("app.client_app:app", ValueError), ClientApp)
ours = {APP_PACKAGES!r}
for name, mod in list(sys.modules.items()):
    if name.split(".")[0] in ours:
        assert (getattr(mod, "__file__", None) or "").startswith({str(tmp_path / "fab")!r}), (name, mod)
print("ok", sorted({{n.split(".")[0] for n in sys.modules if n.split(".")[0] in ours}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().startswith("ok"), out.stdout
