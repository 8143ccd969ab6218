"""A loopback deployment (real SuperLink, SuperNodes, TLS, ``flwr run``) with secure-aggregation=he.

Keys come from ``deploy init --secure-aggregation he``: each site's node config names its full
CKKS context, the coordinator runs with the public context from ``superlink/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep.demo import write_demo_site
from deploy.loopback import LoopbackFederation
from privacy import he_keys

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SITES = ("site-a", "site-b")
TINY = {
    "demo-size": "small", "spacing": "6,6,6", "roi-size": "16,16,16", "channels": "4,8",
    "num-res-units": 0, "crops-per-case": 1, "local-epochs": 1, "batch-size": 2, "torch-threads": 1,
    "cross-site": False, "seed": 3, "num-server-rounds": 1, "min-available-sites": 2, "demo": False,
}


def test_a_deployed_he_study_completes_and_the_coordinator_holds_no_secret_key(tmp_path: Path) -> None:
    data = {site: write_demo_site(tmp_path / "data" / site, site, seed=11, size="small") for site in SITES}
    fed = LoopbackFederation(tmp_path / "fed", data, secure_aggregation="he")
    try:
        fed.init()
        fed.start_superlink()
        reg = fed.register()
        assert reg.returncode == 0, reg.stdout + reg.stderr
        for proc in [fed.start_site(s) for s in SITES]:
            fed.wait_for_log(proc, "SuperNode ID", 120)
        run_dir = tmp_path / "run"
        public = fed.link_dir / "he-public-context.ckks"
        run = fed.run_study({**TINY, "run-dir": str(run_dir), "secure-aggregation": "he",
                             "he-public-context": str(public)})
        rc = run.wait(900)
        assert rc == 0, f"flwr run exited with {rc}\n{fed.logs_tail()}"
    finally:
        fed.stop()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["phase"] == "train"][0]
    assert train["excluded"] == {} and train["secure-aggregation"]["contributors"] == 2
    assert train["secure-aggregation"]["decrypted-by"] in SITES
    assert (run_dir / "final_model.pt").is_file() and (run_dir / "checkpoints" / "best.pt").is_file()
    ctx, key_id = he_keys.read_key_file(fed.site_dir("site-a") / "he-context.ckks", need_secret=True)
    assert train["secure-aggregation"]["key-id"] == key_id
    secret = tmp_path / "sk.bin"
    ctx.secret_key().data.save(str(secret))
    needle = secret.read_bytes()[4096:4160]
    coordinator = [p for d in (run_dir, fed.link_dir) for p in d.rglob("*") if p.is_file()]
    assert coordinator and not [p for p in coordinator if needle in p.read_bytes()]
