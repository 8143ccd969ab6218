"""The prep report (every input series with status and reason) and the end-of-run table.

The report names series only by index and pseudonym, never by UID, path or description, so
it can be shown to a coordinator without leaking anything about patients.
"""

from __future__ import annotations

from collections import Counter


def build_report(entries: list[dict], unreadable: list[str], non_dicom: int, dicomdir: int,
                 options: dict, seconds: float, skipped_paths: dict[str, int] | None = None,
                 removed_files: int = 0) -> dict:
    """The ``prep_report.json`` object.

    ``skipped_paths`` counts input links not followed, by reason code; ``removed_files`` the
    case files of an earlier run that this run deleted (series no longer in the input).
    """
    status = Counter(e["status"] for e in entries)
    unreadable_counts = Counter(unreadable)
    return {
        "summary": {
            "series": len(entries),
            "converted": status.get("converted", 0),
            "skipped": status.get("skipped", 0),
            "rejected": status.get("rejected", 0),
            "unchanged": sum(1 for e in entries if e.get("unchanged")),
            "labels_rejected": sum(1 for e in entries if e.get("label") == "rejected"),
            "unreadable_files": len(unreadable),
            "non_dicom_files": non_dicom,
            "dicomdir_files": dicomdir,
            "skipped_links": sum((skipped_paths or {}).values()),
            "removed_files": removed_files,
            "seconds": round(seconds, 3),
        },
        "options": options,
        "unreadable_files": dict(sorted(unreadable_counts.items())),
        "skipped_paths": dict(sorted((skipped_paths or {}).items())),
        "series": entries,
    }


def summary_table(report: dict) -> str:
    """A plain-text table: one line per series, then the totals."""
    lines = [f"{'#':>4}  {'series':<12}  {'status':<9}  {'files':>5}  {'case':<21}  reason / notes"]
    for e in report["series"]:
        notes = e.get("reason") or ""
        extra = list(e.get("warnings", []))
        if e.get("label"):
            extra.append(f"label {e['label']}" + (f" ({e['label_reason']})" if e.get("label_reason") else ""))
        if e.get("unchanged"):
            extra.append("unchanged")
        if extra:
            notes = (notes + "; " if notes else "") + ", ".join(extra)
        lines.append(
            f"{e['index']:>4}  {e['series']:<12}  {e['status']:<9}  {e['files']:>5}  "
            f"{e.get('case') or '-':<21}  {notes}"
        )
    s = report["summary"]
    lines.append(
        f"series {s['series']}: converted {s['converted']}, skipped {s['skipped']}, "
        f"rejected {s['rejected']} (unchanged {s['unchanged']}); unreadable files "
        f"{s['unreadable_files']}, non-DICOM files {s['non_dicom_files']}; {s['seconds']:.1f} s"
    )
    for reason, n in report.get("unreadable_files", {}).items():
        lines.append(f"  {n} file(s) not used: {reason}")
    for reason, n in report.get("skipped_paths", {}).items():
        lines.append(f"  {n} input link(s) not followed: {reason}")
    if s.get("removed_files"):
        lines.append(f"  {s['removed_files']} file(s) of series no longer in the input removed")
    return "\n".join(lines)
