"""secure-aggregation=he at the coordinator: same model as plaintext FedAvg, no secret key, bad input, resume.

Sites are the numpy least-squares hospitals of ``sites.py`` behind :class:`EncryptingSite`, which
does what the real ClientApp does with ``secure-aggregation=he`` (``app.site_he``).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from app import site_he
from privacy import he_keys, he_vectors
from strategies import NoSiteTrained, RunDirectory, build_strategy
from strategies.secure_aggregation import QUERY_DECRYPT, QUERY_PUBLIC

from .fakes import FakeGrid, Interrupted, small_settings
from .sites import LeastSquaresSite, initial_model, make_problem

FLOAT_KEYS = ("w", "b")


@pytest.fixture(autouse=True)
def no_fsync(monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: None)


@pytest.fixture(scope="module")
def study_key():
    return he_keys.new_context()


class EncryptingSite:
    """A numpy site that encrypts its update and answers the coordinator's HE queries."""

    def __init__(self, inner, key, state_dir, run_key="run", tamper=None):
        self.inner, (self.ctx, self.key_id) = inner, key
        self.state_dir, self.run_key, self.tamper = state_dir, run_key, tamper
        self.decrypt_requests = []

    def __call__(self, msg):
        kind = msg.metadata.message_type
        if kind == QUERY_PUBLIC:
            return RecordDict({"he": site_he.public_context_reply(self.ctx, self.key_id)})
        if kind == QUERY_DECRYPT:
            self.decrypt_requests.append(msg)
            return site_he.decrypt_sum(self.ctx, self.key_id, msg.content["he"], self.state_dir, self.run_key)
        reply = self.inner(msg)
        if kind != "train":
            return reply
        sent = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        local = {k: v.numpy() for k, v in reply["arrays"].items()}
        n = int(reply["metrics"]["num-examples"])
        record = site_he.encrypted_update(self.ctx, self.key_id, sent, local, n, 0.0, self.state_dir,
                                          self.run_key, int(msg.content["config"]["server-round"]))
        del reply["arrays"]
        reply["he"] = record
        if self.tamper:
            self.tamper(reply)
        return reply


def _record(arrays):
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def _settings(name="fedavg", rounds=3, **kw):
    return small_settings(min_available_sites=3, strategy=name, num_server_rounds=rounds, lr=0.03, cross_site=False,
                          server_lr=0.1 if name in ("fedadam", "fedyogi") else 0.0, **kw)


def _plain_sites():
    return {10 + i: LeastSquaresSite(f"site-{i}", a, y, local_steps=5) for i, (a, y) in enumerate(make_problem(3, seed=4))}


def _he_sites(key, tmp_path, **tamper):
    return {node: EncryptingSite(site, key, tmp_path / "sites" / site.name, tamper=tamper.get(site.name))
            for node, site in _plain_sites().items()}


def _lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["fedavg", "fedadam"])
def test_he_gives_the_plaintext_model_and_the_coordinator_holds_no_secret_key(tmp_path, study_key, name):
    plain = build_strategy(_settings(name), RunDirectory(tmp_path / "plain")).run(
        FakeGrid(_plain_sites()), _record(initial_model()))
    run_dir = RunDirectory(tmp_path / "run")
    strategy = build_strategy(_settings(name, secure_aggregation="he"), run_dir)
    result = strategy.run(FakeGrid(_he_sites(study_key, tmp_path)), _record(initial_model()))
    for key in FLOAT_KEYS:
        assert np.abs(result.arrays[key].numpy() - plain.arrays[key].numpy()).max() < 1e-6
    train = [r for r in _lines(run_dir.root) if r["phase"] == "train"]
    assert len(train) == 3 and all(r["secure-aggregation"]["contributors"] == 3 for r in train)
    assert all(r["secure-aggregation"]["decrypted-by"] == "site-0" and not r["excluded"] for r in train)
    # no secret key at the coordinator: its context is public, cannot decrypt, and no file holds key bytes
    assert strategy.he.public.is_public() and not strategy.he.public.has_secret_key()
    ctx, key_id = study_key
    chunks = he_vectors.encrypt_chunks(ctx, np.ones(4))
    with pytest.raises(ValueError):
        he_vectors.load_chunks(strategy.he.public, chunks, 4)[0].decrypt()
    secret = tmp_path / "secret-key.bin"
    ctx.secret_key().data.save(str(secret))
    needle = secret.read_bytes()[4096:4160]
    files = [p for p in run_dir.root.rglob("*") if p.is_file()]
    assert files and not [p for p in files if needle in p.read_bytes()]
    assert (run_dir.root / "final_model.pt").is_file() and (run_dir.root / "checkpoints" / "best.pt").is_file()


def test_bad_encrypted_updates_are_excluded_and_the_round_goes_on(tmp_path, study_key):
    other_ctx, other_id = he_keys.new_context()

    def garbage(reply):
        reply["he"]["chunks"] = [b"\x00" * 100]

    def other_key(reply):
        reply["he"]["key-id"] = other_id

    def plaintext(reply):
        del reply["he"]
        reply["arrays"] = _record({k: np.ones(s) for k, s in (("w", 4), ("b", 1))})

    sites = _he_sites(study_key, tmp_path)
    for node, tamper in ((13, garbage), (14, other_key), (15, plaintext)):
        data = make_problem(6, seed=4)[node - 10]
        sites[node] = EncryptingSite(LeastSquaresSite(f"site-{node - 10}", *data, local_steps=5), study_key,
                                     tmp_path / "sites" / str(node), tamper=tamper)
    run_dir = RunDirectory(tmp_path / "run")
    settings = _settings(rounds=1, secure_aggregation="he")
    result = build_strategy(settings, run_dir).run(FakeGrid(sites), _record(initial_model()))
    train = [r for r in _lines(run_dir.root) if r["phase"] == "train"][0]
    assert set(train["excluded"]) == {"site-3", "site-4", "site-5"}
    assert "does not deserialize" in train["excluded"]["site-3"]
    assert "another key" in train["excluded"]["site-4"]
    assert "plaintext update" in train["excluded"]["site-5"]
    assert train["secure-aggregation"]["contributors"] == 3
    # the model is the plaintext case-weighted mean of the three good sites only
    good = _plain_sites()
    plain = build_strategy(_settings(rounds=1), RunDirectory(tmp_path / "plain")).run(
        FakeGrid(good), _record(initial_model()))
    for key in FLOAT_KEYS:
        assert np.abs(result.arrays[key].numpy() - plain.arrays[key].numpy()).max() < 1e-6


