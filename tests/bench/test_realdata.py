"""bench.realdata: the MedMNIST-to-NIfTI conversion, the simulated sites, and both benchmarks end to end (tiny)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from app.predict import predict_main
from bench import realdata
from bench.realdata import adrenal_to_nifti
from bench.realdata_sites import build_adrenal_sites

HIPPOCAMPUS = realdata.default_data("hippocampus")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _blob(rng: np.random.Generator, size: int, radius: float) -> np.ndarray:
    """A binary 0/255 ellipsoid, like MedMNIST's adrenal shape masks."""
    grid = np.indices((size,) * 3).astype(float) - (size - 1) / 2 - rng.uniform(-2, 2, 3)[:, None, None, None]
    axes = radius * rng.uniform(0.7, 1.3, 3)[:, None, None, None]
    return np.where(((grid / axes) ** 2).sum(0) <= 1.0, 255, 0).astype(np.uint8)


def _npz(path: Path, n_train: int, n_val: int, size: int = 28, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("val", n_val)):
        labels = np.array([i % 2 for i in range(n)])
        arrays[f"{split}_images"] = np.stack([_blob(rng, size, 5.0 + 3.0 * y) for y in labels])
        arrays[f"{split}_labels"] = labels[:, None]
    np.savez(path, **arrays)
    return path


def test_adrenal_to_nifti_keeps_values_in_ras_at_medmnist_spacing(tmp_path):
    volume = np.random.default_rng(1).integers(0, 256, (28, 28, 28), dtype=np.uint8)
    image = nib.load(str(adrenal_to_nifti(volume, tmp_path / "a" / "case.nii.gz")))
    assert image.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), volume)
    np.testing.assert_allclose(image.header.get_zooms(), [64 / 28] * 3)
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    assert int(image.header["sform_code"]) == 1
    big = nib.load(str(adrenal_to_nifti(np.zeros((64,) * 3, np.uint8), tmp_path / "b.nii.gz")))
    np.testing.assert_allclose(big.header.get_zooms(), [1.0] * 3)
    with pytest.raises(ValueError, match="cubic"):
        adrenal_to_nifti(np.zeros((28, 28, 20), np.uint8), tmp_path / "c.nii.gz")
    with pytest.raises(ValueError, match="uint8"):
        adrenal_to_nifti(np.zeros((28,) * 3, np.float32), tmp_path / "d.nii.gz")


def test_adrenal_recipe_feeds_the_medmnist_array_unchanged(tmp_path):
    """Recipe spacing 64/28 mm, size 28^3 and window 0..255: the network sees exactly volume / 255."""
    from app.config import parse_run_config
    from tasks import get_task

    volume = _blob(np.random.default_rng(4), 28, 7.0)
    path = adrenal_to_nifti(volume, tmp_path / "case_0000.nii.gz")
    task = get_task("classification", parse_run_config(realdata.RECIPES["adrenal"]).task_settings())
    image = task.inference_transform("CT")({"image": str(path)})["image"]
    assert tuple(image.shape) == (1, 28, 28, 28)
    np.testing.assert_allclose(np.asarray(image[0]), volume / 255.0, atol=1e-6)


def test_adrenal_sites_are_stratified_and_test_cases_are_medmnist_val(tmp_path):
    npz = _npz(tmp_path / "x.npz", 30, 12)
    summary = build_adrenal_sites(npz, tmp_path / "sites", 3, seed=2)
    seen = {"train": set(), "val": set()}
    for s in range(3):
        meta = json.loads((tmp_path / "sites" / f"site-{s}" / "dataset.json").read_text())
        assert meta["simulated"] is True and meta["labels"] == {"normal": 0, "mass": 1}
        assert len(meta["training"]) == 10 and len(meta["test"]) == 4
        assert sorted(e["label"] for e in meta["training"]).count(1) == 5  # stratified: half of each class
        for split, entries in (("train", meta["training"]), ("val", meta["test"])):
            for e in entries:
                index = int(e["image"].split(f"adrenal-{split}-")[1][:4])  # MedMNIST's own split and index
                assert index not in seen[split]
                seen[split].add(index)
                assert e["label"] == index % 2  # the label travels with its volume
    assert seen == {"train": set(range(30)), "val": set(range(12))}
    assert summary["simulated"] and summary["counts"]["site-0"] == {
        "training": 10, "test": 4, "training_classes": {"0": 5, "1": 5}}


def _auc(scores: np.ndarray, positive: np.ndarray) -> float:
    pos, neg = scores[positive], scores[~positive]
    return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg)))


