"""Multi-channel images end to end: import, a 1-round study, predict (per-channel files or 4D), bundle.

Two sites with two-channel (T2, ADC) images, imported from nnU-Net-style folders, train through
the real ServerApp and ClientApp logic on an in-process grid. Sites whose channels disagree stop
the study before round 1 with a message naming the site.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import run as bundle_run

from app.client_app import app as client_app
from app.export_bundle import export_main
from app.predict import predict_main
from app.preflight import ChannelMismatchError, check_channels
from app.server_app import run_study
from bench.local_grid import LocalGrid
from data_prep.nifti_import import import_dataset
from data_prep.site_dataset import load_site_dataset
from tasks.base import TaskSettings
from tasks.channels import ChannelNormalize
from tasks.classification import ClassificationTask

SHAPE = (20, 18, 16)
TINY = {
    "num-server-rounds": 1, "local-epochs": 1, "spacing": "2,2,2", "roi-size": "16,16,16",
    "channels": "4,8,16", "crops-per-case": 1, "batch-size": 2, "cross-site": False, "demo": False,
    "min-available-sites": 2, "torch-threads": 1, "in-channels": 2,
}


def _write_site(src: Path, names: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for i in range(3):
        lab = np.zeros(SHAPE, np.uint8)
        lab[5:12, 6:13, 4:11] = 1
        for c in range(len(names)):
            img = rng.normal(100 + 50 * c, 10, SHAPE).astype(np.float32) + 80 * lab * (c + 1)
            (src / "imagesTr").mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(img, np.diag([1.5, 1.5, 1.5, 1])), str(src / "imagesTr" / f"c{i}_{c:04d}.nii.gz"))
        (src / "labelsTr").mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(lab, np.diag([1.5, 1.5, 1.5, 1])), str(src / "labelsTr" / f"c{i}.nii.gz"))
    (src / "dataset.json").write_text(json.dumps({
        "name": "mc", "channel_names": {str(c): n for c, n in enumerate(names)},
        "labels": {"background": 0, "lesion": 1}, "file_ending": ".nii.gz"}))


def _federation(root: Path, names_per_site: list[list[str]]) -> Path:
    for s, names in enumerate(names_per_site):
        _write_site(root / "raw" / f"site-{s}", names, s)
        assert import_dataset(root / "raw" / f"site-{s}", root / "sites" / f"site-{s}", test_fraction=0.34).exit_code == 0
    return root / "sites"


def _study(root: Path, sites: Path, **extra) -> Path:
    raw = {**TINY, "home": str(root / "home"), "run-dir": str(root / "run"),
           "data-path-template": str(sites / "{site}"), **extra}
    grid = LocalGrid(client_app, [{"partition-id": i, "num-partitions": 2} for i in range(2)], raw)
    return run_study(grid, raw, run_id=3)


@pytest.fixture(scope="module")
def mc_run(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("mc")
    sites = _federation(root, [["T2", "ADC"], ["T2", "ADC"]])
    return _study(root, sites), sites


def test_two_channel_study_trains_and_evaluates(mc_run):
    run_dir, _ = mc_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["phase"]) for r in records] == [(1, "train"), (1, "evaluate")]
    assert set(records[0]["sites"]) == {"site-0", "site-1"} and records[0]["excluded"] == {}
    assert all(m["num-examples"] == 2 for m in records[0]["sites"].values())
    assert 0.0 <= records[1]["aggregate"]["dice"] <= 1.0
    assert json.loads((run_dir / "channels.json").read_text())["channel-names"] == ["T2", "ADC"]
    final = torch.load(run_dir / "final_model.pt", weights_only=True)
    first_conv = [v for k, v in final.items() if k.endswith("conv.weight")][0]
    assert first_conv.shape[1] == 2  # in_channels


def test_predict_takes_per_channel_files_or_a_4d_file_and_the_bundle_agrees(mc_run, tmp_path):
    run_dir, sites = mc_run
    case = load_site_dataset(sites / "site-0").test[0]
    out1, out2 = tmp_path / "a_seg.nii.gz", tmp_path / "b_seg.nii.gz"
    assert predict_main(["--model", str(run_dir / "final_model.pt"), "--input", str(case.images[0]),
                         "--output", str(out1), "--device", "cpu"]) == 0
    stacked = np.stack([np.asanyarray(nib.load(str(p)).dataobj) for p in case.images], axis=-1)
    four_d = tmp_path / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(stacked, nib.load(str(case.image)).affine), str(four_d))
    assert predict_main(["--model", str(run_dir / "final_model.pt"), "--input", str(four_d),
                         "--output", str(out2), "--device", "cpu"]) == 0
    mask = np.asanyarray(nib.load(str(out1)).dataobj)
    assert mask.shape == SHAPE and np.array_equal(mask, np.asanyarray(nib.load(str(out2)).dataobj))
    assert predict_main(["--model", str(run_dir / "final_model.pt"), "--input", str(tmp_path / "nope_0000.nii.gz"),
                         "--output", str(tmp_path / "c.nii.gz"), "--device", "cpu"]) == 1

    bundle = tmp_path / "bundle"
    assert export_main([str(run_dir), str(bundle)]) == 0
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    assert config["network_def"]["in_channels"] == 2
    bundle_run(config_file=str(bundle / "configs/inference.json"), bundle_root=str(bundle),
               input_files=[str(p) for p in case.images], output_dir=str(tmp_path / "bo"),
               device="$torch.device('cpu')")
    produced = sorted((tmp_path / "bo").glob("*.nii.gz"))
    assert len(produced) == 1 and np.array_equal(np.asanyarray(nib.load(str(produced[0])).dataobj), mask)


def test_sites_with_other_channels_stop_the_study_before_round_one(tmp_path):
    sites = _federation(tmp_path, [["T2", "ADC"], ["T2", "FLAIR"]])
    with pytest.raises(ChannelMismatchError, match="site 'site-1' has image channels"):
        _study(tmp_path, sites)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ChannelMismatchError, match="in-channels=2"):
        check_channels({"site-0": ["T2", "ADC"]}, 1)
    assert check_channels({"a": ["CT"], "b": ["MR"]}, 1) == ["CT"]  # one channel: modality may differ


def test_mixed_ct_and_mr_channels_are_normalised_each_their_way():
    rng = np.random.default_rng(0)
    img = torch.as_tensor(np.stack([rng.normal(0, 300, (6, 5, 4)), rng.normal(500, 80, (6, 5, 4))]), dtype=torch.float32)
    out = ChannelNormalize(("CT", "MR"), (-150.0, 250.0))(img).numpy()
    expected_ct = np.clip((img[0].numpy() + 150.0) / 400.0, 0, 1)
    mr = img[1].numpy()
    np.testing.assert_allclose(out[0], expected_ct, atol=1e-6)
    np.testing.assert_allclose(out[1], (mr - mr.mean()) / mr.std(), atol=1e-4)


def test_classification_model_takes_the_channels():
    task = ClassificationTask(TaskSettings(in_channels=3, spacing=(6.0, 6.0, 6.0), classification_size=(32, 32, 32)),
                              architecture={"init_features": 8, "growth_rate": 4, "block_config": (1, 1, 1, 1)})
    model = task.build_model().eval()
    assert model(torch.zeros(2, 3, 32, 32, 32)).shape == (2, 2)


def test_sites_that_do_not_describe_their_channels_are_left_to_the_rounds(tmp_path):
    from app.preflight import check_site_channels
    from bench.strategy_server_cost import SyntheticGrid

    assert check_site_channels(SyntheticGrid(2), 1, tmp_path) == []  # answers without channel names
    assert not (tmp_path / "channels.json").exists()
