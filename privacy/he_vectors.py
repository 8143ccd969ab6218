"""CKKS vectors of a model update: layout, encryption, ciphertext sum, decryption (pure functions).

A site's contribution is ``num_examples * (local - global)`` over the shared *float* arrays,
flattened in the order the server sent them and cut into ciphertexts of :data:`SLOTS` values.
The coordinator adds the ciphertexts of all sites chunk by chunk (:func:`sum_chunks`) with
the public context and never sees one site's vector; a site decrypts the sum
(:func:`decrypt_chunks`) and the coordinator divides by the sum of the (plaintext) case counts.
Serialized ciphertexts are TenSEAL's protobuf streams; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np
import tenseal as ts

from privacy.he_keys import SLOTS


def float_keys(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """Names of the floating-point arrays, in order: the ones that are encrypted and averaged.

    Integer buffers (e.g. BatchNorm's ``num_batches_tracked``) are not averaged under
    encryption; the global model keeps its value.
    """
    return [k for k, v in arrays.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]


def layout_id(arrays: Mapping[str, np.ndarray]) -> str:
    """Fingerprint of what is encrypted (names and shapes, in order); site and server compare it."""
    text = ";".join(f"{k}:{'x'.join(map(str, np.shape(arrays[k])))}" for k in float_keys(arrays))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def num_values(arrays: Mapping[str, np.ndarray]) -> int:
    return int(sum(np.asarray(arrays[k]).size for k in float_keys(arrays)))


def num_chunks(values: int) -> int:
    return max(1, math.ceil(values / SLOTS))


def weighted_delta(sent: Mapping[str, np.ndarray], local: Mapping[str, np.ndarray], weight: float,
                   max_norm: float = 0.0) -> tuple[np.ndarray, float]:
    """``weight * (local - sent)`` flattened (float64), clipped to L2 ``max_norm`` first if > 0.

    Returns the vector and the update's norm before clipping (which stays at the site).
    """
    keys = float_keys(sent)
    delta = np.concatenate([(np.asarray(local[k], np.float64) - np.asarray(sent[k], np.float64)).ravel()
                            for k in keys]) if keys else np.zeros(0)
    norm = float(np.sqrt(np.einsum("i,i->", delta, delta)))
    if max_norm > 0 and norm > max_norm:
        delta *= max_norm / norm
    return delta * float(weight), norm


def encrypt_chunks(ctx: ts.Context, vector: np.ndarray) -> list[bytes]:
    """``vector`` as serialized CKKS ciphertexts of at most :data:`SLOTS` values each."""
    vector = np.asarray(vector, dtype=np.float64).ravel()
    return [ts.ckks_vector(ctx, vector[i:i + SLOTS]).serialize()
            for i in range(0, max(len(vector), 1), SLOTS)]


def chunk_sizes(values: int) -> list[int]:
    """Values per ciphertext for a vector of ``values`` values."""
    return [min(SLOTS, values - i) for i in range(0, max(values, 1), SLOTS)]


def load_chunks(ctx: ts.Context, chunks: Sequence[bytes], values: int) -> list[ts.CKKSVector]:
    """Deserialize and check one site's ciphertexts; ValueError with the reason if they do not fit."""
    sizes = chunk_sizes(values)
    if len(chunks) != len(sizes):
        raise ValueError(f"{len(chunks)} ciphertexts, expected {len(sizes)} for {values} values")
    vectors = []
    for i, (data, size) in enumerate(zip(chunks, sizes)):
        if not isinstance(data, bytes):
            raise ValueError(f"ciphertext {i} is not bytes")
        try:
            vec = ts.ckks_vector_from(ctx, data)
        except Exception as exc:  # TenSEAL: ValueError (parse) or RuntimeError (other parameters)
            raise ValueError(f"ciphertext {i} does not deserialize under this study's context ({exc})") from None
        if vec.size() != size:
            raise ValueError(f"ciphertext {i} holds {vec.size()} values, expected {size}")
        vectors.append(vec)
    return vectors


def sum_chunks(per_site: Sequence[Sequence[ts.CKKSVector]]) -> list[bytes]:
    """Chunk-wise sum of several sites' ciphertexts (homomorphic addition only), serialized."""
    if not per_site:
        raise ValueError("nothing to add")
    total = [v.copy() for v in per_site[0]]
    for vectors in per_site[1:]:
        for acc, vec in zip(total, vectors, strict=True):
            acc += vec
    return [v.serialize() for v in total]


def decrypt_chunks(ctx: ts.Context, chunks: Sequence[bytes], values: int) -> np.ndarray:
    """The plaintext vector of ``values`` values behind ``chunks`` (needs the secret key)."""
    if not ctx.is_private():
        raise ValueError("this context holds no secret key: it cannot decrypt")
    vectors = load_chunks(ctx, chunks, values)
    out = np.concatenate([np.asarray(v.decrypt(), dtype=np.float64) for v in vectors])
    return out[:values]


def apply_mean_delta(current: Mapping[str, np.ndarray], total: np.ndarray, weight_sum: float) -> dict[str, np.ndarray]:
    """``current + total / weight_sum`` per float array (dtype kept); other arrays unchanged."""
    keys = float_keys(current)
    if total.shape != (sum(np.asarray(current[k]).size for k in keys),):
        raise ValueError(f"decrypted aggregate has {total.size} values, expected {num_values(current)}")
    mean = total / float(weight_sum)
    out: dict[str, np.ndarray] = {}
    offset = 0
    for key, value in current.items():
        value = np.asarray(value)
        if key not in keys:
            out[key] = value
            continue
        part = mean[offset:offset + value.size].reshape(value.shape)
        offset += value.size
        out[key] = (value.astype(np.float64) + part).astype(value.dtype)
    return out
