"""make_dp_compatible: no BatchNorm left, same architecture every time, original untouched."""

from __future__ import annotations

import torch
from monai.networks.nets import UNet
from torch import nn

from privacy.engine import is_dp_compatible, make_dp_compatible


def bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(1, 8, 3), nn.BatchNorm3d(8), nn.ReLU(), nn.Conv3d(8, 2, 1))


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_batchnorm_is_replaced_and_original_kept():
    original = bn_model()
    fixed = make_dp_compatible(original)
    assert not has_batchnorm(fixed)
    assert has_batchnorm(original)
    assert any(isinstance(m, nn.GroupNorm) for m in fixed.modules())
    assert is_dp_compatible(fixed) and not is_dp_compatible(original)


def test_deterministic_same_names_shapes_and_values():
    a = make_dp_compatible(bn_model(seed=0))
    torch.manual_seed(123)  # RNG state must not matter
    b = make_dp_compatible(bn_model(seed=0))
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    # the server-side model (built independently) accepts the site's weights
    server = make_dp_compatible(bn_model(seed=5))
    server.load_state_dict(sa)


def test_monai_unet_with_batchnorm_becomes_compatible():
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,),
               num_res_units=1, norm="BATCH")
    assert has_batchnorm(net)
    fixed = make_dp_compatible(net)
    assert not has_batchnorm(fixed)
    out = fixed(torch.randn(2, 1, 8, 8, 8))
    assert out.shape == (2, 2, 8, 8, 8)
