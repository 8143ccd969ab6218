"""``fedimaging split``: simulated sites are valid, disjoint, seeded, and say they are simulated."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_prep.nifti_import import import_dataset
from data_prep.site_dataset import load_site_dataset
from data_prep.split import SplitError, split_dataset, split_main
from tests.prep.test_nifti_import import _image, _label, _save


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    """A 12-case imported dataset: 4 uint8 and 8 float32 images (two storage conventions)."""
    root = tmp_path_factory.mktemp("split")
    src, training = root / "in", []
    for i in range(12):
        dtype = np.uint8 if i < 4 else np.float32
        _save(src / "imagesTr" / f"p{i:02d}.nii.gz", _image(i, dtype=dtype))
        _save(src / "labelsTr" / f"p{i:02d}.nii.gz", _label(i))
        training.append({"image": f"imagesTr/p{i:02d}.nii.gz", "label": f"labelsTr/p{i:02d}.nii.gz"})
    (src / "dataset.json").write_text(json.dumps({
        "name": "Toy", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "a", "2": "b"},
        "training": training, "test": []}))
    assert import_dataset(src, root / "site").exit_code == 0
    return root / "site"


def _sites(out: Path, n: int):
    return [load_site_dataset(out / f"site-{i}") for i in range(n)]


def _images(ds) -> list[bytes]:
    return sorted(c.image.read_bytes() for c in ds.training + ds.test)


def test_iid_split_is_valid_disjoint_complete_and_seeded(imported, tmp_path):
    summary = split_dataset(imported, tmp_path / "a", 3, "iid", 0.25, seed=5)
    sites = _sites(tmp_path / "a", 3)
    source = load_site_dataset(imported)
    pool = sorted(c.image.read_bytes() for c in source.training + source.test)
    assert sorted(b for s in sites for b in _images(s)) == pool  # every case once, none in two sites
    for i, s in enumerate(sites):
        assert (len(s.training), len(s.test)) == (3, 1)
        assert summary["counts"][f"site-{i}"] == {"training": 3, "test": 1}
        train_names = {c.name for c in s.training}
        assert train_names.isdisjoint({c.name for c in s.test})
        assert s.extra["simulated"] is True
    split_json = (tmp_path / "a" / "split.json").read_text()
    meta = json.loads(split_json)
    assert meta["simulated"] is True and "SIMULATED" in meta["note"] and meta["seed"] == 5
    assert "case-" not in split_json  # no case names outside private/
    assignment = json.loads((tmp_path / "a" / "private" / "split_assignment.json").read_text())
    assert sorted(assignment) == sorted(c.name for c in source.training + source.test)
    split_dataset(imported, tmp_path / "b", 3, "iid", 0.25, seed=5)
    assert [_images(s) for s in _sites(tmp_path / "b", 3)] == [_images(s) for s in sites]
    split_dataset(imported, tmp_path / "c", 3, "iid", 0.25, seed=6)
    assert [_images(s) for s in _sites(tmp_path / "c", 3)] != [_images(s) for s in sites]


def test_size_dirichlet_and_field_methods(imported, tmp_path):
    summary = split_dataset(imported, tmp_path / "size", 3, "size", 0.0, seed=1)
    assert [c["training"] for c in summary["counts"].values()] == [2, 4, 6]  # shares 1:2:3
    summary = split_dataset(imported, tmp_path / "dir", 2, "dirichlet:0.5", 0.0, seed=3)
    assert sum(c["training"] for c in summary["counts"].values()) == 12
    summary = split_dataset(imported, tmp_path / "field", 3, "field:dtype", 0.25, seed=1)
    groups = [c["groups"] for c in summary["counts"].values()]
    assert groups == [{"float32": 4}, {"float32": 4}, {"uint8": 4}]  # one storage convention per site
    for i, s in enumerate(_sites(tmp_path / "field", 3)):
        dtypes = {nib.load(str(c.image)).get_data_dtype().name
                  for c in s.training + s.test}
        assert dtypes == {list(groups[i])[0]}


def test_split_refuses_what_it_cannot_do(imported, tmp_path, capsys):
    with pytest.raises(SplitError, match="no training case"):
        split_dataset(imported, tmp_path / "x", 13, "iid", 0.0)
    assert not (tmp_path / "x").exists()  # nothing half-written
    with pytest.raises(SplitError, match="identifies cases"):
        split_dataset(imported, tmp_path / "y", 2, "field:case")
    assert split_main([str(imported), str(imported / "inner"), "--sites", "2"]) == 2
    assert "inside" in capsys.readouterr().err
    assert split_main([str(imported), str(tmp_path / "z"), "--sites", "2", "--by", "dirichlet:-1"]) == 2


def test_multichannel_sites_keep_every_channel(tmp_path):
    from tests.prep.test_nifti_import import _nnunet

    assert import_dataset(_nnunet(tmp_path / "in", 3), tmp_path / "site").exit_code == 0
    split_dataset(tmp_path / "site", tmp_path / "out", 2, "iid", 0.0, seed=0)
    source = {c.name: c for c in load_site_dataset(tmp_path / "site").training}
    for s in _sites(tmp_path / "out", 2):
        assert s.channel_names == ("T2", "ADC")
        for case in s.training:
            assert [p.read_bytes() for p in case.images] == [p.read_bytes() for p in source[case.name].images]
    fingerprint = json.loads((tmp_path / "out" / "site-0" / "fingerprint.json").read_text())
    assert fingerprint["channel_names"] == {"0": "T2", "1": "ADC"} and set(fingerprint["channels"]) == {"T2", "ADC"}
