"""Run config ``freeze``: which names a pattern selects, and that training leaves them bit-identical."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tasks import TaskSettings, get_task
from tasks.base import LocalTrainingOptions
from tasks.freeze import FreezeError, apply_freeze, frozen_names
from tasks.training import train_local

TINY_UNET = TaskSettings(channels=(4, 8, 16), num_res_units=1)


def _unet_names(**kw):
    task = get_task("segmentation", TaskSettings(**{**TINY_UNET.__dict__, **kw}))
    return task, task.build_model()


def test_encoder_of_the_unet_is_its_down_path_and_bottom_block():
    task, model = _unet_names(freeze=("encoder",))
    names = set(model.state_dict())
    # MONAI's UNet with 3 levels: model.0 = down 1, model.1.submodule.0 = down 2,
    # model.1.submodule.1.submodule = bottom, model.1.submodule.2 and model.2 = the up path
    down = {n for n in names if n.startswith(("model.0.", "model.1.submodule.0.", "model.1.submodule.1.submodule."))}
    assert down and task.frozen_names(model) == down
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == down
    assert any(n.startswith("model.2.") for n, p in model.named_parameters() if p.requires_grad)  # the output layer


@pytest.mark.parametrize("classifier,head", [("resnet10", "fc"), ("densenet121", "class_layers.out")])
def test_encoder_of_a_classifier_is_all_but_its_final_linear_layer(classifier, head):
    task = get_task("classification", TaskSettings(classifier=classifier, freeze=("encoder",),
                                                   classifier_width=0.25 if classifier != "densenet121" else 1.0))
    model = task.build_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{head}.weight", f"{head}.bias"}
    # BatchNorm statistics of the encoder are frozen too
    assert set(model.state_dict()) - task.frozen_names(model) == trainable


def test_globs_and_dotted_prefixes():
    _, model = _unet_names()
    names = set(model.state_dict())
    assert frozen_names(model, ["model.0"]) == {n for n in names if n.startswith("model.0.")}
    assert frozen_names(model, ["model.0."]) == frozen_names(model, ["model.0"])
    assert frozen_names(model, ["*.residual.weight"]) == {n for n in names if n.endswith(".residual.weight")}
    assert frozen_names(model, ["model.0", "model.2.0.*"]) == {
        n for n in names if n.startswith(("model.0.", "model.2.0."))}
    assert not any(n.startswith("model.0") for n in frozen_names(model, ["model.1"]))  # model.1 is not model.10


def test_a_pattern_matching_nothing_or_freezing_everything_is_refused():
    _, model = _unet_names()
    with pytest.raises(FreezeError, match="'model.9.\\*'"):
        frozen_names(model, ["model.0", "model.9.*"])
    with pytest.raises(FreezeError, match="freezes every parameter"):
        frozen_names(model, ["model"])
    with pytest.raises(FreezeError, match="'encoder'"):  # a task without an encoder definition
        frozen_names(nn.Linear(2, 2), ["encoder"], lambda m: ())


def test_training_leaves_frozen_parameters_and_statistics_bit_identical():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 1))
    apply_freeze(model, frozen_names(model, ["0", "1"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, generator=g) * 3 + 1, torch.randn(16, 1, generator=g)
    options = LocalTrainingOptions(epochs=3, lr=0.1, proximal_mu=0.5)  # Adam with a proximal term
    train_local(model, lambda e: [(x[:8], y[:8]), (x[8:], y[8:])], lambda n, b: ((n(b[0]) - b[1]) ** 2).mean(),
                options, "adam", 0.1)
    after = model.state_dict()
    for key in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(after[key], before[key]), key
    assert not torch.equal(after["3.weight"], before["3.weight"])  # the head trained
