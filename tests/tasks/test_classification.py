"""ClassificationTask: DenseNet121 model, DP-compatible variant, learning, and metrics against
numpy hand computations on controlled predictions."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.nets import DenseNet121
from torch import nn

from data_prep.demo import write_demo_site
from data_prep.site_dataset import load_site_dataset
from privacy.engine import is_dp_compatible
from tasks import get_task
from tasks.base import LocalTrainingOptions, TaskSettings
from tasks.classification import ClassificationTask, classification_metrics

TINY_NET = {"init_features": 8, "growth_rate": 4, "block_config": (1, 1, 1, 1)}
SMALL = dict(spacing=(6.0, 6.0, 6.0), classification_size=(32, 32, 32), batch_size=2)


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_default_model_is_densenet121_with_one_output_per_class():
    task = ClassificationTask(TaskSettings(), num_classes=3)
    model = task.build_model()
    assert isinstance(model, DenseNet121)
    assert model.class_layers.out.out_features == 3
    assert isinstance(model.features.conv0, nn.Conv3d) and model.features.conv0.in_channels == 1
    assert _batchnorms(model)  # the plain variant keeps MONAI's BatchNorm
    assert task.name == "classification" and task.best_metric == "auc"
    assert isinstance(get_task("classification", TaskSettings()), ClassificationTask)


def test_forward_gives_class_logits():
    task = ClassificationTask(TaskSettings(**SMALL), num_classes=4, architecture=TINY_NET)
    model = task.build_model().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 32, 32, 32))
    assert out.shape == (2, 4)
    probs = task.predict_proba(model, torch.randn(3, 1, 32, 32, 32))
    assert probs.shape == (3, 4) and torch.allclose(probs.sum(dim=1), torch.ones(3))


def test_dp_compatible_model_has_no_batchnorm():
    model = ClassificationTask(TaskSettings(dp_compatible=True)).build_model()  # full DenseNet121
    assert not _batchnorms(model) and is_dp_compatible(model)
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert model.class_layers.out.out_features == 2


def test_group_norm_without_dp_is_the_network_a_dp_study_trains():
    settings = dict(classifier="resnet10", classifier_width=0.125)
    group = ClassificationTask(TaskSettings(classifier_norm="group", **settings)).build_model()
    dp = ClassificationTask(TaskSettings(dp_compatible=True, **settings)).build_model()
    batch = ClassificationTask(TaskSettings(**settings)).build_model()
    assert not _batchnorms(group) and is_dp_compatible(group) and _batchnorms(batch)
    a, b = group.state_dict(), dp.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)  # same layers, same initial weights
    assert [type(m) for m in group.modules()] == [type(m) for m in dp.modules()]


def test_dp_compatible_model_is_the_same_at_the_server_and_every_site():
    task = ClassificationTask(TaskSettings(dp_compatible=True, **SMALL), architecture=TINY_NET)
    server, site = task.build_model(), task.build_model()
    a, b = server.state_dict(), site.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    plain = ClassificationTask(TaskSettings(**SMALL), architecture=TINY_NET).build_model().state_dict()
    assert set(plain) != set(a)  # BatchNorm buffers gone: server and sites must agree on the flag
    # the (group) normalisation layers are what FedBN keeps at the site
    local = task.local_param_names(server)
    norms = {n for n, m in server.named_modules() if isinstance(m, nn.GroupNorm)}
    assert local == {f"{n}.{p}" for n in norms for p in ("weight", "bias")}


def test_training_lowers_the_loss_on_a_fixed_batch():
    from monai.data import CacheDataset
    from monai.transforms import Compose

    from tasks.data import SiteData as ClassificationSiteData

    task = ClassificationTask(TaskSettings(lr=1e-2, **{**SMALL, "batch_size": 4}), architecture=TINY_NET)
    gen = torch.Generator().manual_seed(0)
    items = []
    for label in (0, 1, 0, 1):
        image = torch.randn(1, 32, 32, 32, generator=gen) * 0.3
        image[:, 12:20, 12:20, 12:20] += 1.5 * label
        items.append({"image": image, "label": label})
    site = ClassificationSiteData(CacheDataset(items, Compose([]), progress=False), None, 4, "CT")
    x = torch.stack([i["image"] for i in items])
    y = torch.tensor([i["label"] for i in items])
    model = task.build_model()

    def loss() -> float:
        model.train()  # batch statistics: the same batch gives the same normalisation before and after
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(x), y))

    before = loss()
    result = task.train(model, site, LocalTrainingOptions(epochs=3, seed=0))
    assert result.steps == 3 and result.num_examples == 4
    assert loss() < before - 0.02


def test_a_trailing_single_case_batch_is_skipped():
    """BatchNorm cannot normalise one case whose last feature map is 1 voxel (32^3 input)."""
    from monai.data import CacheDataset
    from monai.transforms import Compose

    from tasks.data import SiteData as ClassificationSiteData

    task = ClassificationTask(TaskSettings(**SMALL), architecture=TINY_NET)
    items = [{"image": torch.randn(1, 32, 32, 32), "label": i % 2} for i in range(5)]
    site = ClassificationSiteData(CacheDataset(items, Compose([]), progress=False), None, 5, "CT")
    result = task.train(task.build_model(), site, LocalTrainingOptions(epochs=1, seed=0))
    assert result.steps == 2 and result.num_examples == 5 and np.isfinite(result.loss)


# ---------------------------------------------------------------------------------------------
# Metrics against numpy
# ---------------------------------------------------------------------------------------------
def _auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney: share of (positive, negative) pairs ranked right, ties count one half."""
    pos, neg = scores[positive], scores[~positive]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _tiny_classification_site(root: Path, labels: list[int], names: dict[str, int]) -> Path:
    entries = []
    for i, label in enumerate(labels):
        path = root / "imagesTs" / f"c{i}_0000.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.full((6, 6, 6), 10 * i, np.int16), np.diag([6.0, 6.0, 6.0, 1.0])), str(path))
        entries.append({"image": f"imagesTs/c{i}_0000.nii.gz", "label": label})
    meta = {"name": "cls", "channel_names": {"0": "CT"}, "labels": names, "training": [], "test": entries}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_evaluate_matches_numpy_on_controlled_logits(tmp_path, monkeypatch):
    labels = np.array([0, 1, 1, 0, 1, 0, 1, 1, 0])
    logits = np.array(
        [[2.0, 0.1], [0.3, 0.9], [1.0, 0.2], [0.4, 0.4], [-1.0, 2.0], [0.2, 1.5], [0.0, 0.7], [0.5, 0.5], [1.2, -0.3]],
        dtype=np.float32,
    )
    dataset = load_site_dataset(
        _tiny_classification_site(tmp_path, labels.tolist(), {"no": 0, "yes": 1}), require_training=False
    )
    task = ClassificationTask(TaskSettings(**{**SMALL, "batch_size": 4}), architecture=TINY_NET)
    site = task.prepare_site(dataset)
    assert site.test[0]["image"].shape == (1, 32, 32, 32)
    queue = list(torch.from_numpy(logits).split(4))  # one entry per evaluation batch, in order
    monkeypatch.setattr(task, "predict_logits", lambda model, image: queue.pop(0)[: len(image)])
    metrics = task.evaluate(task.build_model(), site, "test")
    assert not queue

    probs = _softmax(logits.astype(np.float64))
    predicted = logits.argmax(axis=1)
    assert metrics["num-examples"] == len(labels)
    assert metrics["accuracy"] == pytest.approx(np.mean(predicted == labels))
    recalls = [np.mean(predicted[labels == c] == c) for c in (0, 1)]
    assert metrics["balanced-accuracy"] == pytest.approx(np.mean(recalls))
    assert metrics["balanced-accuracy"] != pytest.approx(metrics["accuracy"])  # the data is imbalanced
    assert metrics["auc"] == pytest.approx(_auc(probs[:, 1], labels == 1))
    assert metrics["loss"] == pytest.approx(-np.mean(np.log(probs[np.arange(len(labels)), labels])), rel=1e-5)


