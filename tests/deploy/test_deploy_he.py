"""``deploy init --secure-aggregation he``: the full CKKS context at every site, only the public one at the coordinator."""

from __future__ import annotations

import stat
import tomllib

from deploy.init import init_main
from privacy import he_keys


def test_init_writes_site_keys_and_a_public_context_only_for_the_coordinator(tmp_path):
    root = tmp_path / "deployment"
    assert init_main([str(root), "--sites", "site-a,site-b", "--dp-epsilon", "0", "--secure-aggregation", "he"]) == 0
    ids = set()
    for site in ("site-a", "site-b"):
        config = tomllib.loads((root / "sites" / site / "node-config.toml").read_text())
        key = root / "sites" / site / "he-context.ckks"
        assert config["he-context"] == str(key.resolve())
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        ctx, key_id = he_keys.read_key_file(key, need_secret=True)
        assert ctx.is_private()
        ids.add(key_id)
    public, public_id = he_keys.read_key_file(root / "superlink" / "he-public-context.ckks", need_secret=False)
    assert public.is_public() and ids == {public_id}
    # no file the coordinator keeps holds secret-key bytes
    secret = tmp_path / "sk.bin"
    ctx.secret_key().data.save(str(secret))
    needle = secret.read_bytes()[4096:4160]
    assert not [p for p in (root / "superlink").rglob("*") if p.is_file() and needle in p.read_bytes()]
    # a later deployment without he removes the old keys
    assert init_main([str(root), "--sites", "site-a,site-b", "--dp-epsilon", "0", "--force"]) == 0
    assert not list(root.rglob("*.ckks"))
    assert "he-context" not in (root / "sites" / "site-a" / "node-config.toml").read_text()
