"""Register the sites' public keys with the deployment's own SuperLink, and list sites by name.

Why not a bare ``flwr supernode register``: the ``flwr`` CLI reads whatever ``FLWR_HOME`` the
shell has, creates a default config there if none exists, and for that default (local)
connection starts a local, insecure SuperLink of its own. A registration sent there succeeds
and registers nothing on the study's SuperLink. Here the connection always comes from the
deployment folder written by ``deploy init`` (``superlink/flwr-home/config.toml``), must name a
TLS address (never Flower's ``:local:`` magic values), and every registration is checked
against the SuperLink's own node list afterwards.

    python -m deploy.sites register DEPLOY_DIR/superlink [--connection NAME] [site ...]
    python -m deploy.sites list DEPLOY_DIR/superlink [--connection NAME] [--all]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import tomli as tomllib

FLWR_HOME_DIR = "flwr-home"
_LOCAL_ADDRESSES = (":local:", ":local-in-memory:")


class SitesError(RuntimeError):
    """A deployment folder, connection, key or SuperLink answer that is not what it must be.

    ``status`` is the exit status: 2 for what is wrong before the SuperLink is asked (folder,
    connection, keys), 1 when the SuperLink does not answer or does not do what was asked.
    """

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Connection:
    """The deployment's connection entry, checked before the ``flwr`` machinery sees it."""

    name: str
    address: str
    flwr_home: Path


