"""Run config ``classifier=shape-descriptors``: descriptors against exact geometry, DP-SGD, the run config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from app.config import ConfigError, parse_run_config
from privacy.engine import is_dp_compatible
from tasks import get_task
from tasks.shape_descriptors import DESCRIPTORS_PER_CHANNEL, ShapeDescriptorClassifier, ShapeDescriptors

SPACING = (2.0, 1.0, 0.5)


def _box(shape=(20, 20, 20), start=(3, 4, 5), size=(9, 7, 11)) -> torch.Tensor:
    mask = torch.zeros(1, 1, *shape)
    mask[0, 0, start[0]:start[0] + size[0], start[1]:start[1] + size[1], start[2]:start[2] + size[2]] = 1
    return mask


@pytest.mark.parametrize("start", [(3, 4, 5), (0, 13, 9)])  # inside; flush with three faces of the field
def test_a_box_gets_its_exact_volume_surface_moments_and_erosions(start):
    """Outside the field is background: a box on its edge keeps its edge faces and erodes from there too."""
    a, b, c = 9, 7, 11
    sx, sy, sz = SPACING
    got = ShapeDescriptors(SPACING)(_box(start=start, size=(a, b, c)))[0].double().numpy()
    volume = a * b * c * sx * sy * sz
    area = 2 * (b * c * sy * sz + a * c * sx * sz + a * b * sx * sy)
    # the variance of a uniform grid 0..n-1 with step s is s^2 (n^2 - 1) / 12
    principal = np.sort([s * s * (n * n - 1) / 12 for n, s in ((a, sx), (b, sy), (c, sz))])
    eroded = [max(a - 2 * k, 0) * max(b - 2 * k, 0) * max(c - 2 * k, 0) * sx * sy * sz for k in (1, 2, 3, 4)]  # 6-nbhd
    expected = [
        math.log1p(volume), math.log1p(area), math.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / area, volume / area,
        *np.log1p(principal), math.sqrt(principal[1] / principal[2]), math.sqrt(principal[0] / principal[2]),
        *np.log1p(eroded),
    ]
    assert got.shape == (DESCRIPTORS_PER_CHANNEL,)
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def _eroded_volumes(mask: np.ndarray, times: int) -> list[int]:
    """Six-neighbourhood erosions in numpy (a voxel stays where it and its six face neighbours are set)."""
    volumes, current = [], mask.astype(bool)
    for _ in range(times):
        p = np.pad(current, 1)
        current = (p[1:-1, 1:-1, 1:-1] & p[:-2, 1:-1, 1:-1] & p[2:, 1:-1, 1:-1] & p[1:-1, :-2, 1:-1]
                   & p[1:-1, 2:, 1:-1] & p[1:-1, 1:-1, :-2] & p[1:-1, 1:-1, 2:])
        volumes.append(int(current.sum()))
    return volumes


def test_erosions_are_six_connected_on_a_ball_cut_by_the_field():
    grid = np.stack(np.meshgrid(*[np.arange(24.0)] * 3, indexing="ij"))
    ball = (((grid - np.array([11.0, 11.0, 2.0])[:, None, None, None]) ** 2).sum(0) <= 8 ** 2)  # cut at z = 0
    got = ShapeDescriptors()(torch.from_numpy(ball.astype(np.float32))[None, None])[0, 9:].double().numpy()
    expected = _eroded_volumes(ball, 4)
    assert expected[0] > 0 and expected[-1] > 0
    np.testing.assert_allclose(got, np.log1p(expected), rtol=1e-6)  # a cube (26-neighbour) erosion removes more


def test_a_ball_is_round_and_a_rod_is_elongated():
    grid = torch.stack(torch.meshgrid(*[torch.arange(32.0)] * 3, indexing="ij"))
    ball = (((grid - 15.5) ** 2).sum(0) <= 10 ** 2).float()[None, None]
    rod = torch.zeros_like(ball)
    rod[0, 0, 2:30, 14:18, 14:18] = 1
    d = ShapeDescriptors()(torch.cat([ball, rod]))
    radius = 10
    assert math.expm1(float(d[0, 0])) == pytest.approx(4 / 3 * math.pi * radius ** 3, rel=0.03)
    assert [float(v) for v in d[0, 7:9]] == pytest.approx([1.0, 1.0], abs=0.02)  # no elongation or flatness
    assert math.expm1(float(d[0, 4])) == pytest.approx(radius ** 2 / 5, rel=0.05)  # a ball's moment per axis
    assert float(d[1, 7]) < 0.2 and float(d[1, 8]) == pytest.approx(float(d[1, 7]))  # long; a square section
    assert float(d[1, 2]) < float(d[0, 2])  # the rod is less spherical
    assert float(d[1, 10]) == 0 and float(d[0, 12]) > 0  # the 4-voxel rod is gone after 2 erosions; the ball is not


def test_foreground_is_above_half_and_each_channel_is_described_on_its_own():
    box = _box()
    two = torch.cat([box * 0.9 + 0.05, torch.zeros_like(box) + 0.49], dim=1)  # a scaled mask; an empty channel
    d = ShapeDescriptors(SPACING)(two)
    assert d.shape == (1, 2 * DESCRIPTORS_PER_CHANNEL)
    torch.testing.assert_close(d[:, :DESCRIPTORS_PER_CHANNEL], ShapeDescriptors(SPACING)(box))
    empty = d[0, DESCRIPTORS_PER_CHANNEL:]
    assert torch.isfinite(empty).all() and torch.count_nonzero(empty) == 0


def test_bad_spacing_is_refused():
    with pytest.raises(ValueError, match="spacing"):
        ShapeDescriptors((1.0, 0.0, 1.0))


def test_run_config_builds_it_at_the_task_spacing_with_only_a_linear_head_to_train():
    run = parse_run_config({"task": "classification", "classifier": "shape-descriptors", "spacing": "2,1,0.5",
                            "in-channels": "2", "dp-epsilon": "8"})
    model = get_task("classification", run.task_settings()).build_model()
    assert isinstance(model, ShapeDescriptorClassifier) and model.descriptors.spacing == SPACING
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == {
        "fc.weight": (2, 2 * DESCRIPTORS_PER_CHANNEL), "fc.bias": (2,)}
    assert is_dp_compatible(model)
    with pytest.raises(ConfigError, match="classifier-width"):
        parse_run_config({"task": "classification", "classifier": "shape-descriptors", "classifier-width": "0.5"})


def test_dp_sgd_per_sample_gradients_are_exact():
    """Opacus in functorch mode, as DP-SGD here: the per-sample gradients are each case's own gradient."""
    from opacus import GradSampleModule

    torch.manual_seed(0)
    model = ShapeDescriptorClassifier(1, 2, SPACING).double()
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(3, 1, 16, 16, 16, generator=gen) > 0.4).double()
    y = torch.tensor([0, 1, 1])
    sampled = GradSampleModule(model, loss_reduction="sum", force_functorch=True)
    nn.functional.cross_entropy(sampled(x), y, reduction="sum").backward()
    per_sample = model.fc.weight.grad_sample  # read now: the single-case passes below go through the hooks too
    assert per_sample.shape == (3, 2, DESCRIPTORS_PER_CHANNEL)
    single = []
    for i in range(3):
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        single.append(model.fc.weight.grad.clone())
    torch.testing.assert_close(per_sample, torch.stack(single), rtol=1e-7, atol=1e-9)
