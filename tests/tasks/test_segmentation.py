"""SegmentationTask: geometry of the transforms, learning, Dice/HD95 against hand computations,
and the FedProx/SCAFFOLD terms of the shared local loop."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from unittest import mock

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import CacheDataset, MetaTensor
from monai.transforms import Compose, EnsureTyped
from scipy import ndimage

from data_prep.demo import write_demo_site
from data_prep.site_dataset import load_site_dataset
from tasks.base import LocalTrainingOptions, TaskSettings
from tasks.data import SiteData as SegmentationSiteData
from tasks.segmentation import SegmentationTask, preprocessing
from tasks.training import train_local

TINY = dict(roi_size=(16, 16, 16), channels=(4, 8, 16, 32), batch_size=2, crops_per_case=2)


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


def _spatial_chain(spacing, ct_window=(0.0, 2000.0)) -> Compose:
    """The task's preprocessing, keeping MONAI metadata so the output affine can be read."""
    steps = [t for t in preprocessing("CT", spacing, ct_window) if not isinstance(t, EnsureTyped)]
    return Compose(steps)


def _lps_case(tmp_path: Path):
    shape = (10, 12, 8)
    affine = np.array([[-2.0, 0, 0, 30], [0, -2.0, 0, 40], [0, 0, 3.0, -5], [0, 0, 0, 1]])  # stored L-P-S
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    image = (100 * i + 5 * j + k + 1).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[2, 3, 4] = 2
    label[5:8, 6:9, 2:5] = 1
    return {
        "image": _nifti(tmp_path / "img.nii.gz", image, affine),
        "label": _nifti(tmp_path / "lab.nii.gz", label, affine),
    }, image, label, affine


def test_preprocessing_reorients_lps_to_ras_without_resampling(tmp_path):
    item, image, label, _ = _lps_case(tmp_path)
    out = _spatial_chain((2.0, 2.0, 3.0))(item)
    assert isinstance(out["image"], MetaTensor)
    assert out["image"].shape == (1, 10, 12, 8) and out["label"].shape == (1, 10, 12, 8)
    # RAS: i and j (stored L and P) are flipped; spacing unchanged, axes positive
    assert np.allclose(np.asarray(out["image"].affine)[:3, :3], np.diag([2.0, 2.0, 3.0]))
    assert nib.aff2axcodes(np.asarray(out["image"].affine)) == ("R", "A", "S")
    expected = image[::-1, ::-1, :] / 2000.0  # CT window (0, 2000) -> [0, 1]
    assert np.allclose(out["image"][0].numpy(), expected, atol=1e-5)
    assert np.array_equal(out["label"][0].numpy(), label[::-1, ::-1, :])
    assert out["label"][0, 7, 8, 4] == 2  # the marker voxel at stored (2, 3, 4)


def test_preprocessing_resamples_to_task_spacing(tmp_path):
    item, _, label, affine = _lps_case(tmp_path)
    out = _spatial_chain((4.0, 4.0, 6.0))(item)
    out_affine = np.asarray(out["image"].affine)
    assert np.allclose(np.diag(out_affine)[:3], (4.0, 4.0, 6.0), atol=1e-4)
    assert np.allclose(out_affine[:3, :3], np.diag(np.diag(out_affine)[:3]), atol=1e-6)
    extent = np.array(label.shape) * np.abs(np.diag(affine)[:3])
    assert np.all(np.abs(np.array(out["image"].shape[1:]) - extent / (4.0, 4.0, 6.0)) <= 1)
    assert out["label"].shape == out["image"].shape
    assert set(np.unique(out["label"].numpy()).tolist()) <= {0.0, 1.0, 2.0}  # nearest: no blends
    # the first output voxel sits where the RAS-most-negative input corner is (same physical origin)
    corner_in = affine @ np.array([label.shape[0] - 1, label.shape[1] - 1, 0, 1])
    assert np.allclose(out_affine[:3, 3], corner_in[:3], atol=1e-4)


def test_mr_intensity_is_zscored_inside_the_body(tmp_path):
    image = np.zeros((8, 8, 8), np.float32)
    image[2:6, 2:6, 2:6] = np.linspace(100, 500, 64).reshape(4, 4, 4)
    path = _nifti(tmp_path / "mr.nii.gz", image, np.eye(4))
    out = Compose(preprocessing("MR", (1.0, 1.0, 1.0), (0, 1), keys=("image",)))({"image": path})["image"]
    body = out[0, 2:6, 2:6, 2:6].numpy()
    assert abs(body.mean()) < 1e-4 and abs(body.std() - 1.0) < 1e-3
    assert float(out[0, 0, 0, 0]) == 0.0


