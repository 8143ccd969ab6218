"""CKKS key material for encrypted aggregation (run config ``secure-aggregation=he``).

One CKKS context per study (TenSEAL, poly modulus degree 8192): every site holds the *full*
context (public and secret key), the coordinator only the *public* context, which can add
ciphertexts but never decrypt them. A key file is a small container, never a pickle::

    b"FEDIMAGING-HE1\\n" + key id (32 hex digits) + b"\\n" + TenSEAL's own serialization (protobuf)

The key id is random, created with the context; sites send it with every encrypted update so
the coordinator can tell an update encrypted under another study's key from a corrupt one
(TenSEAL's public-key bytes are not a stable fingerprint).

Where keys live: deployed sites read the file named by their node config ``he-context``
(written by ``fedimaging deploy init --secure-aggregation he``); simulated sites share one
context per study under the sites' state root (:func:`simulation_key_path`), created by the
first site that needs it (atomically: the others read it). The ServerApp never creates keys.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
from pathlib import Path

import tenseal as ts

POLY_MODULUS_DEGREE = 8192
COEFF_MOD_BIT_SIZES = (60, 40, 40, 60)
GLOBAL_SCALE_BITS = 40
SLOTS = POLY_MODULUS_DEGREE // 2  # values per CKKS ciphertext
MAGIC = b"FEDIMAGING-HE1\n"
_KEY_ID = re.compile(rb"[0-9a-f]{32}")
# Folder under the sites' state root holding the simulated federation's shared contexts; the
# leading dot keeps it apart from every site folder (site names are demo names or site-N).
SIMULATION_KEYS_DIR = ".he-keys"


class KeyMaterialError(ValueError):
    """A key file that is missing, malformed, of the wrong kind (public/secret) or parameters."""


def new_context() -> tuple[ts.Context, str]:
    """A fresh CKKS context with its secret key, and its random key id."""
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=POLY_MODULUS_DEGREE,
                     coeff_mod_bit_sizes=list(COEFF_MOD_BIT_SIZES))
    ctx.global_scale = 2.0 ** GLOBAL_SCALE_BITS
    return ctx, secrets.token_hex(16)


def encode(ctx: ts.Context, key_id: str, *, secret: bool) -> bytes:
    """The key file of ``ctx``: with the secret key (a site's) or public only (the coordinator's).

    Relinearisation and Galois keys are left out: aggregation only adds ciphertexts.
    """
    if secret and not ctx.is_private():
        raise KeyMaterialError("cannot write a site key file from a public context")
    body = ctx.serialize(save_public_key=True, save_secret_key=secret, save_galois_keys=False,
                         save_relin_keys=False)
    return MAGIC + key_id.encode("ascii") + b"\n" + body


def decode(data: bytes, *, need_secret: bool, origin: str = "key file") -> tuple[ts.Context, str]:
    """Parse a key file; refuse a public one where the secret key is needed and vice versa.

    The coordinator calls this with ``need_secret=False``: a file that holds a secret key is
    refused there, so a misplaced site key cannot end up at the server.
    """
    if not data.startswith(MAGIC):
        raise KeyMaterialError(f"{origin} is not a fedimaging CKKS key file")
    key_id, sep, body = data[len(MAGIC):].partition(b"\n")
    if not sep or not _KEY_ID.fullmatch(key_id):
        raise KeyMaterialError(f"{origin} has no valid key id")
    try:
        ctx = ts.context_from(body)
    except Exception as exc:  # TenSEAL raises ValueError/RuntimeError on a corrupt stream
        raise KeyMaterialError(f"{origin}: TenSEAL cannot read the context ({exc})") from None
    if need_secret and not ctx.is_private():
        raise KeyMaterialError(f"{origin} holds no secret key: a site needs the full context")
    if not need_secret and ctx.is_private():
        raise KeyMaterialError(f"{origin} holds a secret key: the coordinator must get the public context only")
    check_parameters(ctx, origin)
    ctx.global_scale = 2.0 ** GLOBAL_SCALE_BITS
    return ctx, key_id.decode("ascii")


def check_parameters(ctx: ts.Context, origin: str) -> None:
    """The context must have fedimaging's CKKS parameters (ciphertext sizes depend on them)."""
    params = ctx.seal_context().data.key_context_data().parms()
    degree = params.poly_modulus_degree()
    if degree != POLY_MODULUS_DEGREE:
        raise KeyMaterialError(f"{origin}: poly modulus degree {degree}, expected {POLY_MODULUS_DEGREE}")


def public_copy(ctx: ts.Context) -> ts.Context:
    """The same context without its secret key (what the coordinator may hold)."""
    public = ctx.copy()
    public.make_context_public()
    return public


def read_key_file(path: Path, *, need_secret: bool) -> tuple[ts.Context, str]:
    """:func:`decode` of the file at ``path``; the error names the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyMaterialError(f"cannot read CKKS key file {path}: {exc.strerror or exc}") from None
    return decode(data, need_secret=need_secret, origin=f"CKKS key file {path}")


def simulation_key_path(state_root: Path, run_key: str) -> Path:
    """Where the simulated sites of study ``run_key`` keep their shared full context."""
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", run_key):
        raise KeyMaterialError(f"run key {run_key!r} is not a safe file name")
    return Path(state_root) / SIMULATION_KEYS_DIR / f"{run_key}.ckks"


def create_or_read(path: Path) -> tuple[ts.Context, str]:
    """The full context at ``path``, created (0600, atomically) if no site has created it yet.

    The file is written beside the target and hard-linked into place: ``os.link`` fails if
    another site won the race, which then reads the winner's file. Never overwrites.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        ctx, key_id = new_context()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(encode(ctx, key_id, secret=True))
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(tmp, path)
                return ctx, key_id
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
    return read_key_file(path, need_secret=True)
