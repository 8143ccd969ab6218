"""A site's preprocessed cases on disk, so a new ClientApp process starts training at once.

Flower 1.41 starts a fresh ClientApp process for every message; without this cache each one
re-reads, reorients, resamples and normalises every case. Entries live under the site's
``state-dir`` (``<state-dir>/cache/preprocessed``), never in the dataset folder and never in a
message, and may be deleted at any time (they are rebuilt).

Why not MONAI's ``PersistentDataset`` as it is: it keys an entry by the data dict (file *names*)
plus, for transforms that are not JSON-serialisable (ours), only the transforms' class names, so a
changed file or a changed spacing would load a stale entry; it verifies nothing (a truncated file
raises instead of being rebuilt, a flipped byte is loaded); it renames from ``/tmp`` (a copy, not
atomic, across filesystems); and it has no size bound. We keep its split of the chain (everything
before the first random transform is cached, augmentation runs after) by subclassing it, and
replace the storage: one file per case, ``MAGIC + sha256 + torch payload``, loaded only after the
checksum matches and then with ``weights_only=True`` (tensors and numbers, no pickled objects).

Keys hash the case files' *contents* (SHA-256, memoised by size, mtime, ctime and inode), every
parameter of the deterministic transforms and the library versions. ``disk-cache-mb`` evicts
entries the current dataset does not use first (LRU); cases beyond the bound are recomputed.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import enum
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedimaging.io import atomic_path, atomic_write_json

log = logging.getLogger("fedimaging.cache")

FORMAT = 1
MAGIC = b"FIMCACHE1\n"
_DIGEST_BYTES = 64  # hex sha256
# Attributes that hold what a transform last did (image readers keep the last file names) or which
# readers are installed (chosen by file suffix, which is in the key): not part of its settings.
_RUNTIME_STATE = frozenset({"filenames", "readers"})

STATS = {"hits": 0, "misses": 0, "seconds": 0.0}  # all caches of this process (benchmark breakdown)
_ACTIVE: contextvars.ContextVar[PreprocessedCache | None] = contextvars.ContextVar("preprocessed_cache", default=None)


def cache_dir_for(state_dir: Path) -> Path:
    return Path(state_dir) / "cache" / "preprocessed"  # inside the site's private state folder


def _inside(path: Path, folder: Path) -> bool:
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def site_cache(state_dir: Path, dataset_root: Path, max_mb: int) -> PreprocessedCache | None:
    """The site's cache, or None (with a warning) when it would lie inside the dataset folder or is off."""
    if max_mb <= 0:
        return None
    root = cache_dir_for(state_dir)
    if _inside(root, dataset_root):
        log.warning("No preprocessed cache on disk: state-dir lies inside the dataset folder; set node config "
                    "'state-dir' to a folder outside 'data-path' to enable it")
        return None
    return PreprocessedCache(root, max_mb)


@contextlib.contextmanager
def using(cache: PreprocessedCache | None) -> Iterator[None]:
    """Make ``cache`` the one ``tasks.data.cached_site_data`` uses while preparing a site."""
    token = _ACTIVE.set(cache)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def prepare(task: Any, dataset: Any, cache: PreprocessedCache | None) -> Any:
    """``task.prepare_site(dataset)`` with ``cache`` as the site's preprocessed cache."""
    with using(cache):
        return task.prepare_site(dataset)


def active() -> PreprocessedCache | None:
    """The cache set by :func:`using` (None: prepare in memory only, as before)."""
    return _ACTIVE.get()


# --- keys ---------------------------------------------------------------------------------------

def describe(value: Any, depth: int = 0) -> Any:
    """A JSON-able description of a transform's parameters; no object ids, no memory addresses."""
    from monai.transforms import Transform

    if depth > 6:
        return "..."
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, (np.ndarray, np.generic)):
        return np.asarray(value).tolist()
    if isinstance(value, (torch.dtype, np.dtype, type)):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, (list, tuple)):
        return [describe(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): describe(v, depth + 1) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, Transform) or hasattr(value, "__dict__") and type(value).__module__.startswith("monai"):
        fields = {k: describe(v, depth + 1) for k, v in sorted(vars(value).items()) if k not in _RUNTIME_STATE
                  and (not k.startswith("_") and not callable(v) or isinstance(v, Transform))}
        return {"class": f"{type(value).__module__}.{type(value).__qualname__}", **fields}
    return type(value).__qualname__


