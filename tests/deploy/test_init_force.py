"""``deploy init --force`` is all or nothing and drops sites no longer listed; bad values are refused.

Reproduces issue 18 items 6-9 (deploy parts): a re-run with fewer sites kept the dropped site's
key (and register-sites.sh registered it); a run failing half way left a new CA beside the sites'
old ca.crt with the old CA key gone; ``--dp-epsilon nan`` turned DP off with exit 0, ``inf``
failed later at the site; a non-UTF-8 ``--data-path`` and ``--cert-days 3000000`` gave
tracebacks; a DEL in ``--data-path`` wrote a node-config.toml no TOML reader accepts.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import tomli as tomllib
from cryptography import x509

import deploy.tree
from deploy.config_text import toml_str
from deploy.init import InitOptions, init_main, node_config_toml
from deploy.sites import site_keys

ROOT = Path(__file__).resolve().parents[2]


def _snapshot(root: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every path under ``root``: content (None for folders) and mode."""
    out = {}
    for path in sorted(root.rglob("*")):
        mode = stat.S_IMODE(path.lstat().st_mode)
        out[path.relative_to(root).as_posix()] = (path.read_bytes() if path.is_file() else None, mode)
    return out


@pytest.fixture
def three_sites(tmp_path: Path) -> Path:
    out = tmp_path / "dep"
    assert init_main([str(out), "--sites", "site-a,site-b,site-c", "--dp-epsilon", "4"]) == 0
    # things deploy init did not write: they must survive a --force
    (out / "superlink" / "notes.txt").write_text("coordinator notes")
    (out / "superlink" / "flwr-home" / "credentials").mkdir()
    (out / "superlink" / "flwr-home" / "credentials" / "token").write_text("t")
    (out / "sites" / "site-c" / "site-c-contact.txt").write_text("call Bob")
    return out


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_force_with_fewer_sites_leaves_exactly_the_listed_sites(three_sites: Path) -> None:
    old_ca = (three_sites / "ca" / "ca.crt").read_bytes()
    assert init_main([str(three_sites), "--sites", "site-a,site-c", "--force"]) == 0
    # site-b is gone everywhere: its key is not registered by register-sites.sh any more
    assert not (three_sites / "sites" / "site-b").exists()
    assert sorted(p.name for p in (three_sites / "superlink" / "site-keys").iterdir()) == ["site-a.pub", "site-c.pub"]
    assert set(site_keys(three_sites / "superlink")) == {"site-a", "site-c"}
    # one new CA, everywhere, and the SuperLink certificate is signed by it
    new_ca = (three_sites / "ca" / "ca.crt").read_bytes()
    assert new_ca != old_ca
    copies = [three_sites / "superlink" / "ca.crt",
              *(three_sites / "sites" / s / "ca.crt" for s in ("site-a", "site-c"))]
    for copy in copies:
        assert copy.read_bytes() == new_ca
    _cert(three_sites / "superlink" / "superlink.crt").verify_directly_issued_by(_cert(three_sites / "ca" / "ca.crt"))
    for site in ("site-a", "site-c"):
        assert (three_sites / "sites" / site / "auth.key.pub").read_bytes() == \
            (three_sites / "superlink" / "site-keys" / f"{site}.pub").read_bytes()
    # what deploy init did not write is still there; secrets still owner-only
    assert (three_sites / "superlink" / "notes.txt").read_text() == "coordinator notes"
    assert (three_sites / "superlink" / "flwr-home" / "credentials" / "token").read_text() == "t"
    assert (three_sites / "sites" / "site-c" / "site-c-contact.txt").read_text() == "call Bob"
    for secret in (three_sites / "ca" / "ca.key", three_sites / "sites" / "site-a" / "auth.key"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    for folder in (three_sites / "ca", three_sites / "sites" / "site-a"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert sorted(p.name for p in three_sites.parent.iterdir()) == ["dep"]  # no temporary folders left


def test_force_that_fails_while_writing_changes_nothing(three_sites: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    before = _snapshot(three_sites)
    real = deploy.tree._write_file
    calls = []

    def failing(path: Path, data: bytes, mode: int) -> None:
        calls.append(path)
        if len(calls) == 12:  # CA and SuperLink written, half way through the sites
            raise OSError(28, "No space left on device", str(path))
        real(path, data, mode)

    monkeypatch.setattr(deploy.tree, "_write_file", failing)
    assert init_main([str(three_sites), "--sites", "site-a,site-b", "--force"]) == 2
    assert "nothing was changed" in capsys.readouterr().err
    assert len(calls) == 12
    assert _snapshot(three_sites) == before  # old CA key, old certs, all three sites, as they were
    assert sorted(p.name for p in three_sites.parent.iterdir()) == ["dep"]


def test_force_that_fails_at_the_swap_puts_everything_back(three_sites: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _snapshot(three_sites)

    def no_swap(staging: Path, root: Path) -> Path:
        assert (staging / "superlink" / "notes.txt").is_file()  # carried over by then
        raise OSError(5, "Input/output error", str(root))

    monkeypatch.setattr(deploy.tree, "_swap_in", no_swap)
    assert init_main([str(three_sites), "--sites", "site-a", "--force"]) == 2
    assert _snapshot(three_sites) == before
    assert sorted(p.name for p in three_sites.parent.iterdir()) == ["dep"]


def test_force_refuses_while_a_superlink_database_registers_the_old_keys(three_sites: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    (three_sites / "superlink" / "state").mkdir()
    (three_sites / "superlink" / "state" / "superlink.db").write_bytes(b"SQLite format 3\0")
    before = _snapshot(three_sites)
    assert init_main([str(three_sites), "--sites", "site-a", "--force"]) == 2
    assert "holds a SuperLink database" in capsys.readouterr().err
    assert _snapshot(three_sites) == before


def test_a_symlinked_deployment_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert init_main([str(tmp_path / "link"), "--sites", "a", "--force"]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert list((tmp_path / "real").iterdir()) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dp-epsilon", "nan"], "--dp-epsilon nan: give a finite number"),
        (["--dp-epsilon", "inf"], "--dp-epsilon inf: give a finite number"),
        (["--dp-epsilon=-inf"], "--dp-epsilon -inf"),
        (["--dp-delta", "nan"], "--dp-delta nan"),
        (["--dp-max-grad-norm", "inf"], "--dp-max-grad-norm inf"),
        (["--cert-days", "3000000"], "--cert-days 3000000: give 1 to 3650 days"),
        (["--cert-days", "0"], "--cert-days 0"),
        (["--data-path", "/data/site\x7f/{site}"], "control character (U+007F at position 10)"),
        (["--state-dir", "/state/\x1b[0m{site}"], "control character (U+001B"),
        (["--data-path", "/data/{site.upper}"], "only '{site}' may appear in braces"),
        (["--data-path", os.fsdecode(b"/data/\xff/{site}")], "is not valid UTF-8"),
    ],
)
def test_bad_values_are_refused_with_their_name(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               args: list[str], message: str) -> None:
    assert init_main([str(tmp_path / "d"), "--sites", "a", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()


def test_non_utf8_arguments_from_a_real_shell_give_an_error_not_a_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LC_ALL": "C.UTF-8"}
    for extra in ([b"--data-path", b"/data/\xff\xfe/{site}"], [b"--sites", b"s\xff"]):
        out = subprocess.run([sys.executable, "-m", "deploy.init", os.fsencode(tmp_path / "d"), b"--sites", b"a",
                              *extra], env=env, capture_output=True, timeout=60)
        assert out.returncode == 2, out.stderr
        assert b"error:" in out.stderr and b"Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "deploy.init", os.fsencode(tmp_path) + b"/d\xff", b"--sites", b"a"],
                         env=env, capture_output=True, timeout=60)
    assert out.returncode == 2 and b"not valid UTF-8" in out.stderr and b"Traceback" not in out.stderr


@pytest.mark.parametrize("char", [chr(c) for c in (*range(0x20), 0x7F)] + ['"', "\\", "é", "\u2028"])
def test_toml_strings_round_trip_every_control_character(char: str) -> None:
    value = f"/data/a{char}b"
    assert tomllib.loads(f"k = {toml_str(value)}\n")["k"] == value


def test_node_config_with_a_del_character_still_parses(tmp_path: Path) -> None:
    """Defence in depth: the writer escapes what the command line already refuses."""
    opts = InitOptions(out_dir=tmp_path, sites=("a",), hosts=("localhost",), data_path="/d\x7f/{site}")
    assert tomllib.loads(node_config_toml(opts, "a"))["data-path"] == "/d\x7f/a"


def test_a_folder_that_is_not_a_deployment_is_never_swapped(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``deploy init .`` in a checkout or a home folder must not move that folder's files around."""
    home = tmp_path / "home"
    (home / "projects").mkdir(parents=True)
    (home / "projects" / "notes.md").write_text("mine")
    before = _snapshot(home)
    for force in ([], ["--force"]):
        assert init_main([str(home), "--sites", "a", *force]) == 2
        assert "holds no deployment" in capsys.readouterr().err
    assert _snapshot(home) == before
    # nor a deployment the shell is standing in (it would be left in a deleted folder)
    assert init_main([str(tmp_path / "dep"), "--sites", "a"]) == 0
    monkeypatch.chdir(tmp_path / "dep" / "superlink")
    before = _snapshot(tmp_path / "dep")
    assert init_main([str(tmp_path / "dep"), "--sites", "a", "--force"]) == 2
    assert "contains the current folder" in capsys.readouterr().err
    assert _snapshot(tmp_path / "dep") == before
