"""``fedimaging import``: a NIfTI data set (MSD, nnU-Net v2 raw, plain folders) to a site dataset.

The output is exactly what ``prep`` writes (DESIGN 3.4), built with prep's own pieces: keyed
pseudonyms and the private mapping (:mod:`data_prep.deid`), the NIfTI writer (fresh headers),
``dataset.json`` (:mod:`data_prep.site_dataset`), the fingerprint, atomic writes, the same
incremental state file and output-folder checks. Each case is checked (readable, finite, channel
count, channels on one grid, label on the image grid with declared values only); a bad case is
reported with a reason code and skipped, the others are imported. INPUT is only read.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep import deid
from data_prep.dataset_checks import KNOWN_MODALITIES, is_known_modality
from data_prep.fingerprint import build_fingerprint, case_stats
from data_prep.labels import LabelError, conform_label
from data_prep.nifti_deid import ImageError, channels_of, clean_sidecar, read_image, sidecar_for
from data_prep.nifti_sources import Source, SourceCase, SourceError, read_source
from data_prep.nifti_writer import write_nifti
from data_prep import prep_folders
from data_prep.prep import (
    EXIT_OK, EXIT_REJECTED, MAPPING_FILE, STATE_FILE, PrepResult, UsageError, _executor, _orientation_codes,
)
from data_prep.site_dataset import AFFINE_TOLERANCE_MM, FILE_ENDING, write_dataset_json
from fedimaging.io import atomic_write_json

IMPORTER_VERSION = "fedimaging-import-1"


@dataclass(frozen=True)
class ImportOptions:
    fmt: str = "auto"
    labels: str | None = None
    modality: str | None = None
    test_fraction: float = 0.0
    seed: int = 0
    workers: int = 1
    force: bool = False

    def signature(self) -> dict:
        return {"version": IMPORTER_VERSION, "modality": self.modality}


def is_ct(channel_name: str) -> bool:
    """nnU-Net's convention: a channel named CT gets CT normalisation, any other z-score."""
    return channel_name.strip().upper() == "CT"


def dataset_modality(channel_names: list[str]) -> str:
    """``CT`` when every channel is CT, else ``MR`` (fingerprint histogram bins)."""
    return "CT" if all(is_ct(c) for c in channel_names) else "MR"


def intensity_range(volume: np.ndarray) -> str:
    """A coarse per-case property for ``split --by field:intensity_range``."""
    top = float(volume.max()) if volume.size else 0.0
    low = float(volume.min()) if volume.size else 0.0
    if low >= 0 and top <= 255:
        return "0-255"
    if low >= 0 and top <= 4095:
        return "0-4095"
    return "wider"


def _fail(result: dict, reason: str, detail: str = "") -> dict:
    result.update(status="rejected", reason=reason, detail=detail or None)
    return result


