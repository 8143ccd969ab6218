"""``fedimaging deploy init --secure-aggregation he``: one CKKS context for the whole federation.

Every site folder gets the full context (secret key included, 0600) as ``he-context.ckks`` and a
``he-context`` line in its node config; the coordinator's folder gets the public context only
(``superlink/he-public-context.ckks``), to be passed as run config ``he-public-context``. The
secret key is never written into ``superlink/``. Formats: :mod:`privacy.he_keys`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

SITE_KEY = "he-context.ckks"
PUBLIC_KEY = "he-public-context.ckks"
MODES = ("off", "he")


def target_paths(root: Path, sites: Sequence[str]) -> list[Path]:
    """The key files ``deploy init`` writes with ``--secure-aggregation he``."""
    return [root / "superlink" / PUBLIC_KEY] + [root / "sites" / s / SITE_KEY for s in sites]


def owned_files(root: Path) -> set[str]:
    """Key files of an earlier deployment (so ``--force`` without ``he`` removes them)."""
    owned = {f"superlink/{PUBLIC_KEY}"}
    for site_dir in (root / "sites").glob("*"):
        if site_dir.is_dir() and not site_dir.is_symlink():
            owned.add(f"sites/{site_dir.name}/{SITE_KEY}")
    return owned


def key_files(root: Path, sites: Sequence[str], files: dict[Path, tuple[bytes, int]],
              private: int, public: int) -> dict[Path, tuple[bytes, int]]:
    """The key files, and each site's node config with its ``he-context`` line added."""
    from privacy import he_keys  # local: TenSEAL only when asked for

    ctx, key_id = he_keys.new_context()
    site_file = he_keys.encode(ctx, key_id, secret=True)
    out = {root / "superlink" / PUBLIC_KEY: (he_keys.encode(he_keys.public_copy(ctx), key_id, secret=False), public)}
    for site in sites:
        site_dir = root / "sites" / site
        out[site_dir / SITE_KEY] = (site_file, private)
        text, mode = files[site_dir / "node-config.toml"]
        line = (f"# Encrypted aggregation (secure-aggregation=he): this site's CKKS key (secret; key id {key_id}).\n"
                f"# Edit the path if this folder is copied elsewhere.\n"
                f"he-context = {json.dumps(str((site_dir / SITE_KEY).resolve()))}\n")
        out[site_dir / "node-config.toml"] = (text + line.encode(), mode)
    return out