def _fixed_site(task: SegmentationTask, n: int = 2, seed: int = 0) -> SegmentationSiteData:
    """A site whose training data is fixed tensors (no random transforms): a fixed batch."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        label = torch.zeros(1, 16, 16, 16)
        label[:, 4:11, 4:12, 3:10] = 1
        label[:, 6:9, 6:9, 5:8] = 2
        image = label * 0.8 + 0.3 * torch.randn(1, 16, 16, 16, generator=gen)
        items.append({"image": image, "label": label})
    train = CacheDataset(items, Compose([]), progress=False)
    return SegmentationSiteData(train, None, n, "CT")


def _fixed_loss(task, model, site) -> float:
    batch = [site.train[i] for i in range(len(site.train))]
    x = torch.stack([b["image"] for b in batch])
    y = torch.stack([b["label"] for b in batch])
    model.eval()
    with torch.no_grad():
        return float(task.loss_fn(model(x), y))


def test_training_lowers_the_loss_on_a_fixed_batch():
    task = SegmentationTask(TaskSettings(lr=1e-2, **TINY))
    site = _fixed_site(task)
    model = task.build_model()
    before = _fixed_loss(task, model, site)
    result = task.train(model, site, LocalTrainingOptions(epochs=3, seed=1))
    assert result.steps == 3 and result.num_examples == 2
    after = _fixed_loss(task, model, site)
    assert after < before - 0.02, (before, after)


def test_build_model_is_identical_everywhere():
    task = SegmentationTask(TaskSettings(**TINY))
    a, b = task.build_model().state_dict(), task.build_model().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = SegmentationTask(TaskSettings(**{**TINY, "seed": 7})).build_model().state_dict()
    assert any(not torch.equal(a[k], other[k]) for k in a)


def _distance(model, reference: dict[str, torch.Tensor]) -> float:
    return float(sum(((p.detach() - reference[n]) ** 2).sum() for n, p in model.named_parameters()) ** 0.5)


def test_fedprox_keeps_weights_closer_to_the_global_model():
    task = SegmentationTask(TaskSettings(lr=2e-2, optimizer="sgd", **TINY))
    site = _fixed_site(task)
    start = task.build_model()
    global_weights = {n: p.detach().clone() for n, p in start.named_parameters()}
    distances = {}
    for mu in (0.0, 5.0):
        model = copy.deepcopy(start)
        task.train(model, site, LocalTrainingOptions(epochs=6, seed=3, proximal_mu=mu))
        distances[mu] = _distance(model, global_weights)
    assert distances[0.0] > 0
    assert distances[5.0] < 0.9 * distances[0.0], distances


def test_scaffold_variate_is_the_mean_raw_gradient():
    """train_local against a hand-written SCAFFOLD loop on a linear model (SGD with momentum)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    xs = [torch.randn(4, 3) for _ in range(3)]
    ys = [torch.randn(4, 2) for _ in range(3)]
    c = {n: torch.randn_like(p) * 0.1 for n, p in model.named_parameters()}
    c_i = {n: torch.randn_like(p) * 0.1 for n, p in model.named_parameters()}
    lr, epochs = 0.05, 2

    def step_loss(net, batch):
        return ((net(batch[0]) - batch[1]) ** 2).mean()

    reference = copy.deepcopy(model)
    trained = copy.deepcopy(model)
    options = LocalTrainingOptions(epochs=epochs, scaffold_server=c, scaffold_site=c_i)
    _, steps, _, delta = train_local(trained, lambda e: zip(xs, ys), step_loss, options, "sgd", lr)
    assert steps == epochs * len(xs)

    # hand-written: gradient corrected by (c - c_i), SGD momentum 0.9, K steps
    opt = torch.optim.SGD(reference.parameters(), lr=lr, momentum=0.9)
    raw = {n: torch.zeros_like(p) for n, p in reference.named_parameters()}
    for _ in range(epochs):
        for x, y in zip(xs, ys):
            opt.zero_grad()
            step_loss(reference, (x, y)).backward()
            for n, p in reference.named_parameters():
                raw[n] += p.grad
                p.grad += c[n] - c_i[n]
            opt.step()
    for n, p in reference.named_parameters():
        assert torch.allclose(dict(trained.named_parameters())[n], p, atol=1e-6)
        # c_i+ = mean raw local gradient; delta = c_i+ - c_i
        assert torch.allclose(delta[n], raw[n] / steps - c_i[n], atol=1e-5)