def convert_case(job: dict) -> dict:
    """Check and write one case (runs in a worker); never raises, a failure is its result."""
    out, case = Path(job["output_dir"]), job["case"]
    result: dict = {"key": job["key"], "status": "rejected", "case": case, "reason": None}
    n_expected = job["channels"]
    if any(p is None for p in job["images"]):
        missing = [c for c, p in enumerate(job["images"]) if p is None]
        return _fail(result, "missing_channel", f"no file for channel(s) {missing}")
    volumes, affine, dtypes, problem = [], None, set(), None
    for path in job["images"]:
        try:
            image = read_image(path)
        except ImageError as exc:
            return _fail(result, exc.reason, exc.detail)
        if affine is None:
            affine = image.affine
        elif image.data.shape[:3] != volumes[0].shape or np.abs(image.affine - affine).max() > AFFINE_TOLERANCE_MM:
            problem = "channel_grid_mismatch"
        dtypes.add(image.stored_dtype)
        volumes.extend(channels_of(image))
        if problem:
            return _fail(result, problem, "the channel files of this case are not on one voxel grid")
    if len(volumes) != n_expected:
        return _fail(result, "channel_count_mismatch", f"{len(volumes)} channel(s), the data set declares {n_expected}")
    shape = volumes[0].shape
    label = None
    if job["label"]:
        try:
            label = conform_label(job["label"], affine, shape)
        except LabelError as exc:
            return _fail(result, exc.reason, str(exc))
        values = {int(v) for v in np.unique(label)}
        declared = job["declared"]
        if declared is not None and not values <= set(declared):
            return _fail(result, "undeclared_label_value",
                         f"label values {sorted(values - set(declared))} are not declared (declared {sorted(declared)})")
    trains = label is not None and not job["held_out"]
    images_dir, labels_dir = ("imagesTr", "labelsTr") if trains else ("imagesTs", "labelsTs")
    try:
        files = []
        for c, vol in enumerate(volumes):
            rel = f"{images_dir}/{case}_{c:04d}{FILE_ENDING}"
            write_nifti(out / rel, vol, affine)
            files.append(rel)
        lab_rel = None
        if label is not None:
            lab_rel = f"{labels_dir}/{case}{FILE_ENDING}"
            write_nifti(out / lab_rel, label, affine, label=True)
        spacing = [round(float(s), 6) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))]
        side_rel = f"sidecars/{case}.json"
        atomic_write_json(out / side_rel, {
            "case": case, "channels": job["channel_names"], "shape": list(shape),
            "voxel_spacing_mm": spacing, "orientation": _orientation_codes(affine),
            "stored_dtype": sorted(dtypes), "labelled": label is not None,
            "acquisition": clean_sidecar(sidecar_for(job["images"][0])), "converter": IMPORTER_VERSION,
        })
    except Exception as exc:  # disk full, permissions: this case only
        return _fail(result, f"write_error:{type(exc).__name__}")
    result.update(
        status="converted", images=files, label=lab_rel, sidecar=side_rel,
        split="train" if trains else "test", shape=list(shape), spacing=spacing,
        dtype="+".join(sorted(dtypes)), intensity_range=intensity_range(volumes[0]),
        stats=[case_stats(v, job["modality"], label if c == 0 else None) for c, v in enumerate(volumes)],
    )
    return result


def _case_hash(case: SourceCase, options: ImportOptions, held_out: bool) -> str:
    digest = hashlib.sha256(json.dumps(options.signature(), sort_keys=True).encode())
    digest.update(b"test\n" if held_out else b"train\n")
    for path in [*case.images, case.label, sidecar_for(case.images[0]) if case.images[0] else None]:
        digest.update(b"-" if path is None else hashlib.sha256(Path(path).read_bytes()).digest())
    return digest.hexdigest()


