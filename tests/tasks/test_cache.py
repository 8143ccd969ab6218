"""The site's preprocessed cache on disk (tasks.cache): keyed by content and settings, verified
when read, bounded, never in the dataset folder; augmentation runs after it."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, RandGaussianNoised, SpatialPadd

from tasks import cache as disk_cache
from tasks.cache import MAGIC, PreprocessedCache, cached_dataset, site_cache
from tasks.segmentation import preprocessing

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _case(folder: Path, name: str, seed: int, shape=(12, 10, 8)) -> dict:
    """An uncompressed NIfTI pair (so equal shapes give equal file sizes)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    image = rng.uniform(-200, 300, shape).astype(np.float32)
    label = (rng.uniform(size=shape) > 0.7).astype(np.uint8)
    nib.save(nib.Nifti1Image(image, AFFINE), str(folder / f"{name}.nii"))
    nib.save(nib.Nifti1Image(label, AFFINE), str(folder / f"{name}_seg.nii"))
    return {"image": str(folder / f"{name}.nii"), "label": str(folder / f"{name}_seg.nii")}


def _chain(spacing=(3.0, 3.0, 3.0), ct_window=(-150.0, 250.0), roi=(8, 8, 8)) -> Compose:
    return Compose(preprocessing("CT", spacing, ct_window) + [SpatialPadd(("image", "label"), spatial_size=roi)])


def _direct(item: dict, chain: Compose) -> dict:
    """What the cache must return: the chain applied to the files now, without any cache."""
    return chain(dict(item))


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in ("image", "label"))


@pytest.fixture
def site(tmp_path):
    data = tmp_path / "dataset"
    items = [_case(data, f"case{i}", seed=i) for i in range(3)]
    return data, items, tmp_path / "state"


def _dataset(state: Path, items, chain, max_mb=50.0):
    store = PreprocessedCache(disk_cache.cache_dir_for(state), max_mb)
    return store, cached_dataset(store, items, chain, memory_items=0)


def test_second_process_reads_the_entries_it_did_not_compute(site):
    _, items, state = site
    chain = _chain()
    first_store, first = _dataset(state, items, chain)
    computed = [first[i] for i in range(len(items))]
    assert (first_store.misses, first_store.hits) == (3, 0)
    second_store, second = _dataset(state, items, chain)  # a new process: nothing in memory
    again = [second[i] for i in range(len(items))]
    assert (second_store.misses, second_store.hits) == (0, 3)
    for item, a, b in zip(items, computed, again):
        assert _same(a, b) and _same(b, _direct(item, chain))


def test_changed_content_with_same_name_size_and_mtime_is_recomputed(site):
    _, items, state = site
    chain = _chain()
    _, before = _dataset(state, items, chain)
    old = before[0]
    path = Path(items[0]["image"])
    st = path.stat()
    replacement = _case(path.parent / "other", "case0", seed=99)  # same shape: same file size
    path.write_bytes(Path(replacement["image"]).read_bytes())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # even the modification time is restored
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    store, after = _dataset(state, items, chain)
    assert after.keys[0] != before.keys[0] and after.keys[1:] == before.keys[1:]
    new = after[0]
    assert store.misses == 1
    assert not _same(new, old) and _same(new, _direct(items[0], chain))


@pytest.mark.parametrize("change", [dict(spacing=(4.0, 4.0, 4.0)), dict(ct_window=(-100.0, 250.0)),
                                    dict(roi=(16, 16, 16))])
def test_changed_preprocessing_settings_give_new_entries(site, change):
    _, items, state = site
    _, base = _dataset(state, items, _chain())
    base[0]
    changed_chain = _chain(**change)
    store, changed = _dataset(state, items, changed_chain)
    assert set(changed.keys).isdisjoint(base.keys)
    assert _same(changed[0], _direct(items[0], changed_chain)) and store.misses == 1


