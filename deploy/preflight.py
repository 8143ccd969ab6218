"""Check a site's setup before its SuperNode starts (``deploy/start-site.sh`` runs this).

The ClientApp refuses to train on a bad ``data-path`` too, but only once a run reaches the site;
checking at start-up tells the site's operator at once, naming the file that is wrong.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # Python 3.10: Flower depends on tomli
    import tomli as tomllib

REQUIRED_KEYS = ("data-path", "site-name", "state-dir")


class PreflightError(ValueError):
    """The site is not ready; the message names the file or key to fix."""


def check_node_config(path: Path) -> dict:
    """Parse ``node-config.toml`` and check that its ``data-path`` is a valid site dataset."""
    from data_prep.site_dataset import DatasetError, load_site_dataset

    try:
        config = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PreflightError(f"{path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PreflightError(f"{path} is not valid TOML: {exc}") from None
    for key in REQUIRED_KEYS:
        if not str(config.get(key, "")).strip():
            raise PreflightError(f"{path}: '{key}' is not set")
    try:
        load_site_dataset(config["data-path"])
    except DatasetError as exc:
        raise PreflightError(f"{path}: data-path: {exc}") from None
    state = Path(str(config["state-dir"])).expanduser()
    try:
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise PreflightError(f"{path}: state-dir {state} cannot be created: {exc}") from None
    if not os.access(state, os.W_OK):
        raise PreflightError(f"{path}: state-dir {state} is not writable")
    return config


def check_auth_key(path: Path) -> None:
    """The SuperNode's private key must be an EC key in OpenSSH format, readable by its owner only."""
    try:
        mode = path.stat().st_mode
        key = load_ssh_private_key(path.read_bytes(), None)
    except FileNotFoundError:
        raise PreflightError(f"{path} does not exist") from None
    except (ValueError, TypeError) as exc:
        raise PreflightError(f"{path} is not an OpenSSH private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PreflightError(f"{path} is not an elliptic-curve key (Flower SuperNode auth needs one)")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PreflightError(f"{path} is readable by others (mode {stat.S_IMODE(mode):o}); run chmod 600")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.preflight", description=__doc__)
    parser.add_argument("node_config", type=Path)
    parser.add_argument("--auth-key", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        config = check_node_config(args.node_config)
        if args.auth_key is not None:
            check_auth_key(args.auth_key)
    except PreflightError as exc:
        print(f"preflight: {exc}", file=sys.stderr)
        return 1
    print(f"preflight: site {config['site-name']} ready (dataset {config['data-path']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