def transforms_key(transforms: Sequence[Any]) -> str:
    """Hash of the deterministic transforms with their parameters and the versions that produce the output."""
    import monai
    import nibabel

    material = {"format": FORMAT, "monai": monai.__version__, "torch": torch.__version__.split("+")[0],
                "nibabel": nibabel.__version__, "transforms": [describe(t) for t in transforms]}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


class FileHashes:
    """SHA-256 of input files, re-read only when size, mtime, ctime or inode changed (memo on disk).

    ctime cannot be set by a user tool, so rewriting a file with the same name, size and even
    restored mtime still changes its hash entry. The memo is keyed by a hash of the path.
    """

    def __init__(self, memo_path: Path) -> None:
        self.path = memo_path
        try:
            self._memo = json.loads(memo_path.read_text())
            if not isinstance(self._memo, dict):
                self._memo = {}
        except (OSError, ValueError):
            self._memo = {}
        self._dirty = False

    def sha256(self, file: str | os.PathLike) -> str:
        resolved = Path(file).resolve()
        st = resolved.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        key = hashlib.sha256(str(resolved).encode()).hexdigest()
        known = self._memo.get(key)
        if isinstance(known, list) and len(known) == 5 and known[:4] == stamp:
            return str(known[4])
        digest = hashlib.sha256()
        with open(resolved, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        self._memo[key] = [*stamp, digest.hexdigest()]
        self._dirty = True
        return digest.hexdigest()

    def save(self) -> None:  # noqa: D102
        if self._dirty:
            atomic_write_json(self.path, self._memo)
            self._dirty = False


def item_key(item: dict, hashes: FileHashes, chain_key: str) -> str:
    """Key of one case: the contents (hash, size, suffix) of its files, its other values, the chain."""
    def part(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [part(v) for v in value]
        if isinstance(value, str) and Path(value).is_file():
            return {"sha256": hashes.sha256(value), "size": Path(value).stat().st_size,
                    "suffix": "".join(Path(value).suffixes)}
        return describe(value)

    material = {"chain": chain_key, "item": {str(k): part(v) for k, v in sorted(item.items())}}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


# --- storage ------------------------------------------------------------------------------------

class PreprocessedCache:
    """Verified entries of one site under ``root``, at most ``max_mb`` MiB in all."""

    def __init__(self, root: Path, max_mb: float) -> None:
        self.root = Path(root)
        self.max_bytes = int(float(max_mb) * 1024 * 1024)
        self.hashes = FileHashes(self.root / "file-hashes.json")
        self.protected: set[str] = set()  # keys the datasets of this process use
        self.hits = 0
        self.misses = 0
        self.seconds = 0.0  # spent reading, verifying or building entries (benchmark breakdown)

    def entry(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def load(self, key: str) -> Any | None:
        """The entry's content, or None when absent; a damaged entry is removed with a warning."""
        path = self.entry(key)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        header = len(MAGIC) + _DIGEST_BYTES
        payload = blob[header:]
        ok = (blob[:len(MAGIC)] == MAGIC
              and blob[len(MAGIC):header].decode("ascii", "replace") == hashlib.sha256(payload).hexdigest())
        value = None
        if ok:
            try:
                value = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 - any unreadable entry is rebuilt, never trusted
                ok = False
        if not ok:
            log.warning("Preprocessed cache entry %s is damaged or incomplete; rebuilding it", path.name)
            path.unlink(missing_ok=True)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # least recently used goes first
        return value

    def store(self, key: str, value: Any) -> bool:
        """Write the entry atomically if it fits the bound (evicting unused entries); True if written."""
        buffer = io.BytesIO()
        torch.save(value, buffer)
        payload = buffer.getvalue()
        blob = MAGIC + hashlib.sha256(payload).hexdigest().encode("ascii") + payload
        if not self._make_room(len(blob)):
            return False
        with atomic_path(self.entry(key)) as tmp:
            tmp.write_bytes(blob)
        return True

    def entries(self) -> list[Path]:
        return [p for p in self.root.glob("*.pt") if p.is_file()] if self.root.is_dir() else []

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.entries())

    def _make_room(self, needed: int) -> bool:
        if needed > self.max_bytes:
            return False
        entries = []
        for path in self.entries():
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                entries.append((st.st_mtime_ns, st.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries, key=lambda e: e[0]):
            if total + needed <= self.max_bytes:
                break
            if path.stem in self.protected:
                continue
            path.unlink(missing_ok=True)
            total -= size
        return total + needed <= self.max_bytes


def _persistent_dataset_class():
    from monai.data import PersistentDataset

    class VerifiedPersistentDataset(PersistentDataset):
        """MONAI's PersistentDataset (cached deterministic prefix, augmentation after) on a verified store,
        with the first ``memory_items`` prefixes also kept in memory (the ``cache-max-mb`` bound)."""

        def __init__(self, data: Sequence[dict], transform: Any, cache: PreprocessedCache, memory_items: int) -> None:
            super().__init__(data, transform, cache_dir=None)
            first_random = self.transform.get_index_of_first(lambda t: not _deterministic(t))
            prefix = self.transform.transforms[:first_random] if first_random is not None else self.transform.transforms
            chain = transforms_key(prefix)
            self.cache = cache
            self.keys = [item_key(item, cache.hashes, chain) for item in data]
            cache.hashes.save()
            cache.protected.update(self.keys)
            self.memory_items = memory_items
            self._memory: dict[int, Any] = {}
            self._has_random = first_random is not None

        def build_missing(self) -> None:
            """Build the entries not on disk yet (existing ones are verified when read)."""
            for index, key in enumerate(self.keys):
                if index not in self._memory and not self.cache.entry(key).is_file():
                    self._prefix(index)

        def _prefix(self, index: int) -> dict:
            began = time.perf_counter()
            prefix = self.cache.load(self.keys[index])
            if prefix is None:
                self.cache.misses += 1
                STATS["misses"] += 1
                prefix = plain(self._pre_transform(copy.deepcopy(self.data[index])))
                self.cache.store(self.keys[index], prefix)
            else:
                self.cache.hits += 1
                STATS["hits"] += 1
            if len(self._memory) < self.memory_items:
                self._memory[index] = prefix
            self.cache.seconds += time.perf_counter() - began
            STATS["seconds"] += time.perf_counter() - began
            return prefix

        def _transform(self, index: int):
            prefix = self._memory.get(index)
            if prefix is None:
                prefix = self._prefix(index)
            if self._has_random:
                return self._post_transform(copy.deepcopy(prefix))
            return prefix

    return VerifiedPersistentDataset


def plain(item: dict) -> dict:
    """Only the arrays and numbers of a preprocessed case: no MONAI metadata or inverse traces.

    What an entry holds must load with ``weights_only=True``; a cache hit and a miss must give the
    same dict to the augmentation that follows.
    """
    out = {}
    for key, value in item.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.as_tensor() if hasattr(value, "as_tensor") else value
        elif isinstance(value, np.ndarray):
            out[key] = torch.as_tensor(value)
        elif isinstance(value, (bool, int, float)):
            out[key] = value
    return out


def _deterministic(transform: Any) -> bool:
    from monai.transforms import RandomizableTrait, Transform

    return isinstance(transform, Transform) and not isinstance(transform, RandomizableTrait)


def cached_dataset(cache: PreprocessedCache, items: Sequence[dict], transform: Any, memory_items: int):
    """A dataset over ``items`` whose deterministic preprocessing is read from ``cache`` when present."""
    return _persistent_dataset_class()(list(items), transform, cache, memory_items)
