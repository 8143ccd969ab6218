"""``fedimaging deploy init``: certificates, keys and configs in the formats Flower 1.41 loads."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
import tomli as tomllib
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from cryptography.x509.oid import ExtensionOID
from flwr.cli.supernode.register import try_load_public_key
from flwr.common.config import parse_config_args

from deploy.init import init_main

SITES = ("site-a", "site-b", "site-c")


@pytest.fixture
def deployment(tmp_path: Path) -> Path:
    out = tmp_path / "dep"
    rc = init_main([str(out), "--sites", ",".join(SITES), "--superlink-host", "link.hospital.example",
                    "--superlink-host", "10.1.2.3", "--superlink-port", "9443",
                    "--data-path", "/data/{site}/prepared", "--dp-epsilon", "4"])
    assert rc == 0
    return out


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_superlink_certificate_is_signed_by_the_ca_and_names_the_hosts(deployment: Path) -> None:
    ca = _cert(deployment / "ca" / "ca.crt")
    server = _cert(deployment / "superlink" / "superlink.crt")
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"link.hospital.example", "localhost"}
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    # the server key matches the certificate
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    key = load_pem_private_key((deployment / "superlink" / "superlink.key").read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    # the copies of the CA certificate are identical
    for copy in [deployment / "superlink" / "ca.crt", *(deployment / "sites" / s / "ca.crt" for s in SITES)]:
        assert copy.read_bytes() == (deployment / "ca" / "ca.crt").read_bytes()


def test_site_keys_load_like_flower_loads_them(deployment: Path) -> None:
    publics = set()
    for site in SITES:
        d = deployment / "sites" / site
        private = load_ssh_private_key((d / "auth.key").read_bytes(), None)  # as flower-supernode does
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        public = load_ssh_public_key((d / "auth.key.pub").read_bytes())
        assert public.public_numbers() == private.public_key().public_numbers()
        # what `flwr supernode register` accepts (NIST curve, OpenSSH public key)
        assert try_load_public_key(deployment / "superlink" / "site-keys" / f"{site}.pub")
        registered = deployment / "superlink" / "site-keys" / f"{site}.pub"
        assert registered.read_bytes() == (d / "auth.key.pub").read_bytes()
        publics.add(public.public_numbers())
    assert len(publics) == len(SITES)  # one key pair per site


def test_private_keys_are_owner_only(deployment: Path) -> None:
    private = [deployment / "ca" / "ca.key", deployment / "superlink" / "superlink.key",
               *(deployment / "sites" / s / "auth.key" for s in SITES)]
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in deployment.rglob("*"):
        if path.is_file() and path not in private and path.name != "config.toml":
            assert not stat.S_IMODE(path.stat().st_mode) & 0o022, path  # nothing world/group writable
    # the site folder holds no other site's secret and no CA key
    a = {p.name for p in (deployment / "sites" / "site-a").iterdir()}
    assert a == {"ca.crt", "auth.key", "auth.key.pub", "node-config.toml", "site.env"}


def test_node_config_is_what_flower_supernode_reads(deployment: Path) -> None:
    for site in SITES:
        path = deployment / "sites" / site / "node-config.toml"
        parsed = parse_config_args([str(path)])  # flower-supernode --node-config FILE.toml
        assert parsed == tomllib.loads(path.read_text())
        assert parsed["data-path"] == f"/data/{site}/prepared"
        assert parsed["site-name"] == site
        assert parsed["state-dir"] == f"/srv/fedimaging/{site}/state"
        assert parsed["dp-epsilon"] == 4.0 and parsed["dp-delta"] == 1e-5 and parsed["dp-max-grad-norm"] == 1.0


def test_dp_off_leaves_dp_keys_out(tmp_path: Path) -> None:
    assert init_main([str(tmp_path / "d"), "--sites", "x", "--dp-epsilon", "0"]) == 0
    parsed = tomllib.loads((tmp_path / "d" / "sites" / "x" / "node-config.toml").read_text())
    assert not any(k.startswith("dp-") for k in parsed)


def test_connection_entry_is_read_by_the_flwr_cli(deployment: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.cli.flower_config import read_superlink_connection

    monkeypatch.setenv("FLWR_HOME", str(deployment / "superlink" / "flwr-home"))
    conn = read_superlink_connection(None)  # the default connection
    assert conn.name == "fedimaging"
    assert conn.address == "link.hospital.example:9443"
    assert Path(conn.root_certificates) == (deployment / "superlink" / "ca.crt").resolve()
    assert not conn.insecure
    snippet = tomllib.loads((deployment / "superlink" / "flwr-connection.toml").read_text())
    assert snippet["superlink"]["fedimaging"] == {"address": conn.address, "root-certificates": conn.root_certificates}


def test_existing_files_are_not_overwritten_without_force(deployment: Path, capsys: pytest.CaptureFixture) -> None:
    before = {p: p.read_bytes() for p in deployment.rglob("*") if p.is_file()}
    capsys.readouterr()
    rc = init_main([str(deployment), "--sites", ",".join(SITES)])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(deployment / "ca" / "ca.crt") in err and "--force" in err
    assert {p: p.read_bytes() for p in deployment.rglob("*") if p.is_file()} == before
    # one existing file is enough to refuse, and nothing else is written
    other = deployment.parent / "other"
    (other / "sites" / "site-b").mkdir(parents=True)
    (other / "sites" / "site-b" / "auth.key").write_text("keep me")
    assert init_main([str(other), "--sites", "site-a,site-b"]) == 2
    assert str(other / "sites" / "site-b" / "auth.key") in capsys.readouterr().err
    assert [p.name for p in other.rglob("*") if p.is_file()] == ["auth.key"]
    # --force regenerates everything (new CA)
    assert init_main([str(deployment), "--sites", ",".join(SITES), "--force"]) == 0
    assert (deployment / "ca" / "ca.crt").read_bytes() != before[deployment / "ca" / "ca.crt"]
    assert stat.S_IMODE((deployment / "sites" / "site-a" / "auth.key").stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sites", ""], "at least one site"),
        (["--sites", "a,b,a"], "duplicate"),
        (["--sites", "../evil"], "not a valid site name"),
        (["--sites", "a", "--superlink-host", "bad host!"], "neither an IP address nor a DNS name"),
        (["--sites", "a", "--superlink-port", "70000"], "not a TCP port"),
        (["--sites", "a", "--data-path", "/x/{hospital}"], "--data-path"),
        (["--sites", "a", "--dp-epsilon", "-1"], "DP settings"),
    ],
)
def test_bad_arguments_are_named(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str) -> None:
    assert init_main([str(tmp_path / "d"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
