"""One site's settings, from its ``node_config`` (deployment) or the run config (simulation).

Site settings come from ``node_config`` and run settings from ``run_config`` (DESIGN 4); the
run config only fills in what a simulated site has no node config for.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.config_values import ConfigError

if TYPE_CHECKING:
    from app.config import RunConfig


@dataclass(frozen=True)
class SiteConfig:
    """One site's settings (``node_config``); simulation fills them from the run config."""

    data_path: Path | None
    site_name: str
    state_dir: Path
    dp_epsilon: float = 0.0
    dp_delta: float = 0.0
    dp_max_grad_norm: float = 1.0
    is_demo: bool = False
    he_context: Path | None = None  # node config 'he-context': the site's CKKS key file
    disk_cache_mb: int = 20480  # node config 'disk-cache-mb' (the site's disk), else the run config's


def parse_site_config(node_config: Mapping[str, Any], run: RunConfig) -> SiteConfig:
    """Deployed: ``data-path`` (required) etc. Simulation: site chosen by ``partition-id``."""
    def number(key: str, default: float) -> float:
        try:
            return float(node_config.get(key, default))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"node config '{key}': expected a number, got {node_config.get(key)!r}") from exc

    dp = dict(
        dp_epsilon=number("dp-epsilon", run.dp_epsilon),
        dp_delta=number("dp-delta", run.dp_delta),
        dp_max_grad_norm=number("dp-max-grad-norm", run.dp_max_grad_norm),
        disk_cache_mb=max(0, int(number("disk-cache-mb", run.disk_cache_mb))),
    )
    if "data-path" in node_config:
        data_path = Path(str(node_config["data-path"])).expanduser()
        site_name = str(node_config.get("site-name") or data_path.name)
        state = node_config.get("state-dir") or (data_path / "private" / "state")
        he_context = Path(str(node_config["he-context"])).expanduser() if node_config.get("he-context") else None
        return SiteConfig(data_path, _safe_site(site_name), Path(str(state)).expanduser(), he_context=he_context, **dp)
    if "partition-id" not in node_config:
        raise ConfigError(
            "node config has neither 'data-path' (deployment) nor 'partition-id' (simulation); "
            "start the SuperNode with --node-config \"data-path='/path/to/site-dataset' site-name='...'\""
        )
    partition = int(node_config["partition-id"])
    from data_prep.demo import demo_site_names  # local import: only simulation needs it

    if run.uses_demo:
        names = demo_site_names(run.demo_sites)
        if partition >= len(names):
            raise ConfigError(
                f"simulation has more SuperNodes than demo sites ({len(names)}): run with "
                f"--federation-config \"num-supernodes={len(names)}\" or set demo-sites"
            )
        site = names[partition]
        return SiteConfig(None, site, run.state_root_path / site, is_demo=True, **dp)
    site = f"site-{partition}"
    path = Path(run.data_path_template.format(site=site, partition=partition)).expanduser()
    return SiteConfig(path, site, run.state_root_path / site, **dp)


def _safe_site(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
        raise ConfigError(f"node config 'site-name' {name!r}: use letters, digits, '.', '_' or '-' (max 64)")
    return name
