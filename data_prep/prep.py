"""Orchestrate DICOM tree -> site dataset (DESIGN 3.4): scan, group, convert, write manifests.

``prepare_site`` is the Python entry point (the CLI and the demo generator call it). Inputs are
only read. Labelled series train (``imagesTr``/``labelsTr``) unless the label mapping holds
them out as test cases (``imagesTs``/``labelsTs``, see :mod:`data_prep.labels`); unlabelled
series are test cases without a label. Every output is written atomically; the private state
(``private/state.json``) remembers each series' content hash so a re-run converts only what
changed. Conversion of series runs in worker processes; a failure in one series is caught and
reported for that series alone.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from data_prep import deid, prep_folders
from data_prep.fingerprint import build_fingerprint, case_stats
from data_prep.convert import find_series, read_series
from data_prep.geometry import GeometryError, GeometryOptions
from data_prep.labels import LabelError, conform_label, held_out_series, match_labels
from data_prep.limits import LimitExceeded
from data_prep.nifti_writer import write_nifti
from data_prep.pixels import PixelError
from data_prep.prep_folders import MAPPING_FILE, STATE_FILE, UsageError
from data_prep.report import build_report, summary_table
from data_prep.series import SeriesGroup
from data_prep.site_dataset import FILE_ENDING, write_dataset_json
from fedimaging.io import atomic_write_json

CONVERTER_VERSION = "fedimaging-prep-1"
EXIT_OK, EXIT_USAGE, EXIT_REJECTED = 0, 2, 3
__all__ = ["UsageError", "prepare_site", "PrepResult", "CONVERTER_VERSION"]


@dataclass
class PrepOptions:
    """Everything that changes what prep writes (part of each series' content hash)."""

    labels: str | None = None
    label_names: dict[str, int] | None = None
    workers: int = 1
    force: bool = False
    tilt: str = "correct"  # correct | reject
    uneven: str = "reject"  # reject | resample
    split_4d: bool = False
    modality: str | None = None  # CT | MR | None (the most common)
    name: str = "fedimaging-site"
    progress: bool = False

    def signature(self) -> dict:
        return {"tilt": self.tilt, "uneven": self.uneven, "split_4d": self.split_4d,
                "version": CONVERTER_VERSION}


@dataclass
class PrepResult:
    """What ``prepare_site`` did: exit code, the report object and the output folder."""

    exit_code: int
    report: dict
    output_dir: Path
    table: str = ""
    dataset: dict = field(default_factory=dict)
    nothing_converted: bool = False  # then no dataset.json was written or changed


def _check_folders(input_dir: Path, output_dir: Path) -> set[str]:
    """Refuse bad folder pairs; return the files prep wrote earlier into ``output_dir``."""
    prep_folders.check_pair(input_dir, output_dir)
    return prep_folders.owned_files(output_dir.resolve(), CONVERTER_VERSION)


def _files_hash(group: SeriesGroup, label_path: Path | None, options: PrepOptions,
                held_out: bool = False) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(options.signature(), sort_keys=True).encode())
    if held_out:  # only then, so hashes (and reuse) of earlier outputs stay as they were
        digest.update(b"split:test\n")
    for f in sorted(group.frames, key=lambda r: (r.file_hash, r.frame if r.frame is not None else -1)):
        digest.update(f"{f.file_hash}:{f.frame}\n".encode())
    if label_path is not None:
        digest.update(hashlib.sha256(label_path.read_bytes()).digest())
    return digest.hexdigest()


def _orientation_codes(affine: np.ndarray) -> str:
    return "".join(nib.aff2axcodes(affine))


