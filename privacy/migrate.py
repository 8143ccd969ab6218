"""Opening a site's ledger for training, and moving version-1 ledgers into it explicitly.

A version-1 file (``ledger-<id>.json``) whose id is the current ``dataset.json``'s version-1 id
holds exactly this training list's spend: it is charged to every current training case and
renamed ``*.migrated`` (kept, never deleted). Any other version-1 file cannot be attributed to
cases (its training list changed since), so training is refused until the site decides:
``fedimaging privacy migrate DATA_PATH FILE`` charges it to every current training case (the
safe, over-counting choice), or the site moves the file away if it belongs to another dataset.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from privacy.ledger import PrivacyLedger
from privacy.ledger_v1 import LedgerError, V1_NAME_RE, dataset_id_for, read_v1

log = logging.getLogger("fedimaging.privacy")
MIGRATED_SUFFIX = ".migrated"


def migrate_file(state_dir: str | os.PathLike, path: str | os.PathLike, cases: Sequence[Sequence[str]],
                 mechanism: str | None = None) -> PrivacyLedger:
    """Charge one version-1 ledger to ``cases`` in the site ledger, then rename it ``*.migrated``."""
    path = Path(path)
    ledger = PrivacyLedger(state_dir, mechanism)
    if path.parent.resolve() != ledger.dir.resolve() or not V1_NAME_RE.match(path.name):
        raise LedgerError(f"{path}: not a version-1 ledger of the state folder {ledger.dir}")
    old = read_v1(path)
    if not cases:
        raise LedgerError(f"{path}: no training cases to charge it to")
    ledger.absorb_v1(old, cases, hashlib.sha256(path.read_bytes()).hexdigest())
    os.replace(path, path.with_name(path.name + MIGRATED_SUFFIX))
    log.warning("Privacy ledger %s (version 1, %d steps) charged to all %d current training cases; kept as %s",
                path, sum(s[3] for s in old.segments), len(cases), path.name + MIGRATED_SUFFIX)
    ledger.reload()
    return ledger


def open_for_training(state_dir: str | os.PathLike, data_path: str | os.PathLike | None,
                      cases: Sequence[Sequence[str]], mechanism: str | None = None) -> PrivacyLedger:
    """The site ledger, with this dataset's own version-1 ledger migrated; LedgerError for any other."""
    ledger = PrivacyLedger(state_dir, mechanism)
    legacy = ledger.legacy_files()
    if legacy:
        own = f"ledger-{dataset_id_for(data_path)}.json" if data_path is not None else None
        for path in legacy:
            if path.name == own:
                migrate_file(state_dir, path, cases, mechanism)
        left = ledger.legacy_files()
        if left:
            names = ", ".join(p.name for p in left)
            raise LedgerError(
                f"old privacy ledger(s) {names} in {ledger.dir} belong to an earlier training list "
                f"(version 1 kept one ledger per list); their spend cannot be attributed to cases. If "
                f"they were spent on this dataset's patients run 'fedimaging privacy migrate "
                f"{data_path} --state-dir {state_dir} FILE...' (charges them to every current training "
                f"case); if they belong to another dataset, move them out of {ledger.dir}."
            )
    ledger.reload()
    if ledger.ledger_id is None:
        log.warning(
            "No privacy ledger in %s yet: DP training starts from 0 for these %d cases. If they were "
            "trained with DP before under another state-dir, stop and point state-dir at that state "
            "(fedimaging cannot tell).", ledger.dir, len(cases))
    return ledger
