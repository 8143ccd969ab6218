"""Replace a folder's generated files all at once: build the new folder beside it, then swap.

``deploy init --force`` must never leave a half-new deployment (a new CA beside the sites' old
``ca.crt``, the old CA key gone) or files of sites no longer listed. So the complete new folder
is written to a temporary sibling first; files the earlier run did not write (``owned`` says
which it did) are moved over into it; then the two folders are exchanged (one atomic
``renameat2(RENAME_EXCHANGE)`` on Linux, two renames elsewhere) and the old one is deleted. Any
failure before the exchange moves everything back and leaves the old folder as it was.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """One file of the new folder (mode set before any byte is written; fsynced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system cannot."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: filesystem or kernel cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(a))


def _swap_in(staging: Path, root: Path) -> Path:
    """Put ``staging`` at ``root``; return where the old ``root`` now is (to delete)."""
    if _exchange(staging, root):
        return staging
    old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
    old.rmdir()
    os.rename(root, old)
    try:
        os.rename(staging, root)
    except OSError:
        os.rename(old, root)
        raise
    return old


def _carry_over(old_dir: Path, new_dir: Path, rel: str, owned: Collection[str],
                moved: list[tuple[Path, Path]]) -> None:
    """Move every entry of ``old_dir`` not in ``owned`` to the same place under ``new_dir``."""
    for entry in sorted(old_dir.iterdir()):
        entry_rel = f"{rel}{entry.name}"
        if entry_rel in owned:
            continue
        target = new_dir / entry.name
        is_dir = entry.is_dir() and not entry.is_symlink()
        if is_dir and (target.is_dir() or any(o.startswith(entry_rel + "/") for o in owned)):
            created = not target.exists()
            if created:
                target.mkdir()
                os.chmod(target, entry.stat().st_mode & 0o7777)
            _carry_over(entry, target, entry_rel + "/", owned, moved)
            if created and not any(target.iterdir()):
                target.rmdir()  # held only files of the old deployment (e.g. a dropped site)
            continue
        if target.exists() or target.is_symlink():
            raise FileExistsError(f"{entry} is in the way of the new {target.name}")
        os.rename(entry, target)
        moved.append((target, entry))


def replace_folder(root: Path, files: Mapping[str, tuple[bytes, int]], owned: Collection[str],
                   dir_modes: Mapping[str, int] = {}) -> None:  # noqa: B006 - read only
    """Make ``root`` hold exactly ``files`` (relative POSIX path -> content, mode) plus whatever
    it held that is not in ``owned``; all or nothing."""
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.new-", dir=root.parent))
    moved: list[tuple[Path, Path]] = []
    try:
        for rel, (data, mode) in files.items():
            _write_file(staging / rel, data, mode)
        for rel, mode in dir_modes.items():
            os.chmod(staging / rel, mode)
        if not root.exists():
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(staging, 0o777 & ~umask)
            os.rename(staging, root)
            return
        os.chmod(staging, root.stat().st_mode & 0o7777)
        _carry_over(root, staging, "", set(owned) | set(files), moved)
        old = _swap_in(staging, root)
    except BaseException:
        for new, back in reversed(moved):
            os.rename(new, back)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(old)