def test_same_files_and_settings_give_the_same_key_in_a_fresh_interpreter(site, tmp_path):
    """Keys must not depend on object ids or hash seeds: a new process must find the entries."""
    import subprocess
    import sys

    _, items, state = site
    _, ds = _dataset(state, items, _chain())
    code = ("import sys, json; from tests.tasks.test_cache import _chain, _dataset; from pathlib import Path;"
            "items=json.loads(sys.argv[1]); print(_dataset(Path(sys.argv[2]), items, _chain())[1].keys[0])")
    import json

    out = subprocess.run([sys.executable, "-c", code, json.dumps(items), str(tmp_path / "elsewhere")],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "123"},
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip().splitlines()[-1] == ds.keys[0]


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_damaged_entry_is_rebuilt_with_a_warning_never_loaded(site, damage, caplog):
    _, items, state = site
    chain = _chain()
    _, ds = _dataset(state, items, chain)
    ds[0]
    entry = PreprocessedCache(disk_cache.cache_dir_for(state), 50).entry(ds.keys[0])
    blob = bytearray(entry.read_bytes())
    if damage == "flip":
        blob[-10] ^= 0xFF  # inside the tensor data: torch would load it without complaint
    elif damage == "truncate":
        blob = blob[: len(blob) // 2]
    else:
        blob = bytearray()
    entry.write_bytes(bytes(blob))
    store, again = _dataset(state, items, chain)
    with caplog.at_level(logging.WARNING, logger="fedimaging.cache"):
        value = again[0]
    assert "damaged or incomplete" in caplog.text
    assert store.misses == 1 and _same(value, _direct(items[0], chain))
    fresh, third = _dataset(state, items, chain)
    third[0]
    assert fresh.hits == 1  # the rebuilt entry is whole again


def test_entry_with_a_valid_checksum_but_pickled_objects_is_refused(site, caplog):
    """Entries are loaded weights-only: a crafted file cannot run code even if its checksum matches."""
    import hashlib
    import io

    _, items, state = site
    chain = _chain()
    _, ds = _dataset(state, items, chain)
    entry = disk_cache.cache_dir_for(state) / f"{ds.keys[0]}.pt"
    buffer = io.BytesIO()
    torch.save({"image": _Evil(), "label": torch.zeros(1)}, buffer, pickle_module=pickle)
    payload = buffer.getvalue()
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.write_bytes(MAGIC + hashlib.sha256(payload).hexdigest().encode() + payload)
    with caplog.at_level(logging.WARNING, logger="fedimaging.cache"):
        value = ds[0]
    assert not _Evil.called and "damaged" in caplog.text and _same(value, _direct(items[0], chain))


class _Evil:
    called = False

    def __reduce__(self):
        return (_Evil._run, ())

    @staticmethod
    def _run():
        _Evil.called = True
        return None


def test_size_bound_evicts_unused_entries_first_and_never_thrashes(site, tmp_path):
    _, items, state = site
    chain = _chain()
    _, ds = _dataset(state, items, chain)
    [ds[i] for i in range(3)]
    entry_bytes = max(p.stat().st_size for p in disk_cache.cache_dir_for(state).glob("*.pt"))
    bound_mb = 2.5 * entry_bytes / 2**20  # room for two entries
    other_items = [_case(tmp_path / "newer", f"n{i}", seed=10 + i) for i in range(3)]
    store, newer = _dataset(state, other_items, chain, max_mb=bound_mb)
    for _ in range(2):  # two epochs over a dataset that does not fit
        [newer[i] for i in range(3)]
    kept = {p.stem for p in disk_cache.cache_dir_for(state).glob("*.pt")}
    assert store.size_bytes() <= store.max_bytes
    assert kept == set(newer.keys[:2])  # the old dataset's entries went first; the first two stay
    assert (store.misses, store.hits) == (4, 2)  # the third case is recomputed, nothing is evicted for it


def test_random_augmentation_runs_after_the_cache(site):
    _, items, state = site
    prefix = _chain()
    chain = Compose(list(prefix.transforms) + [RandGaussianNoised("image", prob=1.0, std=0.5)])
    store, ds = _dataset(state, items, chain)
    ds.transform.set_random_state(seed=1)
    first = ds[0]
    second = ds[0]
    assert not torch.equal(first["image"], second["image"])  # fresh noise on every access
    cached = store.load(ds.keys[0])
    assert _same(cached, _direct(items[0], prefix))  # the entry holds the deterministic prefix only
    assert set(cached) == {"image", "label"} and all(isinstance(v, torch.Tensor) for v in cached.values())


def test_no_cache_inside_the_dataset_folder(site, caplog):
    data, _, state = site
    with caplog.at_level(logging.WARNING, logger="fedimaging.cache"):
        assert site_cache(data / "private" / "state", data, 100) is None
    assert "state-dir" in caplog.text
    assert site_cache(state, data, 0) is None  # disk-cache-mb = 0: off
    assert site_cache(state, data, 100).root == state / "cache" / "preprocessed"


def test_cache_may_be_deleted_at_any_time(site):
    import shutil

    _, items, state = site
    chain = _chain()
    _, ds = _dataset(state, items, chain)
    ds[0]
    shutil.rmtree(state / "cache")
    store, again = _dataset(state, items, chain)
    assert _same(again[0], _direct(items[0], chain)) and store.misses == 1


def test_a_corrupt_case_is_reported_as_a_dataset_error_when_the_site_is_prepared(site):
    """With the disk cache, cases not cached yet are read at prepare time (as MONAI's CacheDataset did)."""
    from types import SimpleNamespace

    from data_prep.site_dataset import DatasetError
    from tasks.data import cached_site_data

    data, items, state = site
    broken = Path(items[1]["image"])
    broken.write_bytes(broken.read_bytes()[: 352 + 100])  # header intact, voxels cut off
    cases = tuple(SimpleNamespace(image=Path(i["image"])) for i in items)
    dataset = SimpleNamespace(root=data, training=cases, test=())
    with disk_cache.using(PreprocessedCache(disk_cache.cache_dir_for(state), 50)):
        with pytest.raises(DatasetError, match="could not be read"):
            cached_site_data(dataset, "CT", items, [], _chain(), _chain(), (3.0, 3.0, 3.0), 100, channels=2)