def held_out_keys(cases: list[SourceCase], fraction: float, seed: int) -> set[str]:
    """A seeded ``fraction`` of the labelled cases, kept for testing (chosen by a keyed rank)."""
    labelled = [c.key for c in cases if c.label is not None and c.split == "train"]
    rank = sorted(labelled, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    return set(rank[: int(round(fraction * len(labelled)))])


def _load_state(private: Path, force: bool) -> dict:
    path = private / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8")) if path.is_file() and not force else {}
    except (OSError, ValueError):
        state = {}
    return state if state.get("version") == IMPORTER_VERSION else {"version": IMPORTER_VERSION, "cases": {}}


def import_dataset(input_path, output_dir, fmt: str = "auto", labels=None, modality: str | None = None,
                   test_fraction: float = 0.0, seed: int = 0, workers: int = 1, force: bool = False) -> PrepResult:
    """Import the NIfTI data set at ``input_path`` into the site dataset ``output_dir``."""
    start = time.perf_counter()
    options = ImportOptions(fmt, str(labels) if labels else None, modality.upper() if modality else None,
                            float(test_fraction), int(seed), max(1, int(workers)), force)
    if not 0.0 <= options.test_fraction < 1.0:
        raise UsageError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    input_path, out = Path(input_path).expanduser(), Path(output_dir).expanduser()
    prep_folders.check_pair(input_path, out)
    owned_before = prep_folders.owned_files(out, IMPORTER_VERSION)  # refuses a folder that is not ours
    try:
        source = read_source(input_path, fmt, Path(labels).expanduser() if labels else None, options.modality)
    except SourceError as exc:
        raise UsageError(str(exc)) from None
    unknown = [c for c in source.channel_names if not is_known_modality(c)]
    if unknown:  # the site dataset loader would refuse them at every site: say so before writing
        raise UsageError(f"{input_path}: channel name(s) {unknown} are not modalities fedimaging can normalise "
                         f"(known: {', '.join(KNOWN_MODALITIES)}); set --modality or rename the channels")
    prep_folders.create_output(out)
    out = out.resolve()
    private, secret = deid.private_dir(out), deid.load_or_create_secret(out)
    state = _load_state(private, force)
    held_out = held_out_keys(source.cases, options.test_fraction, options.seed)
    modality = dataset_modality(source.channel_names)
    jobs, results, hashes = [], {}, {}
    for case in source.cases:
        key = f"{source.format}:{case.key}"
        try:
            hashes[key] = _case_hash(case, options, case.key in held_out)
        except OSError as exc:
            results[key] = {"key": key, "status": "rejected", "case": deid.case_name(secret, key),
                            "reason": "image_unreadable", "detail": type(exc).__name__}
            continue
        prior = state["cases"].get(key)
        if prior and prior["hash"] == hashes[key] and _outputs_exist(out, prior["result"]):
            results[key] = {**prior["result"], "unchanged": True}
            continue
        jobs.append({
            "key": key, "case": deid.case_name(secret, key), "output_dir": str(out),
            "images": [str(p) if p else None for p in case.images], "label": str(case.label) if case.label else None,
            "channels": len(source.channel_names), "channel_names": source.channel_names,
            "declared": sorted(source.labels.values()) if source.labels is not None else None,
            "held_out": case.key in held_out, "modality": modality,
        })
    executor = _executor(options.workers)
    try:
        if executor is None:
            results.update({job["key"]: convert_case(job) for job in jobs})
        else:
            futures = {executor.submit(convert_case, job): job for job in jobs}
            for fut in as_completed(futures):
                job = futures[fut]
                try:
                    results[job["key"]] = fut.result()
                except Exception as exc:  # a worker died (out of memory)
                    results[job["key"]] = _fail({"key": job["key"], "case": job["case"]},
                                                f"worker_failed:{type(exc).__name__}")
    finally:
        if executor is not None:
            executor.shutdown()
    new_state = {"version": IMPORTER_VERSION, "cases": {
        k: {"hash": hashes[k], "result": {x: y for x, y in r.items() if x != "unchanged"}}
        for k, r in results.items() if k in hashes}}
    return _finish(input_path.resolve(), out, private, source, results, modality, options, new_state, start,
                   owned_before)


def _outputs_exist(out: Path, result: dict) -> bool:
    if result.get("status") != "converted":
        return True  # a rejected case with unchanged files stays rejected, without re-reading it
    files = [*result["images"], result["sidecar"], *([result["label"]] if result.get("label") else [])]
    return all((out / f).is_file() for f in files)


def _finish(input_root: Path, out: Path, private: Path, source: Source, results: dict, modality: str,
            options: ImportOptions, state: dict, start: float, owned_before: set[str]) -> PrepResult:
    entries, training, test, cases, mapping, keep, label_values = [], [], [], [], {}, set(), set()
    by_key = {f"{source.format}:{c.key}": c for c in source.cases}
    for index, (key, res) in enumerate(sorted(results.items(), key=lambda kv: kv[1]["case"]), start=1):
        entry = {"index": index, "case": res["case"], "status": res["status"], "reason": res.get("reason"),
                 "detail": res.get("detail"), "split": res.get("split"), "channels": len(res.get("images", [])) or None,
                 "dtype": res.get("dtype"), "intensity_range": res.get("intensity_range"),
                 "unchanged": res.get("unchanged") or None}
        entries.append({k: v for k, v in entry.items() if v is not None})
        src = by_key[key]
        mapping[res["case"]] = {
            "source_case": src.key, "format": source.format, "status": res["status"],
            "images": [str(Path(p).relative_to(input_root)) if p else None for p in src.images],
            "label": str(Path(src.label).relative_to(input_root)) if src.label and input_root in Path(src.label).parents
            else (str(src.label) if src.label else None),
        }
        if res["status"] != "converted":
            continue
        item = {"image": res["images"][0], "label": res["label"]}  # other channels: <case>_0001, ...
        (training if res["split"] == "train" else test).append(item)
        keep.update([*res["images"], res["sidecar"], *([res["label"]] if res["label"] else [])])
        label_values.update(int(v) for v in res["stats"][0].get("label_voxels", {}))
        cases.append(res)
    report = import_report(entries, source, options, time.perf_counter() - start)
    if not cases:  # never empty an existing dataset; a new output gets the report, no dataset.json
        if not owned_before:
            prep_folders.write_owner(out, set(), IMPORTER_VERSION)
            atomic_write_json(out / "prep_report.json", report)
        return PrepResult(EXIT_REJECTED, report, out, nothing_converted=True,
                          table=summary_table(report, mapping) + f"\nno case of {input_root} could be imported")
    stale = prep_folders.stale_case_files(owned_before, keep)
    # owner list first, so a crash part way never orphans a file from it; stale files go last
    prep_folders.write_owner(out, owned_before | keep, IMPORTER_VERSION)
    if source.labels is not None:
        labels = dict(sorted(source.labels.items(), key=lambda kv: kv[1]))
    else:
        labels = {"background": 0, **{f"label_{v}": v for v in sorted(label_values - {0})}}
    channel_names = {str(i): name for i, name in enumerate(source.channel_names)}
    write_dataset_json(out, source.name, modality, labels, sorted(training, key=lambda e: e["image"]),
                       sorted(test, key=lambda e: e["image"]), channel_names=channel_names)
    counts = {"cases": len(cases), "training": len(training), "test": len(test),
              "cases_converted": len(cases)}
    fingerprint = build_fingerprint([{**c, "stats": c["stats"][0], "manufacturer": None} for c in cases],
                                    modality, counts)
    fingerprint["channel_names"] = channel_names
    if len(source.channel_names) > 1:
        fingerprint["channels"] = {
            name: (build_fingerprint([{**c, "stats": c["stats"][i]} for c in cases],
                                     "CT" if is_ct(name) else "MR", counts)["statistics"] or {}).get("intensity")
            for i, name in enumerate(source.channel_names)}
    atomic_write_json(out / "fingerprint.json", fingerprint)
    atomic_write_json(out / "prep_report.json", report)
    atomic_write_json(private / MAPPING_FILE, mapping, mode=0o600)
    atomic_write_json(private / STATE_FILE, state, mode=0o600)
    prep_folders.remove_files(out, stale)
    prep_folders.write_owner(out, keep, IMPORTER_VERSION)
    rejected = report["summary"]["rejected"]
    return PrepResult(EXIT_REJECTED if rejected else EXIT_OK, report, out, table=summary_table(report, mapping),
                      dataset=json.loads((out / "dataset.json").read_text()))


def import_report(entries: list[dict], source: Source, options: ImportOptions, seconds: float) -> dict:
    """``prep_report.json`` of an import: every case by index and pseudonym, status and reason code."""
    status = [e["status"] for e in entries]
    return {
        "summary": {"cases": len(entries), "converted": status.count("converted"),
                    "rejected": status.count("rejected"),
                    "unchanged": sum(1 for e in entries if e.get("unchanged")), "seconds": round(seconds, 3)},
        "options": {"importer": IMPORTER_VERSION, "format": source.format, "channels": len(source.channel_names),
                    "modality": options.modality, "test_fraction": options.test_fraction, "seed": options.seed},
        "cases": entries,
    }


def summary_table(report: dict, mapping: dict) -> str:
    """One line per rejected case (with its source file, for the site's engineer) and the totals."""
    lines = []
    for e in report["cases"]:
        if e["status"] != "converted":
            src = mapping.get(e["case"], {})
            files = ", ".join(p for p in [*(src.get("images") or []), src.get("label")] if p)
            lines.append(f"rejected {e['case']} ({src.get('source_case')}: {files}): {e['reason']}"
                         + (f" - {e['detail']}" if e.get("detail") else ""))
    s = report["summary"]
    lines.append(f"cases {s['cases']}: converted {s['converted']}, rejected {s['rejected']} "
                 f"(unchanged {s['unchanged']}); {s['seconds']:.1f} s")
    return "\n".join(lines)
