"""CKKS maths and key material of secure-aggregation=he, against independent numpy computations."""

from __future__ import annotations

import os
import stat
import threading

import numpy as np
import pytest
from flwr.app import ConfigRecord

from app import site_he
from privacy import he_keys, he_vectors


@pytest.fixture(scope="module")
def site_ctx():
    return he_keys.new_context()


def _model(rng, dtype=np.float32):
    return {"conv.weight": rng.normal(size=(3, 40, 50)).astype(dtype), "conv.bias": rng.normal(size=7).astype(dtype),
            "bn.num_batches_tracked": np.array(5, dtype=np.int64)}


def test_encrypted_sum_equals_the_plaintext_weighted_mean(site_ctx):
    ctx, _ = site_ctx
    public = he_keys.public_copy(ctx)
    rng = np.random.default_rng(0)
    glob = _model(rng)
    locals_ = [{k: (v + 0.01 * rng.normal(size=v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v + 3
                for k, v in glob.items()} for _ in range(3)]
    weights = [12, 30, 7]
    assert he_vectors.num_values(glob) == 6007 and he_vectors.chunk_sizes(6007) == [4096, 1911]
    per_site = []
    for local, n in zip(locals_, weights):
        vector, _ = he_vectors.weighted_delta(glob, local, n)
        chunks = he_vectors.encrypt_chunks(ctx, vector)
        per_site.append(he_vectors.load_chunks(public, chunks, 6007))  # what the coordinator can do
    total = he_vectors.decrypt_chunks(ctx, he_vectors.sum_chunks(per_site), 6007)
    new = he_vectors.apply_mean_delta(glob, total, sum(weights))
    for key in ("conv.weight", "conv.bias"):  # independent: numpy's weighted average of the local models
        expected = np.average(np.stack([loc[key].astype(np.float64) for loc in locals_]), axis=0, weights=weights)
        assert new[key].dtype == np.float32
        assert np.abs(new[key] - expected).max() < 1e-6
    assert new["bn.num_batches_tracked"] == 5  # integer buffers are not averaged under encryption


def test_the_coordinator_context_cannot_decrypt(site_ctx):
    ctx, key_id = site_ctx
    public, public_id = he_keys.decode(he_keys.encode(he_keys.public_copy(ctx), key_id, secret=False),
                                       need_secret=False)
    assert public.is_public() and public_id == key_id
    chunks = he_vectors.encrypt_chunks(ctx, np.arange(10.0))
    with pytest.raises(ValueError, match="secret key"):
        he_vectors.decrypt_chunks(public, chunks, 10)
    with pytest.raises(ValueError, match="secret_key"):  # TenSEAL itself refuses too
        he_vectors.load_chunks(public, chunks, 10)[0].decrypt()
    # a site's key file is refused where only a public context belongs, and vice versa
    with pytest.raises(he_keys.KeyMaterialError, match="holds a secret key"):
        he_keys.decode(he_keys.encode(ctx, key_id, secret=True), need_secret=False)
    with pytest.raises(he_keys.KeyMaterialError, match="no secret key"):
        he_keys.decode(he_keys.encode(public, key_id, secret=False), need_secret=True)
    with pytest.raises(he_keys.KeyMaterialError, match="not a fedimaging"):
        he_keys.decode(b"\x80\x04pickle", need_secret=False)


def test_ciphertexts_that_do_not_fit_are_refused(site_ctx):
    ctx, _ = site_ctx
    public = he_keys.public_copy(ctx)
    good = he_vectors.encrypt_chunks(ctx, np.ones(5000))
    with pytest.raises(ValueError, match="2 ciphertexts, expected 1"):
        he_vectors.load_chunks(public, good, 100)
    with pytest.raises(ValueError, match="holds 904 values, expected 4096"):
        he_vectors.load_chunks(public, good[::-1], 5000)
    with pytest.raises(ValueError, match="does not deserialize"):
        he_vectors.load_chunks(public, [good[0][:1000], good[1]], 5000)
    small = he_keys.ts.context(he_keys.ts.SCHEME_TYPE.CKKS, poly_modulus_degree=4096, coeff_mod_bit_sizes=[40, 20, 40])
    small.global_scale = 2.0**20
    with pytest.raises(ValueError, match="does not deserialize"):
        he_vectors.load_chunks(public, [he_keys.ts.ckks_vector(small, [1.0]).serialize()], 1)


def test_simulated_sites_share_one_context_created_once(tmp_path):
    path = he_keys.simulation_key_path(tmp_path / "state", "run-1")
    results = []
    threads = [threading.Thread(target=lambda: results.append(he_keys.create_or_read(path)[1])) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 4
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    with pytest.raises(he_keys.KeyMaterialError, match="safe file name"):
        he_keys.simulation_key_path(tmp_path, "../x")


def test_a_site_clips_its_own_update_and_decrypts_a_round_once(tmp_path, site_ctx):
    ctx, key_id = site_ctx
    sent = {"w": np.zeros(50, np.float32)}
    local = {"w": np.full(50, 1.0, np.float32)}  # norm sqrt(50)
    record = site_he.encrypted_update(ctx, key_id, sent, local, 4, max_norm=0.5, state_dir=tmp_path,
                                      run_key="run", server_round=3)
    assert "w" not in record and record["num-values"] == 50
    request = ConfigRecord({"chunks": record["chunks"], "num-values": 50, "server-round": 3, "key-id": key_id,
                            "contributors": 1})
    with pytest.raises(site_he.SecureAggregationError, match="single site"):
        site_he.decrypt_sum(ctx, key_id, request, tmp_path, "run")
    request["contributors"] = 2
    with pytest.raises(site_he.SecureAggregationError, match="did not train in round 4"):
        site_he.decrypt_sum(ctx, key_id, ConfigRecord({**request, "server-round": 4}), tmp_path, "run")
    with pytest.raises(site_he.SecureAggregationError, match="another key"):
        site_he.decrypt_sum(ctx, "0" * 32, request, tmp_path, "run")
    total = site_he.decrypt_sum(ctx, key_id, request, tmp_path, "run")["aggregate"]["sum"].numpy()
    assert np.linalg.norm(total) == pytest.approx(4 * 0.5, rel=1e-6)  # weight x clipped norm
    with pytest.raises(site_he.SecureAggregationError, match="already decrypted"):
        site_he.decrypt_sum(ctx, key_id, request, tmp_path, "run")
    with pytest.raises(site_he.SecureAggregationError, match="safe folder"):
        site_he.decrypt_sum(ctx, key_id, request, tmp_path, "../../etc")