def _quick_adrenal(tmp_path: Path, n_train: int, n_val: int, *args: str) -> Path:
    """``bench.realdata adrenal --quick`` on 2 sites, FedAvg, of a generated npz; returns --out."""
    npz, out = _npz(tmp_path / "adrenal.npz", n_train, n_val), tmp_path / "out"
    assert realdata.main(["adrenal", "--data", str(npz), "--out", str(out), "--sites", "2", "--quick",
                          "--strategies", "fedavg", *args, "--run-config", "torch-threads=1"]) == 0
    return out


@pytest.mark.slow  # about 20 s: five arms (one with DP-SGD), one round each, tiny ResNet and shape descriptors
def test_adrenal_benchmark_end_to_end(tmp_path):
    out = _quick_adrenal(tmp_path, 16, 8, "--local-sites", "1", "--dp-epsilon", "8")  # the default DP recipe
    report = json.loads((out / "realdata.json").read_text())
    arms = report["arms"]
    local = [a for a in arms if a.startswith("local-")]
    control = realdata.DP_CONTROL
    assert set(arms) == {"pooled", "fedavg", control, "fedavg-dp8", *local} and len(local) == 1
    assert report["local_arms_sampled"] and report["simulated_sites"]
    assert arms["fedavg-dp8"]["dp_epsilon_spent_max"] == pytest.approx(8.0, abs=0.05)
    assert "dp_epsilon_spent_max" not in arms[control]
    # the DP recipe (shape descriptors, a trained head) in the DP arm and its control, not elsewhere; it keeps
    # its own network in the smoke run (whose tiny ResNet the other arms train)
    assert report["dp_settings"] == {**realdata.parse_overrides(realdata.DP_RECIPE), "classifier-norm": "group"}
    configs = {a: json.loads((out / "runs" / a / "run_config.json").read_text()) for a in arms}
    assert configs["fedavg-dp8"]["classifier"] == configs[control]["classifier"] == "shape-descriptors"
    assert configs["fedavg"]["classifier"] == "resnet10" and configs["fedavg"]["classifier-width"] == 0.125
    assert configs["fedavg-dp8"]["dp-epsilon"] == 8.0 and configs["fedavg-dp8"]["classifier-feature-norm"] == "layer"
    # the control trains DP-SGD's network (GroupNorm where there is a norm), not FedAvg's BatchNorm one
    assert configs[control]["classifier-norm"] == "group" and configs["fedavg"]["classifier-norm"] == "batch"
    assert configs[control]["dp-epsilon"] == 0.0 and configs[control]["lr"] == configs["fedavg-dp8"]["lr"] == 0.05
    from app.config import parse_run_config
    from tasks import get_task
    fresh = get_task("classification", parse_run_config(
        {k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in configs["fedavg-dp8"].items()
         if not k.startswith("_")}).task_settings()).build_model().state_dict()
    for arm in ("fedavg-dp8", control):
        trained = torch.load(out / "runs" / arm / "final_model.pt", weights_only=True)
        assert set(trained) == set(fresh) == {"fc.weight", "fc.bias"}  # the head is all there is to train
        assert all(not torch.equal(v, fresh[k]) for k, v in trained.items())
    goal = next(g for g in report["goals"] if g.startswith("fedavg-dp8"))
    assert f"same recipe without DP ({control})" in goal
    for arm in arms.values():
        assert set(arm["sites"]) == {"site-0", "site-1"} and arm["peak_rss_mb"] > 0 and arm["seconds"] > 0
        assert arm["held_out"]["num-examples"] == 8
    assert "| fedavg-dp8 |" in (out / "realdata.md").read_text()
    tests = sorted((out / "sites").glob("site-*/imagesTs/*.nii.gz"))
    labels = {Path(e["image"]).name: e["label"] for s in (0, 1)
              for e in json.loads((out / "sites" / f"site-{s}" / "dataset.json").read_text())["test"]}
    for name in arms:
        run_dir = out / "runs" / name
        assert (run_dir / "run_config.json").is_file()
        preds = tmp_path / "pred" / name
        assert predict_main(["--model", str(run_dir / "final_model.pt"), "--input", *map(str, tests),
                             "--output", str(preds), "--modality", "CT", "--device", "cpu", "--quiet",
                             "--class-names", "normal,mass"]) == 0
        results = [json.loads(p.read_text()) for p in sorted(preds.glob("*_pred.json"))]
        assert len(results) == len(tests)
        for r in results:
            assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        # predict on the NIfTI files gives the AUC the benchmark reports over the held-out cases
        scores = np.array([r["probabilities"]["mass"] for r in results])
        truth = np.array([labels[f"{r['case']}_0000.nii.gz"] == 1 for r in results])
        assert arms[name]["held_out"]["auc"] == pytest.approx(_auc(scores, truth), abs=1e-6)


