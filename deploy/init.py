"""``fedimaging deploy init``: everything a coordinator and its sites need to start a federation.

One command writes a CA, the SuperLink's TLS certificate, an authentication key pair and a node
config per site, and the ``flwr`` connection entry, into a folder split by who keeps what:

    DIR/ca/                 CA key (keep offline; only needed to re-issue the SuperLink cert)
    DIR/superlink/          SuperLink cert + key, CA cert, sites' public keys, flwr connection
    DIR/sites/<site>/       per site: CA cert, auth key pair, node-config.toml, site.env

Private keys are written with mode 0600; nothing that exists is overwritten without ``--force``.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from deploy import pki
from deploy.config_text import DeployInitError, check_path_option, toml_str
from deploy.tree import replace_folder

SITE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_PORT = 8000  # Flower 1.41 SuperLink: Fleet, Control and Runtime APIs on one HTTPS port
CONNECTION_NAME = "fedimaging"
PRIVATE = 0o600
PUBLIC = 0o644


@dataclass(frozen=True)
class InitOptions:
    """What ``deploy init`` writes (parsed from the command line)."""

    out_dir: Path
    sites: tuple[str, ...]
    hosts: tuple[str, ...]
    port: int = DEFAULT_PORT
    data_path: str = "/srv/fedimaging/{site}/dataset"
    state_dir: str = "/srv/fedimaging/{site}/state"
    dp_epsilon: float = 8.0
    dp_delta: float = 1e-5
    dp_max_grad_norm: float = 1.0
    ca_days: int = 3650
    cert_days: int = 825
    connection: str = CONNECTION_NAME
    force: bool = False


def parse_sites(raw: str) -> tuple[str, ...]:
    """``"a,b,c"`` -> ``("a", "b", "c")``; names become folder names and ``site-name`` values."""
    sites = tuple(s.strip() for s in raw.split(",") if s.strip())
    if not sites:
        raise DeployInitError("--sites: give at least one site name, e.g. --sites site-a,site-b")
    for site in sites:
        if not SITE_NAME_RE.match(site):
            raise DeployInitError(
                f"--sites: {site!r} is not a valid site name (letters, digits, '.', '_', '-'; max 64)"
            )
    dupes = sorted({s for s in sites if sites.count(s) > 1})
    if dupes:
        raise DeployInitError(f"--sites: duplicate site name(s) {', '.join(dupes)}")
    return sites


def node_config_toml(opts: InitOptions, site: str) -> str:
    """The site's ``flower-supernode --node-config`` file (contract: DESIGN 3.3)."""
    lines = [
        f"# Node config of site {site!r} for `flower-supernode --node-config node-config.toml`.",
        "# Edit data-path and state-dir to this site's folders. Both stay at the site.",
        f"data-path = {toml_str(opts.data_path.format(site=site))}",
        f"site-name = {toml_str(site)}",
        f"state-dir = {toml_str(opts.state_dir.format(site=site))}",
    ]
    if opts.dp_epsilon > 0:
        lines += [
            "# Differential privacy (DP-SGD): the lifetime budget per patient at this site, over all studies.",
            f"dp-epsilon = {opts.dp_epsilon!r}",
            f"dp-delta = {opts.dp_delta!r}",
            f"dp-max-grad-norm = {opts.dp_max_grad_norm!r}",
        ]
    else:
        lines += [
            "# Differential privacy is OFF for this site. To turn it on, set for example:",
            "# dp-epsilon = 8.0",
            "# dp-delta = 1e-05",
            "# dp-max-grad-norm = 1.0",
        ]
    return "\n".join(lines) + "\n"


