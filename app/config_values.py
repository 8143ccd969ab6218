"""Run-config values from text: numbers, lists of numbers and booleans, each checked once.

Flower passes ``--run-config`` values as TOML scalars or strings; these helpers turn them into
Python values and raise :class:`ConfigError` naming the key for anything else (NaN and
infinities included: no setting is meaningful at infinity).
"""

from __future__ import annotations

import math
from typing import Any


class ConfigError(ValueError):
    """A run or site setting is missing or malformed; the message names the key."""


def floats(key: str, value: Any, n: int | None = None) -> tuple[float, ...]:
    """``"1.5,1.5,3"`` (or a list) -> finite floats; one number stands for all ``n``."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        parts = tuple(finite(v) for v in items if str(v).strip())
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(f"run config '{key}': expected comma-separated numbers, got {value!r}") from exc
    if n is not None and len(parts) == 1:
        parts = parts * n
    if n is not None and len(parts) != n:
        raise ConfigError(f"run config '{key}': expected {n} numbers, got {value!r}")
    return parts


def ints(key: str, value: Any, n: int | None = None) -> tuple[int, ...]:
    """Like :func:`floats`, each a positive integer."""
    values = floats(key, value, n)
    if any(v != int(v) or v <= 0 for v in values):
        raise ConfigError(f"run config '{key}': expected positive integers, got {value!r}")
    return tuple(int(v) for v in values)


def axes(key: str, value: Any) -> tuple[int, ...]:
    """``"0,2"`` (or a list) -> distinct spatial axes 0-2 of a RAS volume, sorted; empty = none.

    Only the digits 0, 1, 2 (or TOML integers) count: ``true`` or ``1.0`` is a typo, never an axis.
    """
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    texts = [str(v).strip() for v in items if isinstance(v, bool) or str(v).strip()]
    ok = all(not isinstance(v, bool) for v in items) and all(t in ("0", "1", "2") for t in texts)
    if not ok or len(set(texts)) != len(texts):
        raise ConfigError(f"run config '{key}': expected distinct axes among 0, 1, 2 (RAS: 0 left-right, "
                          f"1 posterior-anterior, 2 inferior-superior), got {value!r}")
    return tuple(sorted(int(t) for t in texts))


def finite(value: Any) -> float:
    """A finite float (NaN and infinities are never a meaningful setting)."""
    if isinstance(value, (list, tuple, dict)) or value is None:
        raise TypeError
    number = float(value)
    if not math.isfinite(number):
        raise ValueError
    return number


def bool_value(key: str, value: Any) -> bool:
    """``true``/``false`` (also 1/0, yes/no; empty is false)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise ConfigError(f"run config '{key}': expected true or false, got {value!r}")


def patterns(key: str, value: Any) -> tuple[str, ...]:
    """``"encoder, model.2.*"`` (or a list) -> the non-empty, stripped names, in order, each once."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    out: list[str] = []
    for item in items:
        if not isinstance(item, (str, int, float)) or isinstance(item, bool) or "\x00" in str(item):
            raise ConfigError(f"run config '{key}': expected comma-separated names, got {value!r}")
        text = str(item).strip()
        if text and text not in out:
            out.append(text)
    return tuple(out)
