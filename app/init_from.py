"""Run config ``init-from=PATH``: start the global model from pretrained weights (transfer learning).

PATH is a ``final_model.pt`` or checkpoint of an earlier fedimaging run, or a MONAI bundle's
``models/model.pt``: read weights-only (``fedimaging.weights``), matched to this run's model by
parameter name, each with a shape check. What was loaded and what was skipped (missing, or a
different shape, e.g. a new output layer) is logged; a file that matches nothing is an error that
names it, since training would silently start from scratch.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from app.config_values import ConfigError
from fedimaging.weights import WeightsError, load_tensors

log = logging.getLogger("fedimaging.server")


def init_from(model: nn.Module, path: str | Path) -> tuple[list[str], dict[str, str]]:
    """Copy the matching tensors of ``path`` into ``model``; return (loaded names, skipped name -> why)."""
    path = Path(path).expanduser()
    try:
        source = load_tensors(path)
    except WeightsError as exc:
        raise ConfigError(f"run config 'init-from': {exc}") from None
    own = model.state_dict()
    loaded: list[str] = []
    skipped: dict[str, str] = {}
    for name, target in own.items():
        if name not in source:
            skipped[name] = "not in the file"
        elif tuple(source[name].shape) != tuple(target.shape):
            skipped[name] = f"shape {tuple(source[name].shape)} in the file, {tuple(target.shape)} in this model"
        else:
            loaded.append(name)
    if not loaded:
        raise ConfigError(f"run config 'init-from': {path} matches none of this model's {len(own)} parameters "
                          f"by name and shape (e.g. {next(iter(skipped.items()), ('', ''))}); is it this task's network?")
    model.load_state_dict({**own, **{k: source[k].to(own[k].dtype) for k in loaded}})
    unused = sorted(set(source) - set(own))
    log.info("init-from %s: loaded %d of %d tensors; skipped %d; %d in the file unused",
             path, len(loaded), len(own), len(skipped), len(unused))
    for name, why in skipped.items():
        log.info("init-from: skipped %s (%s)", name, why)
    return loaded, skipped