def convert_job(job: dict) -> dict:
    """Convert one series group (runs in a worker): write image(s), label, sidecar; never raises."""
    out = Path(job["output_dir"])
    result: dict = {"key": job["key"], "status": "rejected", "cases": [], "warnings": []}
    try:
        plan, data = read_series(job["frames"], GeometryOptions(**job["geometry"]), result["warnings"])
    except (GeometryError, LimitExceeded) as exc:
        result.update(reason=exc.reason, detail=exc.detail)
        return result
    except PixelError as exc:
        result.update(reason=exc.reason)
        return result
    except Exception as exc:  # a corrupt file fails only its own series
        result.update(reason=f"conversion_error:{type(exc).__name__}")
        return result

    label_data = None
    if job.get("label_path"):
        try:
            label_data = conform_label(job["label_path"], plan.affine, data.shape)
            result["label"] = "matched"
        except LabelError as exc:
            result.update(label="rejected", label_reason=exc.reason)
        except Exception as exc:
            result.update(label="rejected", label_reason=f"label_error:{type(exc).__name__}")

    split = job["geometry"]["split_4d"] and data.ndim == 4
    volumes = [data[..., t] for t in range(data.shape[3])] if split else [data]
    first = job["frames"][0]
    written: list[Path] = []
    try:
        for t, vol in enumerate(volumes):
            case = job["case"] + (f"-t{t:03d}" if split else "")
            labelled = label_data is not None
            trains = labelled and not job.get("held_out")
            img_rel = f"{'imagesTr' if trains else 'imagesTs'}/{case}_0000{FILE_ENDING}"
            written.append(out / img_rel)
            write_nifti(out / img_rel, vol, plan.affine)
            lab_rel = None
            if labelled:
                lab_rel = f"{'labelsTr' if trains else 'labelsTs'}/{case}{FILE_ENDING}"
                written.append(out / lab_rel)
                write_nifti(out / lab_rel, label_data, plan.affine, label=True)
            side_rel = f"sidecars/{case}.json"
            sidecar = {
                "case": case,
                "subject": job["subject"],
                "study": job["study"],
                "modality": first.modality,
                "shape": list(vol.shape),
                "voxel_spacing_mm": [round(float(s), 6) for s in plan.spacing],
                "orientation": _orientation_codes(plan.affine),
                "dtype": str(vol.dtype),
                "num_files": job["files"],
                "time_point": t if split else None,
                "geometry_notes": list(plan.warnings),
                "labelled": labelled,
                "acquisition": deid.acquisition_sidecar(first.params),
                "converter": CONVERTER_VERSION,
            }
            written.append(out / side_rel)
            atomic_write_json(out / side_rel, sidecar)
            result["cases"].append({
                "case": case, "image": img_rel, "label": lab_rel, "sidecar": side_rel,
                "split": "train" if trains else "test",
                "shape": list(vol.shape[:3]), "spacing": [float(s) for s in plan.spacing],
                "manufacturer": first.params.get("Manufacturer"),
                "stats": case_stats(vol, first.modality, label_data),
            })
    except Exception as exc:  # nothing half-written: this series' files go (all are prep's own)
        for path in written:
            path.unlink(missing_ok=True)
        result.update(reason=f"write_error:{type(exc).__name__}", cases=[])
        return result
    result["status"] = "converted"
    result["reason"] = None
    return result


def _executor(workers: int):
    if workers <= 1:
        return None
    method = "fork" if sys.platform.startswith("linux") and not _threads_running() else None
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))


def _threads_running() -> bool:
    import threading

    return threading.active_count() > 1


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="file" if desc == "scan" else "series",
                file=sys.stderr, disable=not enabled, leave=False)


def _load_state(private: Path, force: bool) -> dict:
    path = private / STATE_FILE
    if force or not path.is_file():
        return {"version": CONVERTER_VERSION, "groups": {}}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if state.get("version") != CONVERTER_VERSION:
            return {"version": CONVERTER_VERSION, "groups": {}}
        return state
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"version": CONVERTER_VERSION, "groups": {}}


def _outputs_exist(out: Path, result: dict) -> bool:
    return all((out / c[k]).is_file() for c in result.get("cases", [])
               for k in ("image", "label", "sidecar") if c.get(k))


