"""Model surgery for DP-SGD, identical on the server and at every site.

Per-sample gradient clipping needs every sample's gradient to depend on that sample only, so
BatchNorm (which mixes the samples of a batch) must go. ``make_dp_compatible`` applies Opacus'
own fixers (``ModuleValidator.fix``: BatchNorm -> GroupNorm, InstanceNorm without running stats,
...) and validates the result. It is deterministic (new layers get their default init, no RNG), so
the server and every site that call it on the same architecture get the same parameter names and
shapes, and federated averaging lines up.
"""

from __future__ import annotations

from opacus.validators import ModuleValidator
from torch import nn


class NotDPCompatible(ValueError):
    """The model contains layers that DP-SGD cannot train even after Opacus' fixes."""


def make_dp_compatible(model: nn.Module) -> nn.Module:
    """Return a DP-trainable copy of ``model`` (BatchNorm replaced by GroupNorm, etc.).

    Call it on both sides (ServerApp and ClientApp) whenever DP may be used, before loading any
    weights: the replaced layers have different parameters from the originals. A model that is
    already compatible comes back as an unchanged copy.
    """
    fixed = ModuleValidator.fix(model)
    errors = ModuleValidator.validate(fixed, strict=False)
    leftover = [m for m in fixed.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if errors or leftover:
        details = "; ".join(str(e) for e in errors) or ", ".join(type(m).__name__ for m in leftover)
        raise NotDPCompatible(f"model cannot be trained with DP-SGD: {details}")
    return fixed


def is_dp_compatible(model: nn.Module) -> bool:
    """True if Opacus can compute per-sample gradients for ``model`` as it is."""
    return ModuleValidator.is_valid(model) and not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
    )