def test_scaffold_variate_equals_option_two_under_plain_sgd():
    """Without momentum the mean raw gradient is SCAFFOLD's option II, c_i - c + (x - y_i) / (K lr)."""
    torch.manual_seed(2)
    model = torch.nn.Linear(3, 1)
    xs, ys = [torch.randn(5, 3) for _ in range(4)], [torch.randn(5, 1) for _ in range(4)]
    c = {n: torch.randn_like(p) * 0.1 for n, p in model.named_parameters()}
    c_i = {n: torch.randn_like(p) * 0.1 for n, p in model.named_parameters()}
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr = 0.05
    plain = lambda params, lr: torch.optim.SGD(params, lr=lr)  # noqa: E731
    with mock.patch("tasks.training.make_optimizer", lambda name, params, lr: plain(params, lr)):
        _, steps, _, delta = train_local(model, lambda e: zip(xs, ys), lambda net, b: ((net(b[0]) - b[1]) ** 2).mean(),
                                         LocalTrainingOptions(epochs=1, scaffold_server=c, scaffold_site=c_i), "sgd", lr)
    for n, p in model.named_parameters():
        option_two = c_i[n] - c[n] + (start[n] - p.detach()) / (steps * lr)
        assert torch.allclose(delta[n], option_two - c_i[n], atol=1e-5)


