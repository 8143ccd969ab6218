"""Which folders prep writes into and which files it may delete; what it skips in the input.

prep writes ``private/prep_owner.json``: the list of every file it wrote. Only a folder holding
that list (or the ``private/state.json`` of a prep run older than the list) counts as a prep
output; any other non-empty folder, an nnU-Net dataset for instance, is refused even with
``--force``, because prep would overwrite its ``dataset.json``. Stale case files are deleted
only when the list names them: prep never deletes a file it did not write.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from data_prep import deid
from fedimaging.io import atomic_write_json

OWNER_FILE = "prep_owner.json"
STATE_FILE = "state.json"
MAPPING_FILE = "mapping.json"
WRITTEN_BY = "fedimaging prep"
TOP_LEVEL_OUTPUTS = ("dataset.json", "fingerprint.json", "prep_report.json")
CASE_DIRS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs", "sidecars")


class UsageError(ValueError):
    """Bad arguments or folders; the CLI turns it into exit code 2."""


def private_files() -> tuple[str, ...]:
    return tuple(f"{deid.PRIVATE_DIR}/{n}" for n in (STATE_FILE, MAPPING_FILE, deid.SECRET_FILE, OWNER_FILE))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None


def _legacy_owned(out: Path, converter: str) -> set[str] | None:
    """Files an older prep run (state.json, no owner list) wrote, read from its state."""
    state = _read_json(out / deid.PRIVATE_DIR / STATE_FILE)
    if not isinstance(state, dict) or state.get("version") != converter or not isinstance(state.get("groups"), dict):
        return None
    owned = set(TOP_LEVEL_OUTPUTS) | set(private_files())
    for group in state["groups"].values():
        cases = group.get("result", {}).get("cases", []) if isinstance(group, dict) else []
        for case in cases if isinstance(cases, list) else []:
            if isinstance(case, dict):
                owned.update(v for k, v in case.items() if k in ("image", "label", "sidecar") and isinstance(v, str))
    return owned


def _only_a_site_secret(out: Path) -> bool:
    """A folder prepared for prep: nothing in it but ``private/site_secret.key`` (the demo does this)."""
    entries = list(out.iterdir())
    if [e.name for e in entries] != [deid.PRIVATE_DIR] or not entries[0].is_dir():
        return False
    return [e.name for e in entries[0].iterdir()] == [deid.SECRET_FILE]


def check_pair(input_dir: Path, output_dir: Path) -> None:
    """Refuse folder pairs that could lose data: a missing input, an output inside (or holding) it."""
    if not input_dir.is_dir():
        raise UsageError(f"input folder {input_dir} does not exist or is not a folder")
    inp, out = input_dir.resolve(), output_dir.resolve()
    if inp == out or inp in out.parents or out in inp.parents:
        raise UsageError(f"output folder {out} must not be inside (or contain) the input folder {inp}")
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"output {output_dir} exists and is not a folder")


def owned_files(out: Path, converter: str) -> set[str]:
    """Relative paths prep wrote into ``out``; empty for a new or empty folder.

    Raises :class:`UsageError` for a non-empty folder that is not a prep output.
    """
    if not out.exists() or (out.is_dir() and not any(out.iterdir())) or _only_a_site_secret(out):
        return set()
    owner = _read_json(out / deid.PRIVATE_DIR / OWNER_FILE)
    if isinstance(owner, dict) and owner.get("written_by") == WRITTEN_BY and isinstance(owner.get("files"), list):
        return {f for f in owner["files"] if isinstance(f, str)}
    legacy = _legacy_owned(out, converter)
    if legacy is not None:
        return legacy
    raise UsageError(
        f"output folder {out} is not empty and was not written by fedimaging prep (no "
        f"{deid.PRIVATE_DIR}/{OWNER_FILE}); prep never writes into a folder it does not own, "
        "even with --force, since it would replace its dataset.json: choose a new or empty folder"
    )


def write_owner(out: Path, files: set[str], converter: str) -> None:
    """Record every file prep wrote (relative paths; pseudonymous case names only)."""
    everything = set(files) | set(TOP_LEVEL_OUTPUTS) | set(private_files())
    atomic_write_json(out / deid.PRIVATE_DIR / OWNER_FILE,
                      {"written_by": WRITTEN_BY, "converter": converter, "files": sorted(everything)},
                      mode=0o600)


def stale_case_files(owned_before: set[str], keep: set[str]) -> list[str]:
    """Case files an earlier run wrote that this run no longer lists (the only files prep deletes)."""
    return sorted(rel for rel in owned_before - keep
                  if rel.split("/", 1)[0] in CASE_DIRS and ".." not in Path(rel).parts)


def remove_files(out: Path, rels: list[str]) -> None:
    """Delete listed files, never through a link and never outside ``out``."""
    root = out.resolve()
    for rel in rels:
        path = out / rel
        if path.is_file() and not path.is_symlink() and root in path.resolve().parents:
            path.unlink()


def create_output(out: Path) -> None:
    """Create ``out`` (and its parents) and check it can be written; errors name the folder."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".prep-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"cannot write to output folder {out}: {exc.strerror or exc}") from None


def skipped_links(input_dir: Path) -> dict[str, int]:
    """Symbolic links the scan does not follow, by reason code (counts only, no paths).

    Folders reached through a link are not read (a link may loop or leave the input), and a
    link to nothing cannot be; the report says how many there were.
    """
    counts = {"symlinked_folder": 0, "broken_symlink": 0}
    for dirpath, dirnames, filenames in os.walk(input_dir):
        counts["symlinked_folder"] += sum(1 for d in dirnames if os.path.islink(os.path.join(dirpath, d)))
        counts["broken_symlink"] += sum(1 for f in filenames if not os.path.exists(os.path.join(dirpath, f)))
    return {k: v for k, v in counts.items() if v}
