"""``fedimaging privacy show|migrate``: what a site's ledger holds, and moving old ledgers into it.

``show [DATA_PATH] [--state-dir DIR | --node-config FILE] [--json]``: the state folder is
``--state-dir``, else the node config's ``state-dir`` (``deploy init`` always sets one), else
``DATA_PATH/private/state``; with a dataset (DATA_PATH or the node config's ``data-path``) it
also says what that training set has spent. ``migrate DATA_PATH FILE...`` charges version-1
ledgers to every current training case (see :mod:`privacy.migrate`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

from privacy.ledger import LedgerError, PrivacyLedger
from privacy.ledger_v1 import read_v1
from privacy.migrate import migrate_file
from privacy.session import default_state_dir
from privacy.units import case_units, training_case_names
from privacy.view import format_ledger, ledger_summary


class UsageError(ValueError):
    """A bad argument or node config; the message names it."""


def _add_location(parser: argparse.ArgumentParser, data_required: bool) -> None:
    parser.add_argument("data_path", metavar="DATA_PATH", nargs=None if data_required else "?",
                        help="the site dataset folder (with dataset.json)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--state-dir", help="site-private state folder (default: the node config's, else "
                                           "DATA_PATH/private/state)")
    where.add_argument("--node-config", help="the site's node-config.toml (as written by 'deploy init'): "
                                             "its state-dir, data-path, dp-epsilon and dp-delta")


def _node_config(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            config = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read node config {path}: {exc}") from None
    for key in ("data-path", "state-dir"):
        if key in config and not isinstance(config[key], str):
            raise UsageError(f"node config {path}: '{key}' must be a string")
    for key in ("dp-epsilon", "dp-delta"):
        if key in config and (isinstance(config[key], bool) or not isinstance(config[key], (int, float))):
            raise UsageError(f"node config {path}: '{key}' must be a number")
    return config


def _locate(args: argparse.Namespace) -> tuple[Path | None, Path, dict[str, Any]]:
    """(dataset folder or None, state folder, node config) from the arguments."""
    config = _node_config(args.node_config) if args.node_config else {}
    raw_data = args.data_path or config.get("data-path")
    data = Path(raw_data).expanduser() if raw_data else None
    if args.state_dir:
        state = Path(args.state_dir).expanduser()
    elif config.get("state-dir"):
        state = Path(config["state-dir"]).expanduser()
    elif data is not None:
        state = default_state_dir(data)
    else:
        raise UsageError("give DATA_PATH, --state-dir or --node-config")
    if data is not None and not data.is_dir() and not (args.state_dir or config.get("state-dir")):
        raise UsageError(f"dataset folder {data} does not exist (or set --state-dir / --node-config)")
    return data, state, config


def show_main(argv: list[str] | None = None) -> int:
    """Print the site ledger of a state folder; 0 fine, 1 a ledger cannot be trusted, 2 usage."""
    parser = argparse.ArgumentParser(
        prog="fedimaging privacy show",
        description="Show a site's DP-SGD privacy ledger: studies, steps, noise, epsilon spent and budget.",
    )
    _add_location(parser, data_required=False)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        data, state, config = _locate(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = False
    try:
        ledger = PrivacyLedger.load(state)
    except LedgerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    legacy = []
    for path in ledger.legacy_files():
        try:
            old = read_v1(path)
            legacy.append({"file": str(path), "steps": sum(s[3] for s in old.segments),
                           "runs": sorted({s[0] for s in old.segments})})
        except LedgerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed = True
    cases = None
    if data is not None and (data / "dataset.json").is_file():
        try:
            cases = case_units(data, training_case_names(data))
        except LedgerError as exc:
            print(f"warning: {exc}", file=sys.stderr)
    budget = config.get("dp-epsilon") or ledger.epsilon_budget
    delta = config.get("dp-delta") or ledger.delta
    try:
        if args.json:
            print(json.dumps(ledger_summary(ledger, state, cases, budget, delta, legacy), indent=2))
        else:
            print(format_ledger(ledger, state, cases, budget, delta, legacy))
    except ValueError as exc:  # e.g. a dp-delta outside (0, 1) in the node config
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1 if failed else 0


def migrate_main(argv: list[str] | None = None) -> int:
    """Charge version-1 ledger files to every current training case of DATA_PATH; exit 0 or 1."""
    parser = argparse.ArgumentParser(
        prog="fedimaging privacy migrate",
        description="Charge old (version 1) per-training-list ledgers to every current training case of "
                    "DATA_PATH in the site ledger (over-counts, never under-counts); each file is kept "
                    "as FILE.migrated.",
    )
    _add_location(parser, data_required=True)
    parser.add_argument("files", nargs="+", metavar="FILE", help="ledger-<id>.json files in the state folder")
    args = parser.parse_args(argv)
    try:
        data, state, _ = _locate(args)
        cases = case_units(data, training_case_names(data))
        for name in args.files:
            path = Path(name) if Path(name).parent != Path(".") else state / "privacy" / name
            migrate_file(state, path, cases)
            print(f"{path.name}: charged to all {len(cases)} training cases of {data}")
    except (UsageError, LedgerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(show_main())