def prepare_site(input_dir, output_dir, labels=None, workers: int = 1, force: bool = False,
                 tilt: str = "correct", uneven: str = "reject", split_4d: bool = False,
                 modality: str | None = None, name: str = "fedimaging-site",
                 label_names: dict[str, int] | None = None, progress: bool = False) -> PrepResult:
    """Turn the DICOM tree ``input_dir`` into a site dataset in ``output_dir``; see README."""
    start = time.perf_counter()
    options = PrepOptions(labels=str(labels) if labels else None, label_names=label_names,
                          workers=max(1, int(workers)), force=force, tilt=tilt, uneven=uneven,
                          split_4d=split_4d, modality=modality.upper() if modality else None,
                          name=name, progress=progress)
    if tilt not in ("correct", "reject"):
        raise UsageError(f"tilt must be 'correct' or 'reject', got {tilt!r}")
    if uneven not in ("reject", "resample"):
        raise UsageError(f"uneven must be 'reject' or 'resample', got {uneven!r}")
    input_dir, out = Path(input_dir).expanduser(), Path(output_dir).expanduser()
    owned_before = _check_folders(input_dir, out)
    input_dir = input_dir.resolve()
    if labels is not None and not Path(labels).is_dir():
        raise UsageError(f"labels folder {labels} does not exist")
    try:  # reads (and so checks) mapping.json / mapping.csv before anything is written
        held_out = held_out_series(labels) if labels is not None else set()
    except ValueError as exc:  # the message names the file and the bad value
        raise UsageError(str(exc)) from exc

    executor = _executor(options.workers)
    try:
        files_total = sum(len(f) for _, _, f in os.walk(input_dir))
        with _progress(files_total, "scan", progress) as bar:
            scan, groups = find_series(input_dir, executor=executor, progress=bar)
        links = prep_folders.skipped_links(input_dir)
        if not groups:  # an empty, unmounted or junk-only input: nothing is written or removed
            raise UsageError(_no_series_message(input_dir, scan, links, files_total))
        prep_folders.create_output(out)
        out = out.resolve()
        private = deid.private_dir(out)
        try:
            secret = deid.load_or_create_secret(out)
        except ValueError as exc:  # the message names the secret file
            raise UsageError(str(exc)) from None
        state = _load_state(private, force)
        series_uids = {g.series_uid for g in groups}
        label_files, unmatched_labels = (match_labels(labels, series_uids) if labels else ({}, []))

        pending = [g for g in groups if g.status == "pending"]
        chosen = options.modality or _majority_modality(pending)
        for g in pending:
            if g.modality != chosen:
                g.status, g.reason = "skipped", "other_modality"

        jobs, reused, results = [], {}, {}
        for g in groups:
            if g.status != "pending":
                continue
            label_path = label_files.get(g.series_uid) if g.part == 0 else None
            is_held_out = label_path is not None and g.series_uid in held_out
            digest = _files_hash(g, label_path, options, is_held_out)
            prior = state["groups"].get(g.key)
            if prior and prior.get("hash") == digest and _outputs_exist(out, prior["result"]):
                reused[g.key] = prior["result"]
                continue
            first = g.frames[0]
            jobs.append({
                "key": g.key, "case": deid.case_name(secret, g.key), "frames": g.frames,
                "geometry": {"tilt": tilt, "uneven": uneven, "split_4d": split_4d},
                "label_path": str(label_path) if label_path else None, "held_out": is_held_out,
                "output_dir": str(out), "files": g.files,
                "subject": deid.pseudonym(secret, "subject", first.patient_id, 12),
                "study": deid.pseudonym(secret, "study", first.study_uid, 12),
                "hash": digest,
            })
        jobs.sort(key=lambda j: -len(j["frames"]))
        with _progress(len(jobs), "convert", progress) as bar:
            if executor is None:
                for job in jobs:
                    results[job["key"]] = convert_job(job)
                    bar.update(1)
            else:
                futures = {executor.submit(convert_job, job): job for job in jobs}
                for fut in as_completed(futures):
                    key = futures[fut]["key"]
                    try:
                        results[key] = fut.result()
                    except Exception as exc:  # a worker died (e.g. out of memory)
                        results[key] = {"key": key, "status": "rejected", "cases": [], "warnings": [],
                                        "reason": f"worker_failed:{type(exc).__name__}"}
                    bar.update(1)
    except OSError as exc:  # e.g. private/ not writable: name the file, not a traceback
        raise UsageError(f"cannot read or write {exc.filename or out}: {exc.strerror or exc}") from None
    finally:
        if executor is not None:
            executor.shutdown()

    new_state = {"version": CONVERTER_VERSION, "groups": {}}
    for job in jobs:
        new_state["groups"][job["key"]] = {"hash": job["hash"], "result": results[job["key"]]}
    for key, res in reused.items():
        new_state["groups"][key] = {"hash": state["groups"][key]["hash"], "result": res}
        results[key] = res

    folders = {"owned_before": owned_before, "links": links}
    try:
        return _finish(input_dir, out, private, secret, groups, results, set(reused), scan,
                       unmatched_labels, chosen, options, new_state, start, folders)
    except OSError as exc:  # e.g. a read-only or full disk: name the file, not a traceback
        raise UsageError(f"cannot write {exc.filename or out}: {exc.strerror or exc}") from None


def _no_series_message(input_dir: Path, scan, links: dict, files_total: int) -> str:
    parts = [f"{files_total} files", f"{scan.non_dicom} not DICOM", f"{len(scan.unreadable)} unreadable"]
    parts += [f"{n} {reason.replace('_', ' ')}s not followed" for reason, n in links.items()]
    return (f"input folder {input_dir} holds no DICOM image series ({', '.join(parts)}); "
            "nothing was written (is the input mounted?)")


def _majority_modality(groups: list[SeriesGroup]) -> str:
    counts = Counter(g.modality for g in groups)
    if not counts:
        return "CT"
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]


