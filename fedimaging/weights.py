"""The one weights-only loader: a dict of tensors from a ``.pt`` file, never arbitrary objects.

``torch.load(weights_only=True)`` refuses pickled code; on top of that the file must hold a flat
dict of tensors (what fedimaging saves). Every failure names the file.
"""

from __future__ import annotations

from pathlib import Path

import torch


class WeightsError(ValueError):
    """A weights file is missing, unreadable or not a dict of tensors; the message names it."""


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` from ``path`` (on the CPU), or :class:`WeightsError`."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"weights file {path} not found") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        raise WeightsError(f"cannot read {path} as weights-only tensors: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} is not a dict of tensors (a state dict saved by fedimaging)")
    return {str(k): v for k, v in state.items()}
