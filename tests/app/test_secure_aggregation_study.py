"""secure-aggregation=he through the real ServerApp and ClientApp (in-process grid, tiny UNet).

One round of the same seeded study with and without encryption: the models agree within CKKS
precision, Dice within 0.01; no train reply carries arrays; the key material lives only under the
sites' state root; the coordinator's run directory holds no secret-key bytes.
"""

from __future__ import annotations

import json

import pytest
import torch

from app.client_app import app as client_app
from app.server_app import run_study
from tests.app.grids import CapturingGrid
from privacy import he_keys
from tests.conftest import share_demo

TINY = {
    "num-server-rounds": 1, "local-epochs": 1, "demo-size": "small", "spacing": "6,6,6", "roi-size": "16,16,16",
    "channels": "4,8,16", "batch-size": 2, "cross-site": True, "demo-sites": 2, "torch-threads": 1,
}

_shared_demo = share_demo(TINY)  # the suite's demo sites (tests/conftest.py)


def _study(tmp_path, mode):
    raw = {**TINY, "home": str(tmp_path / "home"), "run-dir": str(tmp_path / mode), "secure-aggregation": mode,
           "state-root": str(tmp_path / f"state-{mode}")}
    grid = CapturingGrid(client_app, [{"partition-id": i, "num-partitions": 2} for i in range(2)], raw)
    run_dir = run_study(grid, raw, run_id=31)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    dice = [r for r in lines if r["phase"] == "evaluate" and r.get("sites")][-1]["aggregate"]["dice"]
    return run_dir, grid, lines, dice


@pytest.mark.slow
def test_he_study_equals_plaintext_fedavg_and_keeps_keys_at_the_sites(tmp_path):
    off_dir, _, _, off_dice = _study(tmp_path, "off")
    he_dir, grid, lines, he_dice = _study(tmp_path, "he")
    off = torch.load(off_dir / "final_model.pt", weights_only=True)
    he = torch.load(he_dir / "final_model.pt", weights_only=True)
    diff = max(float((off[k].double() - he[k].double()).abs().max()) for k in off if off[k].is_floating_point())
    assert 0 < diff < 1e-5  # CKKS noise, nothing more
    assert abs(he_dice - off_dice) < 0.01
    train = [r for r in lines if r["phase"] == "train"][0]
    assert train["secure-aggregation"]["contributors"] == 2 and not train["excluded"]
    trains = [m for m in grid.replies if m.metadata.message_type == "train"]
    assert len(trains) == 2 and all(not m.content.array_records and "he" in m.content for m in trains)
    # key material: one shared full context under the sites' state root, none in the run directory
    keys = list((tmp_path / "state-he").rglob("*.ckks"))
    assert len(keys) == 1 and keys[0].parent.name == he_keys.SIMULATION_KEYS_DIR
    ctx, _ = he_keys.read_key_file(keys[0], need_secret=True)
    secret = tmp_path / "sk.bin"
    ctx.secret_key().data.save(str(secret))
    needle = secret.read_bytes()[4096:4160]
    files = [p for p in he_dir.rglob("*") if p.is_file()]
    assert (he_dir / "cross_site.json").is_file() and (he_dir / "checkpoints" / "best.pt").is_file()
    assert not [p for p in files if needle in p.read_bytes()]
    # what left the sites under he: ciphertexts, ids, numbers, the public context, the decrypted sum
    he_keys_allowed = {"chunks", "key-id", "layout", "num-values", "clipped-to", "context"}
    kinds = {m.metadata.message_type for m in grid.replies}
    assert {"train", "query.he_public", "query.he_decrypt", "evaluate"} <= kinds
    for reply in grid.replies:
        content = reply.content
        for name, record in content.config_records.items():
            assert name in ("he", "site"), name
            if name == "he":
                assert set(record) <= he_keys_allowed
                assert all(isinstance(c, bytes) for c in record.get("chunks", []))
            else:
                assert set(record) <= {"site-name", "eval-dataset", "channel-names"}
            for value in record.values():
                if isinstance(value, str):
                    assert "/" not in value and str(tmp_path) not in value
        if reply.metadata.message_type != "query.he_decrypt":
            assert not content.array_records
        else:
            assert list(content.array_records) == ["aggregate"]
            assert list(content.array_records["aggregate"]) == ["sum"]