def connection_toml(opts: InitOptions, ca_cert: Path, with_header: bool) -> str:
    """The ``flwr`` connection entry (``[superlink.<name>]`` in ``$FLWR_HOME/config.toml``)."""
    host = opts.hosts[0]
    host = f"[{host}]" if ":" in host else host
    body = (
        f"[superlink.{opts.connection}]\n"
        f"address = {toml_str(f'{host}:{opts.port}')}\n"
        f"root-certificates = {toml_str(str(ca_cert))}\n"
    )
    if not with_header:
        return (
            "# Add this entry to ~/.flwr/config.toml (or $FLWR_HOME/config.toml), or use\n"
            "#   export FLWR_HOME=<this folder>/flwr-home\n"
            f"# then: flwr run . {opts.connection} --stream\n" + body
        )
    return f'[superlink]\ndefault = "{opts.connection}"\n\n' + body


def site_env(opts: InitOptions, site: str) -> str:
    """Shell variables read by ``deploy/start-site.sh``."""
    host = opts.hosts[0]
    host = f"[{host}]" if ":" in host else host
    return (
        f"# Read by deploy/start-site.sh for site {site}\n"
        f"SUPERLINK_ADDRESS={host}:{opts.port}\n"
        f"SITE_NAME={site}\n"
    )


def _plan(opts: InitOptions) -> dict[Path, tuple[bytes, int]]:
    """Every file to write, with its content and mode (generated before anything is written)."""
    root = opts.out_dir
    ca, ca_key = pki.make_ca(opts.ca_days)
    server = pki.make_server_cert(ca.cert_pem, ca_key, list(opts.hosts), opts.cert_days)
    link = root / "superlink"
    files: dict[Path, tuple[bytes, int]] = {
        root / "ca" / "ca.crt": (ca.cert_pem, PUBLIC),
        root / "ca" / "ca.key": (ca.key_pem, PRIVATE),
        link / "ca.crt": (ca.cert_pem, PUBLIC),
        link / "superlink.crt": (server.cert_pem, PUBLIC),
        link / "superlink.key": (server.key_pem, PRIVATE),
    }
    ca_abs = (link / "ca.crt").resolve()
    files[link / "flwr-connection.toml"] = (connection_toml(opts, ca_abs, False).encode(), PUBLIC)
    files[link / "flwr-home" / "config.toml"] = (connection_toml(opts, ca_abs, True).encode(), PRIVATE)
    for site in opts.sites:
        private, public = pki.make_auth_keypair(comment=f"fedimaging-{site}")
        site_dir = root / "sites" / site
        files[site_dir / "ca.crt"] = (ca.cert_pem, PUBLIC)
        files[site_dir / "auth.key"] = (private, PRIVATE)
        files[site_dir / "auth.key.pub"] = (public, PUBLIC)
        files[site_dir / "node-config.toml"] = (node_config_toml(opts, site).encode(), PUBLIC)
        files[site_dir / "site.env"] = (site_env(opts, site).encode(), PUBLIC)
        files[link / "site-keys" / f"{site}.pub"] = (public, PUBLIC)
    files[root / "README.txt"] = (_readme(opts).encode(), PUBLIC)
    return files


def _readme(opts: InitOptions) -> str:
    sites = ", ".join(opts.sites)
    return f"""fedimaging deployment material (see README.md "Deploy across sites").

ca/                 CA key and certificate. Keep ca.key OFFLINE; it is needed only to
                    re-issue the SuperLink certificate.
superlink/          Copy to the coordinator (SuperLink host). superlink.key is secret.
                    site-keys/*.pub are registered with deploy/register-sites.sh.
                    flwr-home/config.toml: export FLWR_HOME=.../superlink/flwr-home
                    then `flwr run . {opts.connection} --stream`.
sites/<site>/       Copy each folder to its site only ({sites}). auth.key is that
                    site's secret; node-config.toml says where its data lives.
SuperLink address:  {opts.hosts[0]}:{opts.port} (certificate valid for {", ".join(opts.hosts)},
                    localhost, 127.0.0.1).
"""


SITE_FILES = ("ca.crt", "auth.key", "auth.key.pub", "node-config.toml", "site.env")


