"""Run config ``classifier``: MONAI's DenseNet121 or its 3D ResNets, plain and DP-compatible."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DenseNet121, ResNet, resnet10, resnet18
from torch import nn

from app.config import CLASSIFIERS as CONFIG_CLASSIFIERS
from app.config import ConfigError, parse_run_config
from privacy.engine import is_dp_compatible
from tasks import get_task
from tasks.classification import CLASSIFIERS, build_classifier


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_config_and_task_offer_the_same_networks():
    assert CONFIG_CLASSIFIERS == CLASSIFIERS == ("densenet121", "resnet10", "resnet18", "resnet34", "shape-descriptors")


def test_run_config_selects_the_network_and_its_size():
    run = parse_run_config({"task": "classification", "classifier": "resnet18", "classifier-width": "0.25",
                            "classification-size": "28"})
    s = run.task_settings()
    assert (s.classifier, s.classifier_width, s.classification_size) == ("resnet18", 0.25, (28, 28, 28))
    model = get_task("classification", s).build_model()
    assert isinstance(model, ResNet)
    # same network as MONAI's own factory builds at that width
    torch.manual_seed(0)
    reference = resnet18(spatial_dims=3, n_input_channels=1, num_classes=2, widen_factor=0.25)
    assert _params(model) == _params(reference)
    assert model.conv1.out_channels == 16 and model.fc.out_features == 2
    assert run.to_json()["classification-size"] == [28, 28, 28]
    default = parse_run_config({"task": "classification"})
    assert isinstance(get_task("classification", default.task_settings()).build_model(), DenseNet121)


@pytest.mark.parametrize("raw, key", [
    ({"classifier": "resnet50"}, "classifier"),
    ({"classifier": "resnet10", "classifier-width": "0"}, "classifier-width"),
    ({"classifier-width": "0.5"}, "classifier-width"),  # densenet121 has fixed widths
    ({"classification-size": "28,28"}, "classification-size"),
])
def test_bad_classifier_settings_name_the_key(raw, key):
    with pytest.raises(ConfigError, match=key):
        parse_run_config({"task": "classification", **raw})


@pytest.mark.parametrize("name, factory", [("resnet10", resnet10), ("resnet18", resnet18)])
def test_resnet_is_monais_network_with_the_same_weights_and_outputs(name, factory):
    ours = build_classifier(name, 1, 2, width=0.25).eval()
    monai_net = factory(spatial_dims=3, n_input_channels=1, num_classes=2, widen_factor=0.25).eval()
    ours.load_state_dict(monai_net.state_dict(), strict=True)  # same parameter names and shapes
    x = torch.randn(2, 1, 20, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), monai_net(x))


def test_width_scales_every_resnet_layer():
    narrow = build_classifier("resnet10", 1, 3, width=0.25)
    full = resnet10(spatial_dims=3, n_input_channels=1, num_classes=3)
    assert [narrow.layer1[0].conv1.out_channels, narrow.layer4[0].conv1.out_channels] == [16, 128]
    assert [full.layer1[0].conv1.out_channels, full.layer4[0].conv1.out_channels] == [64, 512]
    assert _params(full) / _params(narrow) > 14  # conv weights scale with width^2
    with torch.no_grad():
        assert narrow.eval()(torch.randn(2, 1, 28, 28, 28)).shape == (2, 3)


@pytest.mark.parametrize("name", ["resnet10", "resnet18"])
def test_dp_compatible_resnet_gives_exact_per_sample_gradients(name):
    """Opacus (functorch, as DP-SGD here) on the GroupNorm variant: per-sample grads sum to the batch grad."""
    from opacus import GradSampleModule

    settings = parse_run_config({"task": "classification", "classifier": name, "classifier-width": "0.125",
                                 "dp-epsilon": 8}).task_settings()
    model = get_task("classification", settings).build_model()
    assert is_dp_compatible(model) and not any(isinstance(m, nn.BatchNorm3d) for m in model.modules())
    again = get_task("classification", settings).build_model().state_dict()
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())  # same at server and sites
    model = model.double()  # float64: the comparison tests the maths, not float32 summation order
    x, y = torch.randn(3, 1, 16, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 1])
    sampled = GradSampleModule(model, loss_reduction="sum", force_functorch=True)
    nn.functional.cross_entropy(sampled(x), y, reduction="sum").backward()
    weight = model.fc.weight
    per_sample = weight.grad_sample
    assert per_sample.shape == (3, *weight.shape)
    single = []
    for i in range(3):
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        single.append(weight.grad.clone())
    torch.testing.assert_close(per_sample, torch.stack(single), rtol=1e-7, atol=1e-9)


def test_densenet_architecture_override_only_for_densenet():
    with pytest.raises(ValueError, match="densenet121"):
        build_classifier("resnet10", 1, 2, architecture={"init_features": 8})
    tiny = build_classifier("densenet121", 1, 2, architecture={"init_features": 8, "growth_rate": 4,
                                                               "block_config": (1, 1, 1, 1)})
    assert tiny.features.conv0.out_channels == 8