def test_multiclass_metrics_match_numpy():
    rng = np.random.default_rng(3)
    labels = np.array([0, 1, 2, 2, 1, 0, 2, 1, 1, 0, 2, 2])
    probs = _softmax(rng.normal(size=(12, 3)) + 1.5 * np.eye(3)[labels])
    metrics = classification_metrics(probs, labels, 3)
    predicted = probs.argmax(axis=1)
    assert metrics["accuracy"] == pytest.approx(np.mean(predicted == labels))
    recalls = [np.mean(predicted[labels == c] == c) for c in range(3)]
    assert metrics["balanced-accuracy"] == pytest.approx(np.mean(recalls))
    one_vs_rest = [_auc(probs[:, c], labels == c) for c in range(3)]
    assert metrics["auc"] == pytest.approx(np.mean(one_vs_rest))


def test_metrics_with_a_single_class_present():
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
    metrics = classification_metrics(probs, np.array([0, 0, 0]), 2)
    assert np.isnan(metrics["auc"])  # undefined with one class
    assert metrics["accuracy"] == pytest.approx(2 / 3) and metrics["balanced-accuracy"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------
# The demo pipeline
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_site(tmp_path_factory):
    root = write_demo_site(tmp_path_factory.mktemp("demo") / "a", "site-a", seed=4, task="classification", size="small")
    return load_site_dataset(root)


def test_demo_site_trains_and_evaluates_reproducibly(demo_site):
    task = ClassificationTask(TaskSettings(**SMALL), architecture=TINY_NET)
    site = task.prepare_site(demo_site)
    assert site.train[0]["image"].shape == (1, 32, 32, 32)
    assert site.train[0]["label"] == demo_site.training[0].label
    start = task.build_model()
    runs = []
    for seed in (5, 5, 6):
        model = copy.deepcopy(start)
        result = task.train(model, site, LocalTrainingOptions(epochs=1, seed=seed))
        assert result.num_examples == len(demo_site.training) and result.steps == 2
        runs.append(model.state_dict())
    same = all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    other = all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])
    assert same and not other  # seeded augmentation and shuffling
    metrics = task.evaluate(task.build_model(), site, "test")
    assert metrics["num-examples"] == len(demo_site.test)
    assert {"loss", "accuracy", "balanced-accuracy", "auc"} <= set(metrics)
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_pooled_site_data_trains_on_every_site(demo_site, tmp_path):
    from tasks.data import pooled_site_data

    other = load_site_dataset(write_demo_site(tmp_path / "c", "site-c", seed=4, task="classification", size="small"))
    task = ClassificationTask(TaskSettings(**SMALL), architecture=TINY_NET)
    pooled = pooled_site_data([task.prepare_site(demo_site), task.prepare_site(other)])
    assert pooled.num_train_cases == len(demo_site.training) + len(other.training) == len(pooled.train)
    result = task.train(task.build_model(), pooled, LocalTrainingOptions(epochs=1, seed=1))
    assert result.num_examples == pooled.num_train_cases and result.steps == len(pooled.train) // 2