def _owned_files(root: Path) -> set[str]:
    """Files under ``root`` that ``deploy init`` writes (of any earlier run, any site list)."""
    owned = {p.relative_to(root).as_posix() for p in _target_paths_for(root, ())}
    for key in (root / "superlink" / "site-keys").glob("*.pub"):
        owned.add(key.relative_to(root).as_posix())
    for site_dir in (root / "sites").glob("*"):
        if site_dir.is_dir() and not site_dir.is_symlink():
            owned.update(f"sites/{site_dir.name}/{name}" for name in SITE_FILES)
    return owned


def write_deployment(opts: InitOptions) -> list[Path]:
    """Write the deployment folder all or nothing; refuse (naming the file) to overwrite unless ``force``.

    With ``force`` the whole new deployment is built beside the old one and swapped in when complete
    (:func:`deploy.tree.replace_folder`): keys and folders of sites no longer listed go, files that
    ``deploy init`` did not write stay, and a failure leaves the old deployment untouched.
    """
    root = opts.out_dir
    if root.is_symlink() or (root.exists() and not root.is_dir()):
        raise DeployInitError(f"{root} is {'a symbolic link' if root.is_symlink() else 'not a folder'}; "
                              "give the deployment folder itself")
    if root.is_dir() and any(root.iterdir()):
        # The swap below replaces the folder itself: only ever a deployment's, never the caller's.
        if not any((root / rel).exists() for rel in _owned_files(root)):
            raise DeployInitError(f"{root} is not empty and holds no deployment; give a new folder, "
                                  "e.g. deployment/")
        if Path.cwd().resolve().is_relative_to(root.resolve()):
            raise DeployInitError(f"{root} contains the current folder; run deploy init from outside it")
    targets = _target_paths(opts)
    if not opts.force:
        for path in targets:
            if path.exists() or path.is_symlink():
                raise DeployInitError(f"{path} already exists; use --force to overwrite the deployment")
    else:
        database = root / "superlink" / "state"
        if database.is_dir() and any(database.iterdir()):
            raise DeployInitError(
                f"{database} holds a SuperLink database, which registers the current site keys; --force "
                "makes a new CA and new keys, so stop the SuperLink and move that folder away first"
            )
    files = _plan(opts)
    assert set(files) == set(targets)
    secret_dirs = {"ca", *(f"sites/{s}" for s in opts.sites)}
    try:
        replace_folder(
            root, {p.relative_to(root).as_posix(): content for p, content in files.items()},
            owned=_owned_files(root) if opts.force else set(),
            dir_modes={d: 0o700 for d in secret_dirs},
        )
    except OSError as exc:
        raise DeployInitError(f"writing {root} failed, nothing was changed: {exc}") from None
    return sorted(files)


def _target_paths(opts: InitOptions) -> list[Path]:
    return _target_paths_for(opts.out_dir, opts.sites)


def _target_paths_for(root: Path, sites: Sequence[str]) -> list[Path]:
    link = root / "superlink"
    paths = [
        root / "ca" / "ca.crt", root / "ca" / "ca.key", link / "ca.crt", link / "superlink.crt",
        link / "superlink.key", link / "flwr-connection.toml", link / "flwr-home" / "config.toml",
        root / "README.txt",
    ]
    for site in sites:
        d = root / "sites" / site
        paths += [d / name for name in SITE_FILES] + [link / "site-keys" / f"{site}.pub"]
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedimaging deploy init",
        description="Create the CA, SuperLink certificate, site key pairs and site configs of a deployment.",
    )
    parser.add_argument("dir", type=Path, help="output folder (created)")
    parser.add_argument("--sites", required=True, help="comma-separated site names, e.g. site-a,site-b,site-c")
    parser.add_argument(
        "--superlink-host", action="append", default=None, metavar="HOST",
        help="DNS name or IP the sites use to reach the SuperLink (repeat or comma-separate for "
        "several; the first is used in addresses). localhost and 127.0.0.1 are always included.",
    )
    parser.add_argument("--superlink-port", type=int, default=DEFAULT_PORT,
                        help=f"SuperLink HTTPS port (Fleet + Control API; default {DEFAULT_PORT})")
    parser.add_argument("--data-path", default=InitOptions.data_path,
                        help="site dataset path written to each node config; '{site}' is replaced")
    parser.add_argument("--state-dir", default=InitOptions.state_dir,
                        help="site-private state folder per node config; '{site}' is replaced")
    parser.add_argument("--dp-epsilon", type=float, default=InitOptions.dp_epsilon,
                        help="per-site DP budget written to node configs (0 = DP off; default 8)")
    parser.add_argument("--dp-delta", type=float, default=InitOptions.dp_delta)
    parser.add_argument("--dp-max-grad-norm", type=float, default=InitOptions.dp_max_grad_norm)
    parser.add_argument("--connection-name", default=CONNECTION_NAME,
                        help=f"name of the flwr connection entry (default {CONNECTION_NAME})")
    parser.add_argument("--cert-days", type=int, default=InitOptions.cert_days,
                        help="validity of the SuperLink certificate in days")
    parser.add_argument("--force", action="store_true", help="overwrite an existing deployment folder's files")
    return parser


