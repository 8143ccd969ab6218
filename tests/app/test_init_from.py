"""init-from: pretrained weights matched by name with shape checks; a file matching nothing is refused."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from app.config import parse_run_config
from app.config_values import ConfigError
from app.init_from import init_from


class _Net(nn.Module):
    def __init__(self, classes: int = 2):
        super().__init__()
        self.encoder = nn.Conv3d(1, 4, 3)
        self.norm = nn.BatchNorm3d(4)
        self.head = nn.Linear(4, classes)


def _pretrained(classes: int, seed: int = 5) -> _Net:
    torch.manual_seed(seed)
    net = _Net(classes)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)  # far from any fresh initialisation
    net.norm.num_batches_tracked.fill_(7)
    return net


def test_loads_matching_names_and_skips_a_new_head_with_a_log(tmp_path, caplog):
    source = _pretrained(classes=3)  # another task's output layer: a different shape
    path = tmp_path / "model.pt"
    torch.save(source.state_dict(), path)
    model = _Net(classes=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="fedimaging.server"):
        loaded, skipped = init_from(model, path)
    state, src = model.state_dict(), source.state_dict()
    assert set(skipped) == {"head.weight", "head.bias"} and "shape (3, 4) in the file" in skipped["head.weight"]
    assert set(loaded) == set(state) - set(skipped)
    for name in loaded:
        assert torch.equal(state[name], src[name]), name
    for name in skipped:
        assert torch.equal(state[name], before[name]), name  # left as initialised
    assert "skipped head.weight" in caplog.text and f"loaded {len(loaded)} of {len(state)}" in caplog.text


def test_a_file_matching_nothing_or_not_weights_is_an_error_naming_it(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"backbone.weight": torch.zeros(3)}, other)
    with pytest.raises(ConfigError, match="other.pt matches none"):
        init_from(_Net(), other)
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": _Net()}, pickled)  # a whole pickled module: never unpickled
    with pytest.raises(ConfigError, match="pickled.pt"):
        init_from(_Net(), pickled)
    with pytest.raises(ConfigError, match="missing.pt"):
        init_from(_Net(), tmp_path / "missing.pt")


def test_the_run_config_key():
    assert parse_run_config({}).init_from == ""
    assert parse_run_config({"init-from": "/x/final_model.pt"}).init_from == "/x/final_model.pt"
