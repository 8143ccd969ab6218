"""Site datasets for the real-data benchmarks: AdrenalMNIST3D arrays to NIfTI, MSD Hippocampus import + split.

Both data sets are one source each, so every site here is a SIMULATED split of one data set,
never a hospital (``split.json`` says so). The source folders are only read.

* AdrenalMNIST3D (MedMNIST v2): each uint8 volume becomes one NIfTI file (:func:`adrenal_to_nifti`).
  MedMNIST's ``train`` cases are dealt to the sites as training cases (stratified by class,
  seeded); MedMNIST's ``val`` cases are the held-out test cases, dealt the same way, so each site
  evaluates on its share and the benchmark also scores every model on all of them together.
  Nothing of ``val`` is ever trained on.
* MSD Hippocampus: ``fedimaging import`` (both storage conventions kept as published), then
  ``fedimaging split --by field:dtype``: the uint8-stored cases form one site, the float32 cases
  the others; each site holds out ``test_fraction`` of its cases (seeded) as its test cases.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np

from data_prep.nifti_writer import write_nifti
from data_prep.site_dataset import write_dataset_json
from fedimaging.io import atomic_path, atomic_write_json

ADRENAL_CLASSES = {"normal": 0, "mass": 1}  # MedMNIST v2 AdrenalMNIST3D label meaning
MEDMNIST_FIELD_OF_VIEW_MM = 64.0  # MedMNIST 3D: volumes are resized from a 64 mm cube
ADRENAL_NOTE = ("These sites are SIMULATED: bench.realdata dealt one public data set (AdrenalMNIST3D, one "
                "source) to them, stratified by class. They share one source's scanners and protocols, so results "
                "on them do not show how a real federation behaves.")


def adrenal_to_nifti(volume: np.ndarray, path: str | Path) -> Path:
    """One MedMNIST 3D uint8 array (D, D, D) to one NIfTI file, RAS, spacing 64/D mm, values unchanged.

    MedMNIST's 3D volumes are a 64 mm field of view resampled to D^3 voxels, so a voxel is
    64/D mm on each axis; array axis 0/1/2 become the NIfTI i/j/k axes, oriented R/A/S, origin at
    the cube's corner. The file is written atomically.
    """
    array = np.asarray(volume)
    if array.ndim != 3 or len(set(array.shape)) != 1:
        raise ValueError(f"expected one cubic (D, D, D) volume, got shape {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 MedMNIST volume, got {array.dtype}")
    spacing = MEDMNIST_FIELD_OF_VIEW_MM / array.shape[0]
    affine = np.diag([spacing, spacing, spacing, 1.0])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_nifti(path, np.ascontiguousarray(array), affine)
    return path


def _deal_stratified(labels: np.ndarray, sites: int, rng: np.random.Generator) -> list[list[int]]:
    """Case indices per site: each class shuffled and dealt round-robin (continuing across classes)."""
    out: list[list[int]] = [[] for _ in range(sites)]
    turn = 0
    for value in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == value))
        for index in members:
            out[turn % sites].append(int(index))
            turn += 1
    return [sorted(s) for s in out]


def build_adrenal_sites(npz: str | Path, out: str | Path, sites: int, seed: int = 0,
                        max_train: int = 0, max_test: int = 0) -> dict:
    """Simulated classification sites ``out/site-K`` from a MedMNIST 3D ``*_trainval.npz``; returns split.json.

    ``max_train``/``max_test`` (0 = all) keep a seeded, stratified subset (tests, quick runs).
    """
    npz, out = Path(npz), Path(out)
    with np.load(npz) as arrays:
        data = {k: arrays[k] for k in ("train_images", "train_labels", "val_images", "val_labels")}
    rng = np.random.default_rng(seed)
    parts = {}
    for split, cap in (("train", max_train), ("val", max_test)):
        labels = data[f"{split}_labels"].reshape(-1).astype(int)
        keep = np.arange(len(labels))
        if cap and cap < len(labels):  # one stratified share of about ``cap`` cases
            keep = np.array(_deal_stratified(labels, -(-len(labels) // cap), rng)[0])
        parts[split] = (keep, labels, _deal_stratified(labels[keep], sites, rng))
    if any(not p for p in parts["train"][2]):
        raise ValueError(f"{sites} sites but only {len(parts['train'][0])} training cases: every site needs one")
    counts = {}
    for s in range(sites):
        site_dir = out / f"site-{s}"
        entries = {"train": [], "val": []}
        for split, (keep, labels, dealt) in parts.items():
            folder = "imagesTr" if split == "train" else "imagesTs"
            for local in dealt[s]:
                index = int(keep[local])
                rel = f"{folder}/adrenal-{split}-{index:04d}_0000.nii.gz"
                adrenal_to_nifti(data[f"{split}_images"][index], site_dir / rel)
                entries[split].append({"image": rel, "label": int(labels[index])})
        write_dataset_json(site_dir, f"AdrenalMNIST3D-site-{s}", "CT", ADRENAL_CLASSES, entries["train"],
                           entries["val"], simulated=True,
                           description="MedMNIST v2 AdrenalMNIST3D (CC BY 4.0): binary adrenal shape masks "
                                       "(0/255) from abdominal CT; label normal (0) / adrenal mass (1)")
        counts[f"site-{s}"] = {"training": len(entries["train"]), "test": len(entries["val"]),
                               "training_classes": dict(Counter(str(e["label"]) for e in entries["train"]))}
    summary = {"simulated": True, "note": ADRENAL_NOTE, "source": {"name": "AdrenalMNIST3D", "file": npz.name},
               "method": "stratified iid", "seed": seed, "sites": sites,
               "held_out": "MedMNIST val split (never trained on), dealt to the sites as their test cases",
               "counts": counts}
    atomic_write_json(out / "split.json", summary)
    return summary


def _seeded_site_secret(imported: Path, seed: int) -> None:
    """Give the benchmark's import a site secret derived from ``seed`` (before ``fedimaging import``
    would create a random one), so that the pseudonymous case names, and with them the seeded split
    and the order of every site's cases, are the same in every run. Only for this public data set: a
    hospital's import keeps its random secret, which is what makes its pseudonyms unlinkable."""
    from data_prep import deid

    path = deid.private_dir(imported) / deid.SECRET_FILE
    if not path.exists():
        secret = hashlib.sha256(f"bench.realdata hippocampus seed {seed}".encode()).hexdigest()
        with atomic_path(path, private=True) as tmp:
            tmp.write_text(secret + "\n")


def build_hippocampus_sites(source: str | Path, work: str | Path, sites: int = 4, seed: int = 0,
                            test_fraction: float = 0.2, workers: int = 1) -> dict:
    """``fedimaging import`` into ``work/imported``, then ``fedimaging split --by field:dtype`` into ``work/sites``."""
    from data_prep.nifti_import import import_dataset
    from data_prep.split import split_dataset

    work = Path(work)
    _seeded_site_secret(work / "imported", seed)
    result = import_dataset(source, work / "imported", workers=workers)
    if result.exit_code != 0:
        raise RuntimeError(f"fedimaging import of {source} failed (exit {result.exit_code}):\n{result.table}")
    summary = split_dataset(work / "imported", work / "sites", sites, by="field:dtype",
                            test_fraction=test_fraction, seed=seed, force=True)
    report = json.loads((work / "imported" / "prep_report.json").read_text(encoding="utf-8"))
    summary["import"] = {"cases": len(report.get("cases", [])),
                         "dtype": dict(Counter(str(c.get("dtype")) for c in report.get("cases", [])))}
    return summary
