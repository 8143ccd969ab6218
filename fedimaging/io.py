"""Atomic file output: a reader never sees a half-written file.

Every file fedimaging writes goes through these helpers: the content is written to a
temporary file in the destination folder, flushed and fsynced, then renamed over the
target (``os.replace`` is atomic on POSIX within one filesystem).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "", private: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success.

    The caller writes the file (with any library) to the yielded path. On an exception the
    temporary file is removed and ``target`` is left as it was. ``private=True`` keeps the
    file readable by its owner only (0600); otherwise it gets the umask's usual mode.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        if (os.stat(tmp).st_mode & 0o777) == 0o600 and not private:
            # mkstemp creates 0600; ordinary outputs get the usual umask-based mode.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(target: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``target`` atomically; ``mode`` sets permissions (e.g. 0o600)."""
    with atomic_path(target, private=mode is not None and not mode & 0o077) as tmp:
        tmp.write_bytes(data)
        if mode is not None:
            os.chmod(tmp, mode)


def atomic_write_text(target: str | os.PathLike, text: str, mode: int | None = None) -> None:
    """Write UTF-8 ``text`` to ``target`` atomically."""
    atomic_write_bytes(target, text.encode("utf-8"), mode=mode)


def atomic_write_json(target: str | os.PathLike, obj: Any, mode: int | None = None) -> None:
    """Write ``obj`` as indented JSON (keys in insertion order) atomically."""
    atomic_write_text(target, json.dumps(obj, indent=2, allow_nan=False) + "\n", mode=mode)


def append_line_durably(target: str | os.PathLike, line: str) -> None:
    """Append one line (JSONL) and fsync, so a crash loses at most the line being written."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a", encoding="utf-8") as handle:
        handle.write(line.rstrip("\n") + "\n")
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Build a whole folder in a temporary sibling and rename it to ``target`` at the end.

    If ``target`` appears meanwhile (another process built it first), the new copy is
    discarded and the existing one kept: first writer wins, nobody sees a partial folder.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_json_object(path: str | os.PathLike, error: type[Exception] = ValueError,
                     expected: str = "a JSON object") -> dict[str, Any]:
    """The JSON object in ``path``; anything else raises ``error`` with a message naming the file.

    Missing, unreadable, not UTF-8, not JSON (or an integer too long to parse), nested too deeply
    to parse, or not an object (``expected`` says what it should be). NaN/Infinity literals parse
    (as Python does) and fail where they are used, naming the entry.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except OSError as exc:
        raise error(f"{path} cannot be read: {exc.strerror or exc}") from None
    try:
        obj = json.loads(text)
    except RecursionError:
        raise error(f"{path} is nested too deeply to parse") from None
    except ValueError as exc:  # JSONDecodeError, or an integer of more than 4300 digits
        raise error(f"{path} is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: expected {expected}, found {type(obj).__name__}")
    return obj
