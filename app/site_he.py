"""The site's side of encrypted aggregation (``secure-aggregation=he``).

* **train**: instead of its model arrays a site sends ``he`` (a ConfigRecord): its case-weighted
  update ``num_examples * (local - global)`` as CKKS ciphertexts, the key id and the layout id.
  With ``max-update-norm`` set the site clips its own update first (the coordinator cannot).
* **query he_public**: the public context (no secret key), so the coordinator can add ciphertexts.
* **query he_decrypt**: the coordinator's ciphertext *sum* of one round; the site decrypts it and
  returns the plaintext sum. A site decrypts at most once per round, only for a round it
  trained in with this key, and only a sum the coordinator says has >= 2 contributors (see
  README, "Encrypted aggregation", for what a dishonest coordinator could still do).

Keys: node config ``he-context`` (deployment), else the simulated federation's shared file under
the state root (:func:`privacy.he_keys.simulation_key_path`).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import tenseal as ts
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from app.site_failures import SiteDataError
from privacy import he_keys, he_vectors

log = logging.getLogger("fedimaging.site")
MIN_CONTRIBUTORS = 2
_CONTEXTS: dict[str, tuple[ts.Context, str]] = {}


class SecureAggregationError(SiteDataError):
    """The site cannot take part in encrypted aggregation (the server gets only the code)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "secure-aggregation")


def key_path(he_context: Path | None, state_root: Path, run_key: str) -> Path:
    """The site's full-context file: its node config ``he-context``, else the simulation's."""
    return Path(he_context) if he_context else he_keys.simulation_key_path(state_root, run_key)


def site_context(path: Path, *, create: bool) -> tuple[ts.Context, str]:
    """The full context at ``path`` (cached per process); ``create`` only in simulation."""
    key = str(path)
    if key not in _CONTEXTS:
        try:
            _CONTEXTS[key] = he_keys.create_or_read(path) if create else he_keys.read_key_file(path, need_secret=True)
        except he_keys.KeyMaterialError as exc:
            raise SecureAggregationError(f"secure-aggregation=he: {exc} (node config 'he-context')") from None
    return _CONTEXTS[key]


def _marker(state_dir: Path, run_key: str, server_round: int, state: str) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", run_key) or run_key in (".", ".."):
        raise SecureAggregationError("the run key is not a safe folder name")
    return Path(state_dir) / "runs" / run_key / f"he-round-{server_round:06d}.{state}"


def encrypted_update(ctx: ts.Context, key_id: str, sent: dict[str, np.ndarray], local: dict[str, np.ndarray],
                     num_examples: int, max_norm: float, state_dir: Path, run_key: str,
                     server_round: int) -> ConfigRecord:
    """The ``he`` record of a train reply; remembers that this site may decrypt this round's sum."""
    vector, _norm = he_vectors.weighted_delta(sent, local, num_examples, max_norm)
    record = ConfigRecord({
        "chunks": he_vectors.encrypt_chunks(ctx, vector),
        "key-id": key_id,
        "layout": he_vectors.layout_id(sent),
        "num-values": int(vector.size),
        "clipped-to": float(max_norm),
    })
    marker = _marker(state_dir, run_key, server_round, "trained")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(key_id)
    return record


def public_context_reply(ctx: ts.Context, key_id: str) -> ConfigRecord:
    return ConfigRecord({"context": he_keys.encode(he_keys.public_copy(ctx), key_id, secret=False),
                         "key-id": key_id})


def decrypt_sum(ctx: ts.Context, key_id: str, request: ConfigRecord, state_dir: Path,
                run_key: str) -> RecordDict:
    """Decrypt the round's ciphertext sum once, if this site contributed to that round."""
    try:
        server_round = int(request["server-round"])
        values = int(request["num-values"])
        contributors = int(request["contributors"])
        chunks = list(request["chunks"])
        asked_key = str(request["key-id"])
    except (KeyError, TypeError, ValueError):
        raise SecureAggregationError("decryption request is malformed") from None
    if asked_key != key_id:
        raise SecureAggregationError("decryption request is for another key")
    if contributors < MIN_CONTRIBUTORS:
        raise SecureAggregationError(f"refusing to decrypt a sum of {contributors} update(s): it would "
                                     f"reveal a single site's update (need >= {MIN_CONTRIBUTORS})")
    trained = _marker(state_dir, run_key, server_round, "trained")
    try:  # atomic: a second request for the same round finds no marker
        os.rename(trained, _marker(state_dir, run_key, server_round, "decrypted"))
    except FileNotFoundError:
        raise SecureAggregationError(f"refusing to decrypt: this site did not train in round {server_round} "
                                     "or already decrypted its sum") from None
    try:
        total = he_vectors.decrypt_chunks(ctx, chunks, values)
    except ValueError as exc:
        raise SecureAggregationError(f"cannot decrypt the sum: {exc}") from None
    return RecordDict({"aggregate": ArrayRecord({"sum": Array(total)})})


# -- what the ClientApp calls (run and site config in, records out) ------------------------------
def _context_of(run, site, run_key: str) -> tuple[ts.Context, str]:
    path = key_path(site.he_context, run.state_root_path, run_key)
    return site_context(path, create=site.he_context is None)  # only simulation creates, per study


def train_record(run, site, run_key: str, shared: ArrayRecord, state, num_examples: int,
                 server_round: int) -> ConfigRecord:
    """The ``he`` record of a train reply (the update as ciphertexts; the site clips it first)."""
    ctx, key_id = _context_of(run, site, run_key)
    sent = {k: v.numpy() for k, v in shared.items()}
    local = {k: state[k].detach().cpu().numpy() for k in shared.keys()}
    return encrypted_update(ctx, key_id, sent, local, num_examples, run.max_update_norm, site.state_dir,
                            run_key, server_round)


def public_reply(run, site, config: ConfigRecord, default_key: str) -> RecordDict:
    ctx, key_id = _context_of(run, site, str(config.get("run-key", default_key)))
    return RecordDict({"he": public_context_reply(ctx, key_id)})


def decrypt_reply(run, site, request: ConfigRecord, default_key: str) -> RecordDict:
    run_key = str(request.get("run-key", default_key))
    ctx, key_id = _context_of(run, site, run_key)
    return decrypt_sum(ctx, key_id, request, site.state_dir, run_key)