def _tiny_msd(target: Path, n_float: int = 6, n_uint8: int = 2) -> Path:
    """An MSD-layout copy of a few real cases: ``n_float`` float32-stored and ``n_uint8`` uint8-stored."""
    meta = json.loads((HIPPOCAMPUS / "dataset.json").read_text())
    chosen, want = [], {"float32": n_float, "uint8": n_uint8}
    for entry in meta["training"]:
        dtype = str(nib.load(str(HIPPOCAMPUS / entry["image"])).get_data_dtype())
        if want.get(dtype, 0) > 0:
            want[dtype] -= 1
            chosen.append(entry)
        if not any(want.values()):
            break
    for entry in chosen:
        for key in ("image", "label"):
            (target / entry[key]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(HIPPOCAMPUS / entry[key], target / entry[key])
    (target / "dataset.json").write_text(json.dumps({**meta, "numTraining": len(chosen), "training": chosen}))
    return target


@pytest.mark.slow  # about 15 s: import, split, seven arms of one round on a tiny UNet
@pytest.mark.skipif(not (HIPPOCAMPUS / "dataset.json").is_file(), reason="../shared/realdata/msd_hippocampus absent")
def test_hippocampus_benchmark_end_to_end(tmp_path):
    source = _tiny_msd(tmp_path / "msd")
    out = tmp_path / "out"
    assert realdata.main(["hippocampus", "--data", str(source), "--out", str(out), "--quick",
                          "--strategies", "fedavg,ditto", "--run-config", "torch-threads=1"]) == 0
    report = json.loads((out / "realdata.json").read_text())
    groups = {s: c["groups"] for s, c in report["split"]["counts"].items()}
    assert sorted(map(list, (g.keys() for g in groups.values()))) == [["float32"]] * 3 + [["uint8"]]
    assert report["split"]["import"]["dtype"] == {"float32": 6, "uint8": 2}
    arms = report["arms"]
    assert set(arms) == {"pooled", "fedavg", "ditto", *(f"local-site-{i}" for i in range(4))}
    for arm in arms.values():
        for metrics in arm["sites"].values():
            assert {"dice", "dice-Anterior", "dice-Posterior"} <= set(metrics)
        assert arm["held_out"]["num-examples"] == 4  # one test case per site
    # The personalization arm: each site's personal model, beside the global model's Dice.
    personal = [arms["ditto"]["sites"][f"site-{i}"]["personal-dice"] for i in range(4)]
    assert arms["ditto"]["personal_mean"] == pytest.approx(np.mean(personal))
    assert "personal_mean" not in arms["fedavg"]
    assert sorted(p.name for p in (out / "state" / "ditto").glob("site-*/runs/*/personal-round-*.pt"))
    assert any(g.startswith("ditto: every site's personal dice >= its local-only") for g in report["goals"])
    assert "| ditto: personal models |" in (out / "realdata.md").read_text()
    case = source / "imagesTr" / sorted(p.name for p in (source / "imagesTr").iterdir())[0]
    original = nib.load(str(case))
    for name in ("pooled", "fedavg", "local-site-0"):
        mask_path = tmp_path / f"{name}_seg.nii.gz"
        assert predict_main(["--model", str(out / "runs" / name / "final_model.pt"), "--input", str(case),
                             "--output", str(mask_path), "--device", "cpu", "--quiet"]) == 0
        mask = nib.load(str(mask_path))
        assert mask.shape == original.shape and np.allclose(mask.affine, original.affine)
        assert set(np.unique(np.asanyarray(mask.dataobj))) <= {0, 1, 2}


@pytest.mark.slow  # about 10 s: three imports and splits of eight real cases
@pytest.mark.skipif(not (HIPPOCAMPUS / "dataset.json").is_file(), reason="../shared/realdata/msd_hippocampus absent")
def test_hippocampus_sites_are_the_same_in_every_run_of_a_seed(tmp_path):
    """The import's pseudonyms come from a seed-derived secret, so the seeded split (and each site's
    case order) repeats; before, every run drew a random secret and so different sites."""
    from bench.realdata_sites import build_hippocampus_sites

    source = _tiny_msd(tmp_path / "msd")

    def sites(work: Path, seed: int) -> dict[str, list[str]]:
        build_hippocampus_sites(source, work, sites=4, seed=seed)
        secret = work / "imported" / "private" / "site_secret.key"
        assert secret.stat().st_mode & 0o777 == 0o600
        return {p.name: sorted(q.name for q in (p / "imagesTr").iterdir())
                for p in sorted((work / "sites").glob("site-*"))}

    first, again, other = sites(tmp_path / "a", 0), sites(tmp_path / "b", 0), sites(tmp_path / "c", 1)
    assert first == again and len(first) == 4
    assert first != other  # another seed: other pseudonyms


def test_personal_goal_compares_each_site_with_its_local_and_global_model():
    from bench.realdata_report import _personal_goal

    arms = {"ditto": {"metric": "dice", "sites": {"site-0": {"dice": 0.80, "personal-dice": 0.85},
                                                  "site-1": {"dice": 0.80, "personal-dice": 0.78}}},
            "local-site-0": {"sites": {"site-0": {"dice": 0.86}}}}
    assert _personal_goal("ditto", arms).endswith("not met (below: site-0, site-1)")  # 0.85 < local 0.86; 0.78 < 0.80
    arms["local-site-0"]["sites"]["site-0"]["dice"] = 0.84
    arms["ditto"]["sites"]["site-1"]["personal-dice"] = 0.80
    assert _personal_goal("ditto", arms).endswith(": met")


def test_skip_leaves_out_the_pooled_and_local_arms_and_refuses_unknown_names(tmp_path, capsys):
    out = _quick_adrenal(tmp_path, 8, 4, "--dp-epsilon", "0", "--skip", "pooled,local")
    npz = tmp_path / "adrenal.npz"
    report = json.loads((out / "realdata.json").read_text())
    assert set(report["arms"]) == {"fedavg"} and report["skipped"] == ["local", "pooled"]
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["fedavg"]
    assert "left out of this run (--skip): local, pooled" in (out / "realdata.md").read_text()
    for bad, message in ((["--skip", "fedavg"], "--skip takes pooled and/or local, not fedavg"),
                         (["--skip", "pooled,local", "--strategies", ""], "nothing to run")):
        with pytest.raises(SystemExit):
            realdata.main(["adrenal", "--data", str(npz), "--out", str(tmp_path / "x"), "--dp-epsilon", "0", *bad])
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x").exists()


def test_adrenal_goals_judge_only_the_arms_that_ran():
    from bench.realdata_report import goals

    def arm(auc):
        return {"held_out": {"auc": auc}, "sites": {}, "seconds": 1.0, "dp_epsilon_spent_max": 8.0}

    base = {"benchmark": "adrenal", "setup_seconds": 0.0, "process_peak_rss_mb": 900.0, "sites": 10}
    without_fedavg = goals({**base, "arms": {"pooled": arm(0.86), "fedavg-dp8": arm(0.80)}})
    assert not any(g.startswith("FedAvg held-out AUC") for g in without_fedavg)  # not "not met": not run
    assert "fedavg-dp8: AUC 0.800; the drop vs FedAvg without DP (goal <= 5 %) is not measured" in without_fedavg[0]
    with_fedavg = goals({**base, "arms": {"fedavg": arm(0.84), "fedavg-dp8": arm(0.80)}})
    assert with_fedavg[0].endswith(": met") and with_fedavg[0].startswith("FedAvg held-out AUC 0.840")
    drop = 100 * (0.84 - 0.80) / 0.84  # 4.8 %
    assert with_fedavg[1].startswith(f"fedavg-dp8: relative AUC drop vs FedAvg without DP {drop:.1f} % (goal <= 5 %): met")


def test_dp_run_config_is_refused_for_the_hippocampus_benchmark(tmp_path, capsys):
    with pytest.raises(SystemExit):
        realdata.main(["hippocampus", "--data", str(tmp_path), "--out", str(tmp_path / "x"), "--dp-run-config", "lr=1"])
    assert "--dp-run-config is for the adrenal benchmark" in capsys.readouterr().err
    npz = _npz(tmp_path / "adrenal.npz", 4, 2)
    with pytest.raises(SystemExit):  # a DP recipe without a DP arm is a mistake, not a no-op
        realdata.main(["adrenal", "--data", str(npz), "--out", str(tmp_path / "y"), "--dp-epsilon", "0",
                       "--dp-run-config", "lr=1"])
    assert "--dp-epsilon 0 leaves out" in capsys.readouterr().err and not (tmp_path / "y").exists()
