"""Site data caching: read and resample each case once per site process, within a memory bound.

Flower keeps a site's ClientApp process alive across rounds; re-reading and resampling every
NIfTI each round would dominate a round's time. MONAI's ``CacheDataset`` keeps the
deterministic prefix of the transform chain in memory; ``cache_rate`` is chosen so the cache
stays under ``cache_max_mb`` (the rest is recomputed on access). When the ClientApp sets a
site's disk cache (:mod:`tasks.cache`), the deterministic prefix is read from there instead, so a
new process (Flower starts one per message) does not re-prepare the site.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from data_prep.site_dataset import Case, DatasetError

log = logging.getLogger("fedimaging.tasks")


def estimated_bytes(cases: tuple[Case, ...], spacing: tuple[float, float, float], channels: int = 2) -> int:
    """Bytes a case list takes after resampling to ``spacing`` (float32, image + label)."""
    total = 0
    for case in cases:
        header = nib.load(str(case.image)).header
        zooms = np.array(header.get_zooms()[:3], dtype=float)
        shape = np.array(header.get_data_shape()[:3], dtype=float)
        resampled = np.ceil(shape * zooms / np.array(spacing))
        total += int(np.prod(resampled)) * 4 * channels
    return total


def cache_rate_for(cases: tuple[Case, ...], spacing, budget_mb: int, channels: int = 2) -> float:
    """Fraction of cases to cache so that the cache stays within ``budget_mb``."""
    need = estimated_bytes(cases, spacing, channels)
    if need == 0:
        return 1.0
    return float(min(1.0, budget_mb * 1024 * 1024 / need))


def seeded_generator(seed: int) -> torch.Generator:
    """A torch generator for DataLoader shuffling that depends only on ``seed``."""
    generator = torch.Generator()
    generator.manual_seed(int(seed) % (2**63))
    return generator


class SiteDataCache:
    """Prepared site data by key, least recently used first out, at most ``max_sites`` kept."""

    def __init__(self, max_sites: int = 8) -> None:
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._max_sites = max_sites

    def get(self, key: Hashable, factory: Callable[[], Any]) -> Any:
        """Return the cached value for ``key``, building it with ``factory`` on first use."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        value = factory()
        self._entries[key] = value
        while len(self._entries) > self._max_sites:
            self._entries.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class SiteData:
    """A site's cached datasets (``train`` may be a concatenation: pooled baselines)."""

    train: Dataset
    test: Dataset | None
    num_train_cases: int
    modality: str
    random_parts: list = field(default_factory=list)  # datasets whose random transforms to seed

    def reseed(self, seed: int) -> None:
        """Seed the random transforms of every training part (MONAI Randomizable)."""
        for offset, part in enumerate(self.random_parts or [self.train]):
            part.transform.set_random_state(seed=(seed + offset) % (2**32))


def pooled_site_data(parts: list[SiteData]) -> SiteData:
    """All sites' training cases in one dataset: the centralised (pooled) baseline."""
    return SiteData(
        train=ConcatDataset([p.train for p in parts]),
        test=None,
        num_train_cases=sum(p.num_train_cases for p in parts),
        modality="mixed",
        random_parts=[p.train for p in parts],
    )


def cached_site_data(
    dataset: Any, modality: str, train_items: list[dict], test_items: list[dict], train_transform: Any,
    test_transform: Any, spacing, budget_mb: int, channels: int,
) -> SiteData:
    """Cache a site's train (and test) cases within ``budget_mb`` (split between the two)."""
    from monai.data import CacheDataset

    from tasks.cache import active, cached_dataset

    log.info("Preparing the site's data: %d training and %d test cases (read from the site's preprocessed "
             "cache where present, else loaded and resampled)", len(train_items), len(test_items))
    started = time.monotonic()
    budget = budget_mb // 2 if test_items else budget_mb
    disk = active()
    try:
        if disk is not None:  # persistent cache under state-dir (tasks.cache); memory holds what fits the budget
            def dataset_for(items, transform, cases):
                ds = cached_dataset(disk, items, transform,
                                    int(len(items) * cache_rate_for(cases, spacing, budget, channels)))
                ds.build_missing()  # cases not cached yet are read now, so a corrupt one is reported here
                return ds

            train = dataset_for(train_items, train_transform, dataset.training)
            test = dataset_for(test_items, test_transform, dataset.test) if test_items else None
        else:
            train = CacheDataset(train_items, train_transform, num_workers=0, progress=False,
                                 cache_rate=cache_rate_for(dataset.training, spacing, budget, channels))
            test = None
            if test_items:
                test = CacheDataset(test_items, test_transform, num_workers=0, progress=False,
                                    cache_rate=cache_rate_for(dataset.test, spacing, budget, channels))
    except Exception as exc:  # noqa: BLE001 - corrupt voxels surface only when MONAI reads them
        raise DatasetError(f"{dataset.root}: a case could not be read ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:300] if str(exc) else ''})") from exc
    log.info("Prepared the site's data in %.1f s", time.monotonic() - started)
    return SiteData(train, test, len(train_items), modality)


def image_item(case: Case) -> str | list[str]:
    """What LoadImaged reads for a case: one file, or one file per channel (stacked as channels)."""
    return str(case.image) if len(case.images) == 1 else [str(p) for p in case.images]


def check_channels(dataset: Any, in_channels: int) -> None:
    """A site's image channels must match the model's ``in_channels``; the message says what to set."""
    if dataset.num_channels != in_channels:
        raise DatasetError(
            f"{dataset.root}: dataset has {dataset.num_channels} channel(s) {list(dataset.channel_names)} but the "
            f"model takes {in_channels}; set --run-config 'in-channels={dataset.num_channels}'"
        )


def prepare_site_data(dataset: Any, settings: Any, train_transform: Any, test_transform: Any,
                      label: Callable[[Any], Any], channels: int) -> SiteData:
    """The prepare step both tasks share: the dataset's case lists, cached through the transforms.

    ``label`` turns a case's label (a path or a class index) into what the transforms expect;
    test cases without a label are not evaluated. ``channels``: float32 arrays per case after
    preprocessing (image channels, plus the label map for segmentation), for the cache budget.
    """
    train_items = [{"image": image_item(c), "label": label(c.label)} for c in dataset.training]
    test_items = [{"image": image_item(c), "label": label(c.label)} for c in dataset.test if c.label is not None]
    return cached_site_data(dataset, dataset.modality, train_items, test_items, train_transform, test_transform,
                            settings.spacing, settings.cache_max_mb, channels=channels)