def test_a_wrong_ciphertext_count_or_size_is_excluded(tmp_path, study_key):
    ctx, _ = study_key

    def extra_chunk(reply):
        reply["he"]["chunks"] = reply["he"]["chunks"] + reply["he"]["chunks"]

    def wrong_size(reply):
        reply["he"]["chunks"] = he_vectors.encrypt_chunks(ctx, np.zeros(3))

    sites = _he_sites(study_key, tmp_path)
    sites[10].tamper, sites[11].tamper = extra_chunk, wrong_size
    run_dir = RunDirectory(tmp_path / "run")
    with pytest.raises(NoSiteTrained):  # the only round had nothing to aggregate: the run fails
        build_strategy(_settings(rounds=1, secure_aggregation="he"), run_dir).run(FakeGrid(sites),
                                                                                  _record(initial_model()))
    train = [r for r in _lines(run_dir.root) if r["phase"] == "train"][0]
    assert "2 ciphertexts, expected 1" in train["excluded"]["site-0"]
    assert "holds 3 values, expected 5" in train["excluded"]["site-1"]
    # one valid encrypted update left: it is never decrypted alone, no model comes out of the round
    assert "needs >= 2" in train["excluded"]["site-2"] and train["secure-aggregation"]["contributors"] == 0
    assert not [m for site in sites.values() for m in site.decrypt_requests]
    assert not (run_dir.root / "final_model.pt").exists()


def test_resume_of_an_he_study(tmp_path, study_key):
    full = build_strategy(_settings(secure_aggregation="he"), RunDirectory(tmp_path / "full")).run(
        FakeGrid(_he_sites(study_key, tmp_path / "a")), _record(initial_model()))
    run_dir = RunDirectory(tmp_path / "resumed")
    with pytest.raises(Interrupted):
        build_strategy(_settings(secure_aggregation="he"), run_dir).run(
            FakeGrid(_he_sites(study_key, tmp_path / "b"), interrupt_at_round=3), _record(initial_model()))
    resumed = build_strategy(_settings(secure_aggregation="he", resume_from=str(run_dir.root)), run_dir)
    result = resumed.run(FakeGrid(_he_sites(study_key, tmp_path / "b")), _record(initial_model()))
    assert resumed.he.public is not None  # fetched again: no key material in the server state
    for key in FLOAT_KEYS:
        assert np.abs(result.arrays[key].numpy() - full.arrays[key].numpy()).max() < 1e-6
    rounds = [r["round"] for r in _lines(run_dir.root) if r["phase"] == "train"]
    assert rounds == [1, 2, 3]
    state = [p for p in (run_dir.root / "server_state").rglob("*") if p.is_file()]
    assert state and not [p for p in state if he_keys.MAGIC in p.read_bytes()]  # no key material saved


def test_the_decrypting_site_must_have_trained_in_the_round(tmp_path, study_key):
    ctx, key_id = study_key
    record = site_he.encrypted_update(ctx, key_id, {"w": np.zeros(3)}, {"w": np.ones(3)}, 2, 0.0, tmp_path, "run", 1)
    request = ConfigRecord({"chunks": record["chunks"], "num-values": 3, "server-round": 1, "key-id": key_id,
                            "contributors": 2})
    with pytest.raises(site_he.SecureAggregationError, match="did not train"):
        site_he.decrypt_sum(ctx, key_id, request, tmp_path / "other-site", "run")


def test_the_coordinator_uses_its_public_context_file_and_refuses_a_secret_one(tmp_path, study_key):
    ctx, key_id = study_key
    public_file, secret_file = tmp_path / "public.ckks", tmp_path / "site.ckks"
    public_file.write_bytes(he_keys.encode(he_keys.public_copy(ctx), key_id, secret=False))
    secret_file.write_bytes(he_keys.encode(ctx, key_id, secret=True))
    with pytest.raises(he_keys.KeyMaterialError, match="holds a secret key"):
        build_strategy(_settings(secure_aggregation="he", he_public_context=str(secret_file)), RunDirectory(tmp_path / "x"))
    # sites that encrypt under another key than the coordinator's file are excluded, never adopted
    other = he_keys.new_context()
    strategy = build_strategy(_settings(rounds=1, secure_aggregation="he", he_public_context=str(public_file)),
                              RunDirectory(tmp_path / "run"))
    sites = _he_sites(study_key, tmp_path)
    sites[12] = EncryptingSite(sites[12].inner, other, tmp_path / "other")
    grid = FakeGrid(sites)
    strategy.run(grid, _record(initial_model()))
    train = [r for r in _lines(tmp_path / "run") if r["phase"] == "train"][0]
    assert list(train["excluded"]) == ["site-2"] and "another key" in train["excluded"]["site-2"]
    assert train["secure-aggregation"]["contributors"] == 2 and train["secure-aggregation"]["key-id"] == key_id
    assert not [m for m in grid.sent if m.metadata.message_type == QUERY_PUBLIC]