def _finish(input_dir, out, private, secret, groups, results, reused_keys, scan,
            unmatched_labels, modality, options, state, start, folders) -> PrepResult:
    entries, training, test, cases, mapping, keep = [], [], [], [], {}, set()
    label_values: set[int] = set()
    for index, g in enumerate(groups, start=1):
        entry = {"index": index, "series": deid.pseudonym(secret, "series", g.series_uid, 12),
                 "part": g.part, "status": g.status, "reason": g.reason, "files": g.files,
                 "modality": g.modality or None, "warnings": list(g.warnings)}
        res = results.get(g.key)
        if res is not None:
            entry["status"], entry["reason"] = res["status"], res.get("reason")
            if res.get("detail"):
                entry["detail"] = res["detail"]
            entry["warnings"] += res.get("warnings", [])
            if res.get("label"):
                entry["label"] = res["label"]
                if res.get("label_reason"):
                    entry["label_reason"] = res["label_reason"]
            if g.key in reused_keys:
                entry["unchanged"] = True
            case_names = [c["case"] for c in res.get("cases", [])]
            if case_names:
                entry["case"] = case_names[0] if len(case_names) == 1 else deid.case_name(secret, g.key)
                entry["cases"] = case_names if len(case_names) > 1 else None
            for c in res.get("cases", []):
                item = {"image": c["image"], "label": c["label"]}
                trains = c["label"] and c.get("split", "train") == "train"
                (training if trains else test).append(item)
                cases.append(c)
                keep.update(v for k, v in c.items() if k in ("image", "label", "sidecar") and v)
                label_values.update(int(v) for v in c["stats"].get("label_voxels", {}))
            if case_names:
                mapping[entry["case"]] = {
                    "series_uid": g.series_uid, "part": g.part,
                    "study_uid": g.frames[0].study_uid, "patient_id": g.frames[0].patient_id,
                    "source_folders": sorted({str(Path(f.path).parent.relative_to(input_dir))
                                              for f in g.frames}),
                    "cases": case_names,
                }
        entry = {k: v for k, v in entry.items() if v is not None}
        entries.append(entry)

    labels = {"background": 0}
    if options.label_names:
        labels.update({k: int(v) for k, v in options.label_names.items()})
    for v in sorted(label_values - set(labels.values())):
        labels[f"label_{v}"] = v
    training.sort(key=lambda e: e["image"])
    test.sort(key=lambda e: e["image"])
    stale = prep_folders.stale_case_files(folders["owned_before"], keep)
    unreadable = [reason for _, reason in scan.unreadable]
    report = build_report(entries, unreadable, scan.non_dicom, scan.dicomdir,
                          {"tilt": options.tilt, "uneven": options.uneven,
                           "split_4d": options.split_4d, "modality": modality,
                           "labels": bool(options.labels),
                           "unmatched_label_files": len(unmatched_labels)},
                          time.perf_counter() - start, skipped_paths=folders["links"],
                          removed_files=len(stale) if cases else 0)
    if not cases:  # never empty an existing dataset; a new output gets the report, no dataset.json
        fresh = not folders["owned_before"]
        if fresh:
            prep_folders.write_owner(out, set(), CONVERTER_VERSION)
            atomic_write_json(out / "prep_report.json", report)
        note = (f"reasons in {out / 'prep_report.json'}" if fresh
                else f"the dataset in {out} was left as it was")
        return PrepResult(exit_code=EXIT_REJECTED, report=report, output_dir=out, nothing_converted=True,
                          table=summary_table(report) + f"\nno series in {input_dir} could be converted; {note}")
    missing = sorted(rel for rel in keep if not (out / rel).is_file())
    if missing:  # dataset.json must never name a file that is not there
        raise UsageError(f"{out}: converted files vanished while prep ran (e.g. {missing[0]}); run prep again")

    # Owner list first (old and new files), so a crash part way never orphans a file from it;
    # stale files go last, so the dataset.json on disk always names files that exist.
    prep_folders.write_owner(out, folders["owned_before"] | keep, CONVERTER_VERSION)
    dataset_path = write_dataset_json(out, options.name, modality, labels, training, test)
    counts = {"cases": len(cases), "training": len(training), "test": len(test),
              "series_converted": sum(1 for e in entries if e["status"] == "converted")}
    atomic_write_json(out / "fingerprint.json", build_fingerprint(cases, modality, counts))
    atomic_write_json(out / "prep_report.json", report)
    atomic_write_json(private / MAPPING_FILE, mapping, mode=0o600)
    atomic_write_json(private / STATE_FILE, state, mode=0o600)
    prep_folders.remove_files(out, stale)
    prep_folders.write_owner(out, keep, CONVERTER_VERSION)
    s = report["summary"]
    rejected = s["rejected"] + s["labels_rejected"] + s["unreadable_files"]
    return PrepResult(exit_code=EXIT_REJECTED if rejected else EXIT_OK, report=report,
                      output_dir=out, table=summary_table(report),
                      dataset=json.loads(dataset_path.read_text()))