def options_from_args(args: argparse.Namespace) -> InitOptions:
    hosts: list[str] = []
    for raw in args.superlink_host or ["localhost"]:
        for host in raw.split(","):
            if host.strip():
                try:
                    hosts.append(pki.validate_host(host))
                except ValueError as exc:
                    raise DeployInitError(str(exc)) from None
    if not hosts:
        raise DeployInitError("--superlink-host: give a host name or IP address")
    if not 1 <= args.superlink_port <= 65535:
        raise DeployInitError(f"--superlink-port {args.superlink_port} is not a TCP port")
    for key in ("data_path", "state_dir"):
        check_path_option("--" + key.replace("_", "-"), getattr(args, key))
    check_path_option("DIR", str(args.dir), template=False)
    for option, value in (("--dp-epsilon", args.dp_epsilon), ("--dp-delta", args.dp_delta),
                          ("--dp-max-grad-norm", args.dp_max_grad_norm)):
        if not math.isfinite(value):
            raise DeployInitError(f"{option} {value}: give a finite number (--dp-epsilon 0 turns DP off)")
    if args.dp_epsilon < 0 or (args.dp_epsilon > 0 and not 0 < args.dp_delta < 1) or args.dp_max_grad_norm <= 0:
        raise DeployInitError("DP settings: need --dp-epsilon >= 0, 0 < --dp-delta < 1, --dp-max-grad-norm > 0")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.connection_name):
        raise DeployInitError(f"--connection-name {args.connection_name!r}: letters, digits, '_' and '-' only")
    if not 1 <= args.cert_days <= InitOptions.ca_days:
        raise DeployInitError(f"--cert-days {args.cert_days}: give 1 to {InitOptions.ca_days} days (the CA is "
                              f"valid {InitOptions.ca_days} days and a certificate cannot outlive it)")
    return InitOptions(
        out_dir=args.dir.expanduser().absolute(), sites=parse_sites(args.sites), hosts=tuple(hosts),
        port=args.superlink_port, data_path=args.data_path, state_dir=args.state_dir,
        dp_epsilon=args.dp_epsilon, dp_delta=args.dp_delta, dp_max_grad_norm=args.dp_max_grad_norm,
        cert_days=args.cert_days, connection=args.connection_name, force=args.force,
    )


def init_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fedimaging deploy init``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        opts = options_from_args(args)
        write_deployment(opts)
    except DeployInitError as exc:
        print(f"fedimaging deploy init: error: {exc}", file=sys.stderr)
        return 2
    root = opts.out_dir
    print(f"Deployment written to {root}")
    print(f"  coordinator: {root / 'superlink'}  (start: deploy/start-superlink.sh {root / 'superlink'})")
    for site in opts.sites:
        print(f"  site {site}: {root / 'sites' / site}  (start: deploy/start-site.sh {root / 'sites' / site})")
    print(f"  register the sites: deploy/register-sites.sh {root / 'superlink'}")
    print(f"  keep {root / 'ca' / 'ca.key'} offline")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(init_main())