def test_scaffold_without_site_variate_starts_from_zero():
    torch.manual_seed(1)
    model = torch.nn.Linear(2, 1)
    batch = (torch.randn(3, 2), torch.randn(3, 1))
    c = {n: torch.full_like(p, 0.2) for n, p in model.named_parameters()}
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    options = LocalTrainingOptions(scaffold_server=c)
    _, steps, _, delta = train_local(
        model, lambda e: [batch], lambda net, b: ((net(b[0]) - b[1]) ** 2).mean(), options, "sgd", 0.1
    )
    # one step: the mean raw gradient is the gradient at the start, which the first SGD step
    # (no momentum yet) undid after the correction c: g = (start - p) / lr - c
    for n, p in model.named_parameters():
        assert torch.allclose(delta[n], (start[n] - p.detach()) / 0.1 - c[n], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Evaluation against hand computations
# ---------------------------------------------------------------------------------------------
def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    denominator = pred.sum() + truth.sum()
    return 1.0 if denominator == 0 else 2.0 * np.logical_and(pred, truth).sum() / denominator


def _hd95(pred: np.ndarray, truth: np.ndarray, spacing) -> float:
    """Symmetric 95th-percentile surface distance (mm) between the masks' boundary voxels."""
    edge_p = pred ^ ndimage.binary_erosion(pred)
    edge_t = truth ^ ndimage.binary_erosion(truth)
    to_truth = ndimage.distance_transform_edt(~edge_t, sampling=spacing)[edge_p]
    to_pred = ndimage.distance_transform_edt(~edge_p, sampling=spacing)[edge_t]
    return float(max(np.percentile(to_truth, 95), np.percentile(to_pred, 95)))


def _box(shape, lo, hi, value=1) -> np.ndarray:
    out = np.zeros(shape, np.uint8)
    out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = value
    return out


def _eval_site(tmp_path: Path, truths: list[np.ndarray], spacing) -> Path:
    affine = np.diag([*spacing, 1.0])
    entries = []
    for i, truth in enumerate(truths):
        image = (truth * 50).astype(np.int16)
        _nifti(tmp_path / "imagesTs" / f"c{i}_0000.nii.gz", image, affine)
        _nifti(tmp_path / "labelsTs" / f"c{i}.nii.gz", truth, affine)
        entries.append({"image": f"imagesTs/c{i}_0000.nii.gz", "label": f"labelsTs/c{i}.nii.gz"})
    meta = {"name": "eval", "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "lesion": 2},
            "training": [], "test": entries}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    return tmp_path


def test_dice_and_hd95_match_hand_computation(tmp_path, monkeypatch):
    spacing = (2.0, 2.0, 3.0)
    shape = (20, 18, 14)
    truths, preds = [], []
    t0 = _box(shape, (4, 4, 3), (14, 12, 10))
    t0[7:10, 6:9, 5:8] = 2
    p0 = _box(shape, (6, 4, 3), (15, 13, 10))  # organ shifted and grown
    p0[15:18, 8, 6] = 1  # a thin spike: few far boundary voxels, so the 95th percentile < the maximum
    p0[8:11, 6:10, 5:7] = 2
    t1 = _box(shape, (3, 5, 2), (11, 14, 9))
    t1[4:7, 9:12, 3:6] = 2
    p1 = _box(shape, (3, 5, 4), (11, 12, 12))
    p1[5:7, 9:13, 4:6] = 2
    truths, preds = [t0, t1], [p0, p1]

    dataset = load_site_dataset(_eval_site(tmp_path, truths, spacing), require_training=False)
    task = SegmentationTask(TaskSettings(spacing=spacing, **TINY))
    site = task.prepare_site(dataset)
    # precondition: at the task spacing (already RAS) preprocessing keeps the grid as written
    for i, truth in enumerate(truths):
        assert np.array_equal(site.test[i]["label"][0].numpy(), truth)

    queue = [torch.from_numpy(p) for p in preds]

    def fake_logits(model, image):
        mask = queue.pop(0).long()
        return torch.nn.functional.one_hot(mask, 3).permute(3, 0, 1, 2)[None].float() * 10.0

    monkeypatch.setattr(task, "predict_logits", fake_logits)
    metrics = task.evaluate(task.build_model(), site, "test")

    assert metrics["num-examples"] == 2
    per_class = [np.mean([_dice(p == c, t == c) for p, t in zip(preds, truths)]) for c in (1, 2)]
    assert metrics["dice-class1"] == pytest.approx(per_class[0], abs=1e-5)
    assert metrics["dice-class2"] == pytest.approx(per_class[1], abs=1e-5)
    assert metrics["dice"] == pytest.approx(np.mean(per_class), abs=1e-5)
    distances = [_hd95(p == c, t == c, spacing) for p, t in zip(preds, truths) for c in (1, 2)]
    assert metrics["hd95"] == pytest.approx(np.mean(distances), rel=1e-4)
    assert 0 < metrics["dice"] < 1 and metrics["hd95"] > 0


def test_perfect_prediction_scores_one_and_zero(tmp_path, monkeypatch):
    spacing = (2.0, 2.0, 2.0)
    truth = _box((16, 16, 16), (3, 3, 3), (12, 11, 10))
    truth[5:8, 5:8, 5:8] = 2
    task = SegmentationTask(TaskSettings(spacing=spacing, **TINY))
    site = task.prepare_site(load_site_dataset(_eval_site(tmp_path, [truth], spacing), require_training=False))
    logits = torch.nn.functional.one_hot(torch.from_numpy(truth).long(), 3).permute(3, 0, 1, 2)[None].float()
    monkeypatch.setattr(task, "predict_logits", lambda model, image: logits * 10.0)
    metrics = task.evaluate(task.build_model(), site, "test")
    assert metrics["dice"] == pytest.approx(1.0) and metrics["hd95"] == pytest.approx(0.0)


def test_tiny_demo_site_trains_and_evaluates(tmp_path):
    dataset = load_site_dataset(write_demo_site(tmp_path / "a", "site-a", seed=4, size="small"))
    task = SegmentationTask(TaskSettings(spacing=(6.0, 6.0, 6.0), **TINY))
    site = task.prepare_site(dataset)
    crops = site.train[0]
    assert len(crops) == TINY["crops_per_case"] and crops[0]["image"].shape == (1, 16, 16, 16)
    model = task.build_model()
    result = task.train(model, site, LocalTrainingOptions(epochs=1, seed=2))
    assert result.num_examples == len(dataset.training) and result.steps == 2 and np.isfinite(result.loss)
    metrics = task.evaluate(model, site, "test")
    assert metrics["num-examples"] == len(dataset.test)
    assert 0.0 <= metrics["dice"] <= 1.0 and np.isfinite(metrics["loss"])


def test_prepare_site_refuses_class_index_datasets(tmp_path):
    dataset = load_site_dataset(write_demo_site(tmp_path / "c", "site-c", seed=1, task="classification", size="small"))
    with pytest.raises(ValueError, match="label maps"):
        SegmentationTask(TaskSettings(**TINY)).prepare_site(dataset)


def test_a_class_no_test_case_contains_is_undefined_not_zero(tmp_path, monkeypatch):
    """A site whose test cases are all lesion-free: lesion Dice is NaN and the site's Dice is the
    organ's, whatever the model predicts as lesion there (MONAI's aggregate() would give 0.0)."""
    spacing = (2.0, 2.0, 2.0)
    shape = (16, 16, 16)
    truths = [_box(shape, (3, 3, 3), (12, 11, 10)), _box(shape, (4, 2, 5), (13, 12, 11))]
    preds = [_box(shape, (3, 4, 3), (12, 11, 10)), _box(shape, (4, 2, 5), (13, 12, 11))]
    preds[0][5:8, 5:8, 5:8] = 2  # a false-positive lesion in a lesion-free case
    task = SegmentationTask(TaskSettings(spacing=spacing, **TINY))
    site = task.prepare_site(load_site_dataset(_eval_site(tmp_path, truths, spacing), require_training=False))
    queue = [torch.from_numpy(p) for p in preds]
    monkeypatch.setattr(task, "predict_logits", lambda model, image: torch.nn.functional.one_hot(
        queue.pop(0).long(), 3).permute(3, 0, 1, 2)[None].float() * 10.0)
    metrics = task.evaluate(task.build_model(), site, "test")
    organ = np.mean([_dice(p == 1, t == 1) for p, t in zip(preds, truths)])
    assert 0.5 < organ < 1.0
    assert np.isnan(metrics["dice-class2"])
    assert metrics["dice-class1"] == pytest.approx(organ, abs=1e-5)
    assert metrics["dice"] == pytest.approx(organ, abs=1e-5)


def test_a_class_is_averaged_over_the_cases_that_contain_it():
    from tasks.segmentation import _mean_over_cases

    per_case = np.array([[0.8, np.nan], [0.6, 0.5], [1.0, np.nan]])
    np.testing.assert_allclose(_mean_over_cases(per_case), [0.8, 0.5])
    assert np.isnan(_mean_over_cases(np.array([[0.7, np.nan]]))[1])


def _ramp_site(tmp_path: Path, cases: int = 2) -> Path:
    """Training cases whose image rises along x and whose label covers the low-x half: a mirrored
    crop shows a falling image with the label on the high-x half, an unmirrored one the opposite."""
    i = np.arange(16, dtype=np.float32)[:, None, None] * np.ones((16, 16, 16), np.float32)
    image, label = (10 * i).astype(np.int16), (i < 8).astype(np.uint8)
    entries = []
    for c in range(cases):
        _nifti(tmp_path / "imagesTr" / f"c{c}_0000.nii.gz", image, np.eye(4))
        _nifti(tmp_path / "labelsTr" / f"c{c}.nii.gz", label, np.eye(4))
        entries.append({"image": f"imagesTr/c{c}_0000.nii.gz", "label": f"labelsTr/c{c}.nii.gz"})
    meta = {"name": "ramp", "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1},
            "training": entries, "test": []}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    return tmp_path


@pytest.mark.parametrize("mirror_axes", [(), (0,)])
def test_mirror_axes_flip_image_and_label_together_in_training_crops(tmp_path, mirror_axes):
    task = SegmentationTask(TaskSettings(spacing=(1.0, 1.0, 1.0), ct_window=(0.0, 200.0), mirror_axes=mirror_axes,
                                         **{**TINY, "crops_per_case": 1}))
    site = task.prepare_site(load_site_dataset(_ramp_site(tmp_path)))
    orientations = []
    for seed in range(12):
        site.reseed(seed)
        crop = site.train[0][0]
        image, label = crop["image"][0].numpy(), crop["label"][0].numpy()
        rising = image[-1].mean() > image[0].mean()
        # the label stays on the image's low side whichever way the crop was mirrored
        assert label[0].mean() == (1.0 if rising else 0.0) and label[-1].mean() == (0.0 if rising else 1.0)
        orientations.append(rising)
    assert set(orientations) == ({True, False} if mirror_axes else {True})


def test_test_time_mirroring_averages_the_softmax_of_the_mirrored_predictions():
    plain = SegmentationTask(TaskSettings(**TINY))
    mirrored = SegmentationTask(TaskSettings(mirror_axes=(0, 2), **TINY))
    model = plain.build_model()
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    image = torch.randn(1, 1, 24, 16, 20, generator=torch.Generator().manual_seed(1))
    cpu = torch.device("cpu")
    expected = torch.zeros(1, 3, 24, 16, 20)
    for dims in ([], [2], [4], [2, 4]):  # independent: each copy by hand through the unmirrored task
        expected += torch.softmax(plain.predict_logits(model, image.flip(dims), cpu), dim=1).flip(dims) / 4
    got = torch.softmax(mirrored.predict_logits(model, image, cpu), dim=1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    unmirrored = torch.softmax(plain.predict_logits(model, image, cpu), dim=1)
    assert (got - unmirrored).abs().max() > 1e-3  # the copies do change the prediction
