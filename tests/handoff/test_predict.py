"""fedimaging predict: the mask lies on the input's grid and equals the in-training evaluation's."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, EnsureTyped

from app.predict import predict_main, predict_segmentation
from app.predict_input import open_case
from app.predict_model import load_model, read_run_config
from data_prep.synthetic_dicom import write_volume
from tasks import get_task
from tasks.segmentation import preprocessing

from .fixtures import save_random_model, write_run_config


def _mask(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img.affine


def test_mask_has_the_input_geometry_and_matches_evaluation(seg_run, ct_case, tmp_path):
    out = tmp_path / "mask.nii.gz"
    assert predict_main(["--model", str(seg_run / "final_model.pt"), "--input", str(ct_case),
                         "--output", str(out), "--device", "cpu"]) == 0
    mask, affine = _mask(out)
    source = nib.load(str(ct_case))
    assert mask.shape == source.shape and mask.dtype == np.uint8
    assert np.array_equal(affine, source.affine)  # the input is stored LPS: not RAS
    assert nib.aff2axcodes(source.affine) != ("R", "A", "S")
    assert set(np.unique(mask)) <= {0, 1, 2} and len(np.unique(mask)) > 1

    # Independent path: the task's own evaluation chain + predict_logits, then resampled back with nibabel.
    loaded = load_model(seg_run / "final_model.pt", device="cpu")
    s = loaded.task.settings
    item = Compose(preprocessing("CT", s.spacing, s.ct_window, keys=("image",)))({"image": str(ct_case)})
    with torch.no_grad():
        logits = loaded.task.predict_logits(loaded.model.cpu(), item["image"][None])
    label = logits[0].argmax(0).cpu().numpy().astype(np.uint8)
    result = predict_segmentation(loaded, open_case(ct_case, tmp_path), "CT")
    assert np.array_equal(result.task_space_label, label)  # same voxels at task spacing
    # Nearest neighbour back onto the input grid, computed here with numpy from the two affines
    # (the task grid's affine from the spatial steps alone). Exact ties (a coordinate half-way
    # between two task voxels) may round either way: they are left out of the comparison.
    spatial = [t for t in preprocessing("CT", s.spacing, s.ct_window, keys=("image",)) if not isinstance(t, EnsureTyped)]
    grid = Compose(spatial[:4])({"image": str(ct_case)})["image"]
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in source.shape], indexing="ij"), -1).reshape(-1, 3)
    to_task = np.linalg.inv(np.asarray(grid.affine, dtype=float)) @ source.affine
    coords = ijk @ to_task[:3, :3].T + to_task[:3, 3]
    tie = np.any(np.abs(np.abs(coords - np.floor(coords)) - 0.5) < 1e-4, axis=1)
    nearest = np.clip(np.rint(coords).astype(int), 0, np.array(label.shape) - 1)
    expected = label[tuple(nearest.T)].reshape(source.shape)
    clear = ~tie.reshape(source.shape)
    assert clear.mean() > 0.3
    assert np.array_equal(expected[clear], mask[clear])
    assert np.array_equal(result.mask, mask)


def test_axis_permuted_input_gives_the_permuted_mask(seg_run, ct_case, tmp_path):
    """Same physical image stored with axes permuted and flipped: the mask follows the storage order."""
    source = nib.load(str(ct_case))
    data = np.asanyarray(source.dataobj)
    perm = (2, 0, 1)
    permuted = np.flip(np.transpose(data, perm), axis=1).copy()
    affine = source.affine[:, list(perm) + [3]].copy()
    # flipping storage axis 1: index i -> n-1-i
    n = permuted.shape[1]
    affine[:3, 3] += affine[:3, 1] * (n - 1)
    affine[:3, 1] *= -1
    odd = tmp_path / "odd_0000.nii.gz"
    nib.save(nib.Nifti1Image(permuted, affine), str(odd))
    assert nib.aff2axcodes(affine) not in (nib.aff2axcodes(source.affine), ("R", "A", "S"))

    out = tmp_path / "out"
    assert predict_main(["--model", str(seg_run / "final_model.pt"), "--input", str(ct_case), str(odd),
                         "--output", str(out), "--quiet", "--device", "cpu"]) == 0
    ref, _ = _mask(out / f"{ct_case.name[:-12]}_seg.nii.gz")
    got, got_affine = _mask(out / "odd_seg.nii.gz")
    assert got.shape == permuted.shape
    assert np.array_equal(got_affine, nib.load(str(odd)).affine)
    assert np.array_equal(got, np.flip(np.transpose(ref, perm), axis=1))


def test_dicom_series_input(seg_run, ct_case, tmp_path):
    source = nib.load(str(ct_case))
    volume = np.asanyarray(source.dataobj).astype(np.int16)
    folder = tmp_path / "series"
    write_volume(folder, source.affine, volume, modality="CT")
    out_dicom = tmp_path / "dicom_seg.nii.gz"
    assert predict_main(["--model", str(seg_run / "final_model.pt"), "--input", str(folder),
                         "--output", str(out_dicom), "--device", "cpu"]) == 0
    mask, affine = _mask(out_dicom)
    assert mask.shape == volume.shape
    np.testing.assert_allclose(affine, source.affine, atol=1e-4)  # the geometry written into DICOM
    # the same voxels as a NIfTI give the same mask
    out_nifti = tmp_path / "nifti_seg.nii.gz"
    assert predict_main(["--model", str(seg_run / "final_model.pt"), "--input", str(ct_case),
                         "--output", str(out_nifti), "--device", "cpu"]) == 0
    assert np.array_equal(mask, _mask(out_nifti)[0])


def test_mr_case_and_modality_guess(seg_run, demo_mr, tmp_path):
    case = sorted((demo_mr / "imagesTs").glob("*.nii.gz"))[0]
    loaded = load_model(seg_run / "final_model.pt", device="cpu")
    result = predict_segmentation(loaded, open_case(case, tmp_path))
    assert result.modality == "MR"
    assert result.mask.shape == nib.load(str(case)).shape


def test_usage_errors(seg_run, ct_case, tmp_path, capsys):
    out = tmp_path / "m.nii.gz"
    args = ["--model", str(seg_run / "final_model.pt"), "--input", str(ct_case), "--output", str(out), "--device", "cpu"]
    assert predict_main(args) == 0
    assert predict_main(args) == 1  # exists: needs --force
    assert "--force" in capsys.readouterr().err
    assert predict_main(args + ["--force"]) == 0
    assert predict_main(["--model", str(tmp_path / "nope.pt"), "--input", str(ct_case), "--output", str(out)]) == 2
    assert "nope.pt not found" in capsys.readouterr().err
    lonely = tmp_path / "lonely" / "final_model.pt"  # a model without its run directory
    lonely.parent.mkdir()
    lonely.write_bytes((seg_run / "final_model.pt").read_bytes())
    assert predict_main(["--model", str(lonely), "--input", str(ct_case), "--output", str(out)]) == 2
    assert "--config" in capsys.readouterr().err
    # a model file that does not match the run config
    other = tmp_path / "other"
    write_run_config(other, channels="8,16")
    torch.save(torch.load(seg_run / "final_model.pt", weights_only=True), other / "final_model.pt")
    assert predict_main(["--model", str(other / "final_model.pt"), "--input", str(ct_case), "--output", str(out)]) == 2
    assert "does not match" in capsys.readouterr().err
    # --config names the run config explicitly
    assert predict_main(["--model", str(other / "final_model.pt"), "--config", str(seg_run / "run_config.json"),
                         "--input", str(ct_case), "--output", str(out), "--force", "--device", "cpu"]) == 0


def test_checkpoint_path_finds_the_run_config(seg_run, tmp_path):
    run = tmp_path / "run"
    write_run_config(run)
    save_random_model(run)
    (run / "checkpoints").mkdir()
    (run / "final_model.pt").rename(run / "checkpoints" / "best.pt")
    loaded = load_model(run / "checkpoints" / "best.pt", device="cpu")
    assert loaded.run_dir == run.resolve()


def test_fedbn_needs_and_uses_site_layers(ct_case, tmp_path, capsys):
    run = tmp_path / "run-fedbn"
    write_run_config(run, strategy="fedbn")
    save_random_model(run)
    args = ["--model", str(run / "final_model.pt"), "--input", str(ct_case), "--output", str(tmp_path / "o.nii.gz")]
    assert predict_main(args) == 2
    assert "--site" in capsys.readouterr().err
    # the site's layers as the ClientApp stores them: <state-dir>/runs/<run name>/fedbn-round-NNNNNN.pt
    config = json.loads((run / "run_config.json").read_text())
    task = get_task("segmentation", read_run_config(run / "run_config.json").task_settings())
    model = task.build_model()
    local = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v
             for k, v in model.state_dict().items() if k in task.local_param_names(model)}
    assert local, "the UNet has normalisation layers"
    state_dir = tmp_path / "state" / "site-a"
    (state_dir / "runs" / run.name).mkdir(parents=True)
    torch.save(local, state_dir / "runs" / run.name / "fedbn-round-000003.pt")
    torch.save({k: v * 0 for k, v in local.items()}, state_dir / "runs" / run.name / "fedbn-round-000002.pt")
    loaded = load_model(run / "final_model.pt", site_state=state_dir, device="cpu")
    assert loaded.site_state.name == "fedbn-round-000003.pt"  # the latest round
    state = loaded.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in local.items())
    # --site NAME resolves <state-root>/<NAME> from the run config
    config["state-root"] = str(tmp_path / "state")
    (run / "run_config.json").write_text(json.dumps(config))
    assert predict_main(args + ["--site", "site-a", "--device", "cpu"]) == 0


def test_personal_needs_a_personalized_run_and_uses_the_sites_latest_personal_model(ct_case, tmp_path, capsys):
    plain = tmp_path / "run-plain"
    write_run_config(plain)
    save_random_model(plain)
    out = ["--input", str(ct_case), "--output", str(tmp_path / "o.nii.gz"), "--device", "cpu"]
    assert predict_main(["--model", str(plain / "final_model.pt"), "--personal", "--site", "site-a", *out]) == 2
    assert "personalization=none" in capsys.readouterr().err
    run = tmp_path / "run-ditto"
    write_run_config(run, personalization="ditto")
    save_random_model(run)
    assert predict_main(["--model", str(run / "final_model.pt"), "--personal", *out]) == 2
    assert "--site-state" in capsys.readouterr().err  # a personal model is only at its site
    model = get_task("segmentation", read_run_config(run / "run_config.json").task_settings()).build_model()
    personal = {k: torch.full_like(v, 0.25) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    folder = tmp_path / "state" / "site-a" / "runs" / run.name
    folder.mkdir(parents=True)
    torch.save({k: v * 0 for k, v in personal.items()}, folder / "personal-round-000001.pt")
    torch.save(personal, folder / "personal-round-000002.pt")
    loaded = load_model(run / "final_model.pt", site_state=folder.parents[1], device="cpu", personal=True)
    assert loaded.site_state.name == "personal-round-000002.pt"
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in personal.items())
    final = load_model(run / "final_model.pt", device="cpu").model.state_dict()  # without --personal: the global model
    assert not all(torch.equal(final[k], v) for k, v in personal.items())


@pytest.mark.slow  # a full-size DenseNet121 (about 15 s on a shared CPU)
def test_classification_writes_class_probabilities(tmp_path, ct_case):
    run = tmp_path / "run-cls"
    write_run_config(run, task="classification")
    save_random_model(run)
    out = tmp_path / "pred.json"
    assert predict_main(["--model", str(run / "final_model.pt"), "--input", str(ct_case), "--output", str(out),
                         "--device", "cpu", "--class-names", "no-lesion,lesion"]) == 0
    result = json.loads(out.read_text())
    probs = result["probabilities"]
    assert list(probs) == ["no-lesion", "lesion"]
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert result["predicted"] == max(probs, key=probs.get)
    # the task's own inference chain and predict_proba give the same numbers
    loaded = load_model(run / "final_model.pt", device="cpu")
    image = loaded.task.inference_transform("CT")({"image": str(ct_case)})["image"]
    expected = loaded.task.predict_proba(loaded.model, image[None])[0].numpy()
    np.testing.assert_allclose([probs["no-lesion"], probs["lesion"]], expected, rtol=1e-5, atol=1e-6)


def test_shape_descriptors_warn_about_an_empty_mask_and_predict_from_a_box(tmp_path, capsys):
    run = tmp_path / "run-shape"
    write_run_config(run, task="classification", classifier="shape-descriptors", **{"ct-window": "0,255",
                     "spacing": "2,2,2", "classification-size": "16,16,16"})
    save_random_model(run)
    box, empty = np.zeros((16, 16, 16), np.uint8), np.zeros((16, 16, 16), np.uint8)
    box[4:12, 5:11, 3:13] = 255
    inputs = []
    for name, volume in (("box", box), ("empty", empty)):
        inputs.append(tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(volume, np.diag([2.0, 2.0, 2.0, 1.0])), str(inputs[-1]))
    out = tmp_path / "pred"
    assert predict_main(["--model", str(run / "final_model.pt"), "--input", *map(str, inputs), "--output", str(out),
                         "--device", "cpu", "--modality", "CT", "--quiet"]) == 0
    results = {p.name.split("_")[0]: json.loads(p.read_text()) for p in out.glob("*_pred.json")}
    assert "warnings" not in results["box"]
    assert len(results["empty"]["warnings"]) == 1 and "channel 0 has no foreground" in results["empty"]["warnings"][0]
    assert "warning:" in capsys.readouterr().err
    head = torch.load(run / "final_model.pt", weights_only=True)
    bias_only = torch.softmax(head["fc.bias"].double(), 0).numpy()  # zero descriptors: the bias alone
    np.testing.assert_allclose(list(results["empty"]["probabilities"].values()), bias_only, rtol=1e-5)
    assert not np.allclose(list(results["box"]["probabilities"].values()), bias_only, rtol=1e-3)
