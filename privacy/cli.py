"""``fedimaging privacy show DATA_PATH [--state-dir DIR] [--json]``: print a site's privacy ledgers."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from privacy.ledger import (
    LedgerError,
    PrivacyLedger,
    dataset_id_for,
    format_ledger,
    ledger_summary,
)
from privacy.session import default_state_dir


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedimaging privacy show",
        description="Show the DP-SGD privacy ledger(s) of a site: runs, steps, noise, epsilon spent and budget.",
    )
    parser.add_argument("data_path", metavar="DATA_PATH", help="the site dataset folder (with dataset.json)")
    parser.add_argument("--state-dir", help="site-private state folder (default: DATA_PATH/private/state)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def show_main(argv: list[str] | None = None) -> int:
    """Print every ledger in the state folder (the current dataset's first); returns an exit code."""
    args = _parser().parse_args(argv)
    data_path = Path(args.data_path)
    if args.state_dir is None and not data_path.is_dir():
        print(f"error: dataset folder {data_path} does not exist (or set --state-dir)", file=sys.stderr)
        return 2
    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir(data_path)
    current = None
    if (data_path / "dataset.json").is_file():
        try:
            current = dataset_id_for(data_path)
        except LedgerError as exc:
            print(f"warning: {exc}", file=sys.stderr)
    files = sorted((state_dir / "privacy").glob("ledger-*.json"))
    files.sort(key=lambda f: f.name != f"ledger-{current}.json")
    ledgers, failed = [], False
    for path in files:
        try:
            ledgers.append(PrivacyLedger.from_file(path))
        except LedgerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed = True
    if args.json:
        print(json.dumps({
            "state_dir": str(state_dir),
            "current_dataset_id": current,
            "ledgers": [dict(ledger_summary(ledger), current=ledger.dataset_id == current) for ledger in ledgers],
        }, indent=2))
    elif not ledgers and not failed:
        print(f"No privacy ledger in {state_dir / 'privacy'}: no DP training recorded for this site.")
    else:
        for i, ledger in enumerate(ledgers):
            if i:
                print()
            if ledger.dataset_id == current:
                print("Current dataset:")
            print(format_ledger(ledger))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(show_main())
