"""Site checks before a SuperNode starts, and the start scripts' refusals (no Flower process starts)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.demo import write_demo_site
from deploy.init import init_main
from deploy.preflight import main as preflight_main

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.fixture(scope="module")
def site_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_site(tmp_path_factory.mktemp("data") / "site-a", "site-a", seed=1, size="small")


@pytest.fixture
def deployment(tmp_path: Path, site_data: Path) -> Path:
    out = tmp_path / "dep"
    assert init_main([str(out), "--sites", "site-a", "--data-path", str(site_data),
                      "--state-dir", str(tmp_path / "state" / "{site}")]) == 0
    return out


def _run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **env}
    return subprocess.run(cmd, capture_output=True, text=True, env=full, timeout=120)


def test_a_prepared_site_passes(deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    site = deployment / "sites" / "site-a"
    assert preflight_main([str(site / "node-config.toml"), "--auth-key", str(site / "auth.key")]) == 0
    assert "site site-a ready" in capsys.readouterr().out
    assert (tmp_path / "state" / "site-a").is_dir()


@pytest.mark.parametrize("damage, expected", [
    ("missing-folder", "does not exist (set 'data-path')"),
    ("no-manifest", "dataset.json is missing"),
    ("bad-json", "dataset.json is not valid JSON"),
    ("missing-image", "imagesTr"),
])
def test_a_bad_dataset_is_named(deployment: Path, site_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                damage: str, expected: str) -> None:
    import shutil

    data = tmp_path / "copy"
    if damage != "missing-folder":
        shutil.copytree(site_data, data)
    if damage == "no-manifest":
        (data / "dataset.json").unlink()
    elif damage == "bad-json":
        (data / "dataset.json").write_text("{")
    elif damage == "missing-image":
        next((data / "imagesTr").iterdir()).unlink()
    cfg = deployment / "sites" / "site-a" / "node-config.toml"
    cfg.write_text(cfg.read_text().replace(str(site_data), str(data)))
    assert preflight_main([str(cfg)]) == 1
    err = capsys.readouterr().err
    assert expected in err and str(data) in err


def test_a_key_readable_by_others_is_refused(deployment: Path, capsys: pytest.CaptureFixture) -> None:
    site = deployment / "sites" / "site-a"
    (site / "auth.key").chmod(0o644)
    assert preflight_main([str(site / "node-config.toml"), "--auth-key", str(site / "auth.key")]) == 1
    assert "chmod 600" in capsys.readouterr().err


def test_a_config_without_data_path_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "node-config.toml"
    cfg.write_text('site-name = "x"\nstate-dir = "/tmp/x"\n')
    assert preflight_main([str(cfg)]) == 1
    assert "'data-path' is not set" in capsys.readouterr().err


def test_start_site_refuses_before_starting_flower(deployment: Path, tmp_path: Path) -> None:
    site = deployment / "sites" / "site-a"
    cfg = site / "node-config.toml"
    cfg.write_text(cfg.read_text().replace('data-path = "', f'data-path = "{tmp_path}/nowhere'))
    res = _run([str(DEPLOY / "start-site.sh"), str(site)])
    assert res.returncode != 0
    assert f"{tmp_path}/nowhere" in res.stderr and "does not exist" in res.stderr
    assert "Starting Flower SuperNode" not in res.stdout + res.stderr
    (site / "auth.key").unlink()
    res = _run([str(DEPLOY / "start-site.sh"), str(site)])
    assert res.returncode == 2 and f"{site}/auth.key is missing" in res.stderr


def test_start_superlink_and_register_name_missing_files(deployment: Path, tmp_path: Path) -> None:
    link = deployment / "superlink"
    (link / "superlink.key").unlink()
    res = _run([str(DEPLOY / "start-superlink.sh"), str(link)])
    assert res.returncode == 2 and f"{link}/superlink.key is missing" in res.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    res = _run([str(DEPLOY / "register-sites.sh"), str(empty)])
    assert res.returncode == 2 and "flwr-home/config.toml is missing" in res.stderr
    (empty / "flwr-home").mkdir()
    (empty / "flwr-home" / "config.toml").write_bytes((link / "flwr-home" / "config.toml").read_bytes())
    res = _run([str(DEPLOY / "register-sites.sh"), str(empty)])
    assert res.returncode == 2 and "no public keys" in res.stderr
