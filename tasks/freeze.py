"""Run config ``freeze``: parameters that stay fixed at every site and never travel back.

``freeze`` is a list of patterns matched against the model's state-dict names:

- ``encoder``: the task's feature extractor (``Task.encoder_names``): the MONAI UNet's down path
  and bottom block (everything but the up path), or a classifier's everything but its final
  linear layer (DenseNet121's ``class_layers.out``, a ResNet's ``fc``);
- a glob (``fnmatch``, case-sensitive: ``model.0.*``, ``*.conv.weight``), or
- a prefix of dotted names (``model.1.submodule.0`` freezes everything below that module).

Frozen parameters get ``requires_grad=False``, so no optimizer (plain, proximal, SCAFFOLD, Ditto,
Opacus' DP-SGD) sees them; a frozen buffer (BatchNorm running statistics) is kept fixed by running
its layer in eval mode while training. A pattern that matches nothing, or a list that leaves no
trainable parameter, is a :class:`FreezeError` naming the key and the pattern (the ServerApp
resolves ``freeze`` against its model before round 1, so a bad pattern stops the study there).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable

from torch import nn

ENCODER = "encoder"


class FreezeError(ValueError):
    """Run config ``freeze`` cannot be applied to this model; the message names the pattern."""


def matches(pattern: str, name: str) -> bool:
    """``name`` is selected by ``pattern`` (a glob, or a dotted prefix)."""
    return fnmatch.fnmatchcase(name, pattern) or name == pattern or name.startswith(pattern.rstrip(".") + ".")


def frozen_names(model: nn.Module, patterns: Iterable[str],
                 encoder: Callable[[nn.Module], Iterable[str]] = lambda _: ()) -> frozenset[str]:
    """The state-dict names of ``model`` that ``patterns`` freeze (``encoder(model)``: the task's encoder)."""
    patterns = list(patterns)
    if not patterns:
        return frozenset()
    names = list(model.state_dict())
    chosen: set[str] = set()
    for pattern in patterns:
        hit = set(encoder(model)) if pattern == ENCODER else {n for n in names if matches(pattern, n)}
        if not hit:
            raise FreezeError(f"run config 'freeze': pattern {pattern!r} matches no parameter of this model "
                              f"(names look like {names[0]!r}; 'encoder' selects the task's encoder)")
        chosen |= hit
    trainable = [n for n, _ in model.named_parameters() if n not in chosen]
    if not trainable:
        raise FreezeError(f"run config 'freeze': {','.join(patterns)!r} freezes every parameter; nothing would train")
    return frozenset(chosen)


def _hold_in_eval(module: nn.Module, _inputs) -> None:
    """Forward pre-hook: a layer whose running statistics are frozen never updates them."""
    module.training = False


def apply_freeze(model: nn.Module, names: frozenset[str]) -> nn.Module:
    """Mark ``names`` fixed in ``model`` (in place; returns it)."""
    if not names:
        return model
    for name, param in model.named_parameters():
        if name in names:
            param.requires_grad_(False)
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        buffers = [f"{prefix}{b}" for b, _ in module.named_buffers(recurse=False)]
        if buffers and any(b in names for b in buffers):
            module.register_forward_pre_hook(_hold_in_eval)
    return model
