"""``register-sites.sh`` / ``deploy.sites``: only ever the deployment's own SuperLink, or a loud failure.

The SuperLink itself is exercised in ``tests/integration/test_deploy.py``; here: every way the
connection can be wrong is refused before Flower is asked anything, and a SuperLink that does
not answer is a failure (exit 1, nothing reported as registered), whatever FLWR_HOME the shell has.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.init import init_main
from deploy.loopback import DEPLOY_DIR, free_port
from deploy.sites import SitesError, deployment_connection, public_key_bytes, site_keys

LOCAL_CONFIG = """[superlink]
default = "local"

[superlink.local]
address = ":local:"
"""


@pytest.fixture
def link_dir(tmp_path: Path) -> Path:
    port = free_port()  # nobody listens there
    assert init_main([str(tmp_path / "dep"), "--sites", "site-a,site-b", "--superlink-host", "127.0.0.1",
                      "--superlink-port", str(port), "--dp-epsilon", "0"]) == 0
    return tmp_path / "dep" / "superlink"


def _processes_with_env(needle: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle.encode() in (proc / "environ").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def test_the_deployments_connection_is_read(link_dir: Path) -> None:
    conn = deployment_connection(link_dir)
    assert conn.name == "fedimaging" and conn.address.startswith("127.0.0.1:")
    assert conn.flwr_home == link_dir / "flwr-home"
    assert set(site_keys(link_dir)) == {"site-a", "site-b"}
    assert public_key_bytes(link_dir / "site-keys" / "site-a.pub").startswith(b"-----BEGIN PUBLIC KEY-----")


@pytest.mark.parametrize(
    "config, message",
    [
        (LOCAL_CONFIG, "no SuperLink address"),
        ('[superlink]\ndefault = "x"\n[superlink.x]\naddress = "127.0.0.1:1"\ninsecure = true\n', "does not use TLS"),
        ('[superlink]\ndefault = "x"\n[superlink.x]\naddress = "127.0.0.1:1"\n'
         'root-certificates = "/nonexistent/ca.crt"\n', "/nonexistent/ca.crt"),
        ('[superlink]\n[superlink.x]\naddress = "127.0.0.1:1"\n', "has no connection None"),
        ("not toml [", "not valid TOML"),
    ],
)
def test_a_connection_that_is_not_a_deployed_tls_superlink_is_refused(link_dir: Path, config: str,
                                                                       message: str) -> None:
    (link_dir / "flwr-home" / "config.toml").write_text(config)
    with pytest.raises(SitesError, match=message.replace("(", r"\(")):
        deployment_connection(link_dir)


def test_unknown_connection_name_and_missing_folder_are_named(link_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SitesError, match="no connection 'other' .*has: fedimaging"):
        deployment_connection(link_dir, "other")
    with pytest.raises(SitesError, match="is not the superlink/ folder of a deployment"):
        deployment_connection(tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()  # no default Flower config created there


def test_bad_or_missing_key_is_named(link_dir: Path) -> None:
    (link_dir / "site-keys" / "site-b.pub").write_text("ssh-ed25519 AAAA not-a-key\n")
    with pytest.raises(SitesError, match="site-b.pub"):
        public_key_bytes(link_dir / "site-keys" / "site-b.pub")
    with pytest.raises(SitesError, match="site-z.pub is missing"):
        public_key_bytes(site_keys(link_dir, ["site-z"])["site-z"])


def _script(link_dir: Path, hostile_home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(FLWR_HOME=str(hostile_home), FLWR_TELEMETRY_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return subprocess.run([str(DEPLOY_DIR / "register-sites.sh"), str(link_dir), *args], env=env,
                          cwd=link_dir.parent, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_unreachable_superlink_with_a_hostile_flwr_home_fails_loudly(link_dir: Path, tmp_path: Path) -> None:
    """The reported bug: FLWR_HOME set in the shell sent the registration to a local SuperLink."""
    hostile = tmp_path / "hostile-flwr-home"
    hostile.mkdir()
    (hostile / "config.toml").write_text(LOCAL_CONFIG)
    before = sorted(p.relative_to(hostile).as_posix() for p in hostile.rglob("*"))
    result = _script(link_dir, hostile)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "registered" not in result.stdout
    assert "Connection to the SuperLink is unavailable" in result.stderr
    assert str(link_dir / "flwr-home") in result.stderr  # it says which FLWR_HOME it used instead
    assert sorted(p.relative_to(hostile).as_posix() for p in hostile.rglob("*")) == before
    assert _processes_with_env(str(hostile)) == []  # no local SuperLink was started for it
    # a typo in the connection name fails before anything is contacted
    typo = _script(link_dir, hostile, "--connection", "fedimagin")
    assert typo.returncode == 2 and "no connection 'fedimagin'" in typo.stderr


def test_fedimaging_deploy_register_and_sites_route_here(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from app.cli import main

    assert main(["deploy", "register", str(tmp_path / "nothing")]) == 2
    assert "fedimaging deploy register: error:" in capsys.readouterr().err
    assert main(["deploy", "sites", str(tmp_path / "nothing")]) == 2
    assert "fedimaging deploy sites: error:" in capsys.readouterr().err