def test_inference_transform_matches_evaluation_input(demo_site):
    task = ClassificationTask(TaskSettings(**SMALL), architecture=TINY_NET)
    site = task.prepare_site(demo_site)
    image = task.inference_transform(demo_site.modality)({"image": str(demo_site.test[0].image)})["image"]
    assert torch.allclose(torch.as_tensor(image), site.test[0]["image"])


def test_prepare_site_refuses_wrong_datasets(tmp_path, demo_site):
    seg = load_site_dataset(write_demo_site(tmp_path / "seg", "site-c", seed=1, size="small"))
    with pytest.raises(ValueError, match="class indices"):
        ClassificationTask(TaskSettings(**SMALL)).prepare_site(seg)
    three = load_site_dataset(
        _tiny_classification_site(tmp_path / "three", [0, 2], {"a": 0, "b": 1, "c": 2}), require_training=False
    )
    with pytest.raises(ValueError, match="2 outputs"):
        ClassificationTask(TaskSettings(**SMALL)).prepare_site(three)
    assert ClassificationTask(TaskSettings(**SMALL), num_classes=3).prepare_site(three).test is not None


@pytest.mark.parametrize("classifier,width", [("resnet10", 0.125), ("densenet121", 1.0), ("shape-descriptors", 1.0)])
def test_feature_norm_feeds_the_head_standardised_features(classifier, width):
    settings = dict(classifier=classifier, classifier_width=width, classifier_norm="group")
    plain = ClassificationTask(TaskSettings(**settings), **({"architecture": TINY_NET} if classifier == "densenet121" else {}))
    normed = ClassificationTask(TaskSettings(classifier_feature_norm="layer", **settings),
                                **({"architecture": TINY_NET} if classifier == "densenet121" else {}))
    a, b = plain.build_model(), normed.build_model()
    assert is_dp_compatible(b)  # Opacus validates a model in training mode
    a, b = a.eval(), b.eval()
    assert list(a.state_dict()) == list(b.state_dict())  # no parameter renamed: weights load either way
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    head = [m for m in b.modules() if isinstance(m, nn.Linear)][-1]
    seen = {}
    head.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0].detach()))
    plain_head = [m for m in a.modules() if isinstance(m, nn.Linear)][-1]
    plain_head.register_forward_pre_hook(lambda _m, args: seen.setdefault("raw", args[0].detach()))
    x = torch.rand(3, 1, 32, 32, 32)
    with torch.no_grad():
        a(x), b(x)
    raw = seen["raw"].double()
    expected = (raw - raw.mean(1, keepdim=True)) / torch.sqrt(raw.var(1, unbiased=False, keepdim=True) + 1e-5)
    assert torch.allclose(seen["x"].double(), expected, atol=1e-4)  # each case on its own, numpy-style
    if classifier != "densenet121":  # the tiny DenseNet's random features are ~1e-6, below LayerNorm's eps
        assert torch.allclose(seen["x"].var(1, unbiased=False), torch.ones(3), atol=1e-3)
        assert raw.mean(1).min() > 0.01  # the offset that was removed
