"""Fuzz the site dataset loader: random and boundary values in dataset.json fields and in the files
it names. Every outcome must be a valid SiteDataset or a DatasetError, never another exception
(issue 18). Seeded: a failure prints the case number, and ``_case(seed, i)`` rebuilds it."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import time
from pathlib import Path

import pytest

from data_prep.site_dataset import DatasetError, SiteDataset, load_site_dataset
from tests.data.test_site_dataset import _classification_site, make_site

CASES = 300
SEED = 18


def _deep(depth: int):
    value: object = "x"
    for _ in range(depth):
        value = [value]
    return value


BOUNDARY = [
    None, True, False, 0, 1, -1, 2, 255, 256, 2**31, 2**63, 10**400, -(10**400), 0.5, -0.0, 1e308,
    float("nan"), float("inf"), float("-inf"), "", " ", "\x00", "a\x00b", "x" * 5000, "\ud800",
    "é/ü.nii.gz", "../outside_0000.nii.gz", "/etc/passwd", "~/x.nii.gz", ".", "imagesTr", "dataset.json",
    "imagesTr/caseTr0_0000.nii.gz", "labelsTr/caseTr0.nii.gz", "imagesTs/caseTs0_0000.nii.gz",
    "imagesTr/loop_0000.nii.gz", "imagesTr/missing_0000.nii.gz", [], {}, [1, 2], {"image": 1},
    {"0": "CT"}, {"0": "PET"}, {"0": "CT", "1": "MR"}, ("deep", 50), ("deep", 900),
]
TOP_KEYS = ["name", "channel_names", "labels", "training", "test", "file_ending", "numTraining", "extra"]
ENTRY_KEYS = ["image", "label", "other"]


def _value(rng: random.Random):
    if rng.random() < 0.8:
        value = rng.choice(BOUNDARY)
        return _deep(value[1]) if isinstance(value, tuple) else copy.deepcopy(value)
    kind = rng.randrange(4)
    if kind == 0:
        return rng.randint(-(2**70), 2**70)
    if kind == 1:
        return rng.uniform(-1e6, 1e6)
    if kind == 2:
        return "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(0, 40)))
    return {str(rng.randrange(5)): rng.randrange(-3, 300) for _ in range(rng.randrange(0, 4))}


def _mutate_json(meta: dict, rng: random.Random) -> None:
    for _ in range(rng.randint(1, 3)):
        where = rng.randrange(4)
        if where == 0:  # a top-level key replaced, or removed
            key = rng.choice(TOP_KEYS)
            if rng.random() < 0.2:
                meta.pop(key, None)
            else:
                meta[key] = _value(rng)
        elif where == 1 and isinstance(meta.get("training"), list) and meta["training"]:
            entry = rng.choice(meta["training"])
            if isinstance(entry, dict):
                entry[rng.choice(ENTRY_KEYS)] = _value(rng)
        elif where == 2 and isinstance(meta.get("labels"), dict):
            value = rng.choice([0, 1, 2, 3, 255, 256, -1, 10**400]) if rng.random() < 0.7 else _value(rng)
            meta["labels"][rng.choice(["background", "organ", "lesion", "new"])] = value
        elif isinstance(meta.get("training"), list):  # duplicates and overlaps
            lists = [meta["training"]] + ([meta["test"]] if isinstance(meta.get("test"), list) else [])
            if meta["training"]:
                rng.choice(lists).append(rng.choice(meta["training"]))  # meta is this case's own


def _mutate_files(root: Path, rng: random.Random) -> None:
    files = sorted(p for p in root.rglob("*.nii.gz") if p.is_file())
    target = rng.choice(files)
    action = rng.randrange(6)
    data = target.read_bytes()
    if action == 0:
        target.write_bytes(data[: rng.randrange(len(data))])
    elif action == 1:
        buf = bytearray(data)
        for _ in range(rng.randint(1, 20)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        target.write_bytes(bytes(buf))
    elif action == 2:
        target.write_bytes(os.urandom(rng.randrange(0, 600)))
    elif action == 3:
        target.unlink()
    elif action == 4:
        target.unlink()
        target.symlink_to(target.name)  # points at itself
    else:
        target.unlink()
        target.mkdir()


def _base_sites(tmp: Path) -> list[Path]:
    seg = make_site(tmp / "seg", n_train=2, n_test=1)
    cls = _classification_site(tmp / "cls", [0, 1])
    for root in (seg, cls):
        os.symlink("loop_0000.nii.gz", root / "imagesTr" / "loop_0000.nii.gz")
    return [seg, cls]


def _case(bases: list[Path], work: Path, seed: int, i: int) -> Path:
    rng = random.Random(seed * 100_003 + i)
    base = rng.choice(bases)
    meta = json.loads((base / "dataset.json").read_text())
    if rng.random() < 0.85:
        _mutate_json(meta, rng)
    if rng.random() < 0.3:  # files change: a copy of its own
        root = work / f"case{i}" / "site"
        shutil.copytree(base, root, symlinks=True)
        _mutate_files(root, rng)
    else:  # only dataset.json changes: one reusable copy per base site
        root = work / f"json-{base.name}"
        if not root.exists():
            shutil.copytree(base, root, symlinks=True)
    try:
        text = json.dumps(meta)
    except (ValueError, RecursionError):  # a value JSON cannot hold: write the raw structure's text
        text = "{" + "[" * 5000
    (root / "dataset.json").write_text(text, encoding="utf-8", errors="surrogatepass")
    return root


def test_loader_only_ever_returns_a_dataset_or_raises_dataset_error(tmp_path):
    bases = _base_sites(tmp_path / "bases")
    outcomes = {"valid": 0, "refused": 0}
    start = time.perf_counter()
    for i in range(CASES):
        root = _case(bases, tmp_path / "work", SEED, i)
        try:
            site = load_site_dataset(root)
        except DatasetError as exc:
            outcomes["refused"] += 1
            message = str(exc)
            assert message and len(message) < 2000, (i, message[:300])
        except BaseException as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"case {i} (seed {SEED}): {type(exc).__name__}: {str(exc)[:300]}")
        else:
            assert isinstance(site, SiteDataset) and site.training
            assert all(c.image.is_file() for c in site.training + site.test)
            outcomes["valid"] += 1
    # both outcomes occur, so the fuzzing reaches past the first checks
    assert outcomes["valid"] >= 10 and outcomes["refused"] >= CASES // 2, outcomes
    assert time.perf_counter() - start < 120