def deployment_connection(link_dir: Path, name: str | None = None) -> Connection:
    """The ``[superlink.<name>]`` entry of ``link_dir/flwr-home/config.toml`` (default: its default)."""
    config = link_dir / FLWR_HOME_DIR / "config.toml"
    if not config.is_file():
        raise SitesError(f"{config} is missing: {link_dir} is not the superlink/ folder of a "
                         "deployment (run 'fedimaging deploy init')")
    try:
        table = tomllib.loads(config.read_text(encoding="utf-8")).get("superlink", {})
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SitesError(f"{config} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise SitesError(f"cannot read {config}: {exc.strerror} (run as the user that owns the deployment)") from None
    name = name or table.get("default")
    entries = sorted(k for k, v in table.items() if isinstance(v, dict))
    if not name or name not in entries:
        raise SitesError(f"{config} has no connection {name!r} (it has: {', '.join(entries) or 'none'})")
    entry = table[name]
    address = entry.get("address")
    if not isinstance(address, str) or not address or address in _LOCAL_ADDRESSES:
        raise SitesError(f"connection {name!r} in {config} has no SuperLink address (a local simulation "
                         "connection); only a deployed SuperLink can register sites")
    if entry.get("insecure") is True or not entry.get("root-certificates"):
        raise SitesError(f"connection {name!r} in {config} does not use TLS with the deployment CA "
                         "(root-certificates missing or insecure = true)")
    ca = Path(str(entry["root-certificates"]))
    if not ca.is_file():
        raise SitesError(f"{ca} (root-certificates of connection {name!r} in {config}) is missing")
    return Connection(name=name, address=address, flwr_home=config.parent)


@contextlib.contextmanager
def control_client(conn: Connection) -> Iterator[object]:
    """Flower's Control API client for ``conn``, with ``FLWR_HOME`` pinned to the deployment's."""
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection

    saved = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(conn.flwr_home)
    client = None
    try:
        flwr_conn = read_superlink_connection(conn.name)
        if flwr_conn.address != conn.address:  # pragma: no cover - same file, read twice
            raise SitesError(f"flwr read address {flwr_conn.address!r} for {conn.name!r}, expected {conn.address!r}")
        client = init_http_client_from_connection(flwr_conn)
        yield client
    finally:
        if client is not None:
            client.close()
        if saved is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = saved


def _call(what: str, conn: Connection, fn, request):
    """One Control API call; Flower's own error translation, re-raised naming the SuperLink."""
    import click
    from flwr.cli.utils import flwr_cli_exc_handler

    try:
        with flwr_cli_exc_handler():
            return fn(request=request)
    except click.ClickException as exc:
        raise SitesError(f"{what} on SuperLink {conn.name} ({conn.address}) failed: {exc.message}", 1) from None


def public_key_bytes(path: Path) -> bytes:
    """The key as ``flwr supernode register`` sends it (OpenSSH EC key on a NIST curve -> PEM)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve

    if not path.is_file():
        raise SitesError(f"{path} is missing")
    try:
        key = load_ssh_public_key(path.read_bytes())
    except OSError as exc:
        raise SitesError(f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SitesError(f"{path} is not an OpenSSH public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not uses_nist_ec_curve(key):
        raise SitesError(f"{path} is not an elliptic-curve key on a NIST curve (what Flower accepts)")
    return public_key_to_bytes(key)


def site_keys(link_dir: Path, sites: Sequence[str] = ()) -> dict[str, Path]:
    """``site-keys/<site>.pub`` for ``sites`` (default: every key there), by site name."""
    folder = link_dir / "site-keys"
    if sites:
        return {site: folder / f"{site}.pub" for site in sites}
    keys = {p.stem: p for p in sorted(folder.glob("*.pub"))}
    if not keys:
        raise SitesError(f"no public keys in {folder}")
    return keys


def _nodes(client, conn: Connection) -> list:
    from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=no-name-in-module

    return list(_call("listing the SuperNodes", conn, client.ListNodes, ListNodesRequest()).nodes_info)


def register(link_dir: Path, connection: str | None = None, sites: Sequence[str] = (), out=sys.stdout) -> None:
    """Register each site's key (skip those already registered); verify all are listed afterwards."""
    from flwr.proto.control_pb2 import RegisterNodeRequest  # pylint: disable=no-name-in-module

    conn = deployment_connection(link_dir, connection)
    keys = {site: public_key_bytes(path) for site, path in site_keys(link_dir, sites).items()}
    with control_client(conn) as client:
        active = {n.public_key: n for n in _nodes(client, conn) if n.status != "unregistered"}
        for site, key in keys.items():
            if key in active:
                node = active[key]
                extra = f", registered as {node.name!r}" if node.name and node.name != site else ""
                print(f"already registered: {site} (node {node.node_id}{extra})", file=out)
                continue
            reply = _call(f"registering {site}", conn, client.RegisterNode,
                          RegisterNodeRequest(public_key=key, name=site))
            if not reply.node_id:
                raise SitesError(f"SuperLink {conn.name} ({conn.address}) did not register {site}", 1)
            print(f"registered {site}: node {reply.node_id} on {conn.name} ({conn.address})", file=out)
        listed = {n.public_key for n in _nodes(client, conn) if n.status != "unregistered"}
    missing = sorted(site for site, key in keys.items() if key not in listed)
    if missing:
        raise SitesError(f"SuperLink {conn.name} ({conn.address}) does not list {', '.join(missing)} "
                         "after registering", 1)


def list_sites(link_dir: Path, connection: str | None = None, include_unregistered: bool = False,
               out=sys.stdout) -> list[tuple[int, str, str]]:
    """Print (and return) node id, site (by public key in ``site-keys/``) and status of each node."""
    conn = deployment_connection(link_dir, connection)
    by_key: dict[bytes, str] = {}
    for site, path in site_keys(link_dir).items():
        with contextlib.suppress(SitesError):
            by_key[public_key_bytes(path)] = site
    with control_client(conn) as client:
        nodes = _nodes(client, conn)
    rows = [(n.node_id, by_key.get(n.public_key, f"(key not in site-keys/; registered as {n.name!r})"), n.status)
            for n in nodes if include_unregistered or n.status != "unregistered"]
    print(f"{'node id':>20}  {'status':<12}  site", file=out)
    for node_id, site, status in rows:
        print(f"{node_id:>20}  {status:<12}  {site}", file=out)
    return rows


def _parser(command: str) -> argparse.ArgumentParser:
    helps = {"register": "register site-keys/<site>.pub with the deployment's SuperLink, then check it lists them",
             "list": "the SuperLink's nodes, each with the site its public key belongs to"}
    prog = {"register": "fedimaging deploy register", "list": "fedimaging deploy sites"}[command]
    parser = argparse.ArgumentParser(prog=prog, description=helps[command])
    parser.add_argument("link_dir", type=Path, help="the deployment's superlink/ folder")
    parser.add_argument("--connection", default=None, help="connection name in its flwr-home (default: its default)")
    if command == "register":
        parser.add_argument("sites", nargs="*", help="site names (default: every key in site-keys/)")
    else:
        parser.add_argument("--all", action="store_true", help="also show unregistered nodes")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("register", "list"):
        print("usage: fedimaging deploy sites {register,list} DEPLOY_DIR/superlink [--connection NAME] ...\n"
              "  register [site ...]  register the sites' public keys (default: all in site-keys/)\n"
              "  list [--all]         node ids, status and site names", file=sys.stderr)
        return 2
    args = _parser(argv[0]).parse_intermixed_args(argv[1:])
    args.command = argv[0]
    given = os.environ.get("FLWR_HOME")
    mine = str((args.link_dir / FLWR_HOME_DIR).absolute())
    if given and Path(given).absolute() != Path(mine):
        print(f"note: ignoring FLWR_HOME={given}; using the deployment's {mine}", file=sys.stderr)
    try:
        if args.command == "register":
            register(args.link_dir, args.connection, args.sites)
        else:
            list_sites(args.link_dir, args.connection, args.all)
    except SitesError as exc:
        print(f"fedimaging deploy {'register' if args.command == 'register' else 'sites'}: error: {exc}",
              file=sys.stderr)
        return exc.status
    return 0


def register_main(argv: Sequence[str] | None = None) -> int:
    """``fedimaging deploy register DEPLOY_DIR/superlink [--connection NAME] [site ...]``."""
    return main(["register", *(sys.argv[1:] if argv is None else argv)])


def list_main(argv: Sequence[str] | None = None) -> int:
    """``fedimaging deploy sites DEPLOY_DIR/superlink [--connection NAME] [--all]``."""
    return main(["list", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
