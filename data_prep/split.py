"""``fedimaging split``: one site dataset becomes N *simulated* sites, for research only.

Real federations have one dataset per hospital. To study federated training on a single
public data set (e.g. MSD Hippocampus) its cases are partitioned into ``site-0`` ...
``site-{N-1}``, each a complete site dataset (what ``data-path-template='OUTPUT_DIR/{site}'``
expects) with its own train/test cases. Methods:

- ``iid``: a seeded shuffle dealt round-robin (equal sizes, same distribution);
- ``size``: quantity skew, site ``i`` gets a share proportional to ``i + 1``;
- ``dirichlet:ALPHA``: per class (classification) or for all cases (segmentation), site shares
  drawn from Dirichlet(ALPHA); small ALPHA = strong skew;
- ``field:NAME``: covariate shift, cases grouped by a per-case property from the import report
  or the sidecar (e.g. ``dtype``, ``intensity_range``); whole groups go to sites.

``split.json`` records method, seed and counts per site (never a case name) and says that the
sites are simulated; the case-to-site assignment is kept in ``OUTPUT_DIR/private/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np

from data_prep import deid
from data_prep.fingerprint import build_fingerprint, case_stats
from data_prep.nifti_import import is_ct
from data_prep.site_dataset import Case, DatasetError, SiteDataset, load_site_dataset, write_dataset_json
from fedimaging.io import atomic_write_json

SIMULATED_NOTE = ("These sites are SIMULATED: one data set was partitioned by 'fedimaging split'. They share one "
                  "hospital's scanners and protocols, so results on them do not show how a real federation behaves.")
EXIT_OK, EXIT_USAGE = 0, 2
IDENTIFYING_FIELDS = ("case", "cases", "series", "subject", "study", "index", "image", "label", "sidecar")


def channel_kinds(names) -> tuple[str, ...]:
    """``CT`` or ``MR`` per channel (the histogram bins of each channel's statistics)."""
    return tuple("CT" if is_ct(n) else "MR" for n in names)


class SplitError(ValueError):
    """Bad arguments or a split that cannot give every site a training case."""


def parse_method(by: str) -> tuple[str, float | str | None]:
    """``iid`` | ``size`` | ``dirichlet:ALPHA`` | ``field:NAME`` -> (method, parameter)."""
    if by in ("iid", "size"):
        return by, None
    kind, _, arg = by.partition(":")
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            alpha = -1.0
        if not alpha > 0:
            raise SplitError(f"--by dirichlet:ALPHA needs a positive ALPHA, got {arg!r}")
        return kind, alpha
    if kind == "field" and arg in IDENTIFYING_FIELDS:
        raise SplitError(f"--by field:{arg}: that field identifies cases; group by a property (e.g. dtype)")
    if kind == "field" and arg:
        return kind, arg
    raise SplitError(f"--by must be iid, size, dirichlet:ALPHA or field:NAME, got {by!r}")


def _allocate(n: int, weights: np.ndarray) -> list[int]:
    """Largest-remainder integer counts summing to ``n``, proportional to ``weights``."""
    share = n * weights / weights.sum()
    counts = np.floor(share).astype(int)
    for i in np.argsort(-(share - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def _deal(items: list, counts: list[int], site_ids: list[int], out: dict) -> None:
    start = 0
    for site, count in zip(site_ids, counts):
        out.setdefault(site, []).extend(items[start:start + count])
        start += count


def case_field(root: Path, case: str, name: str, report: dict) -> str:
    """A per-case property: the import/prep report entry, else the sidecar; ``unknown`` if neither."""
    for entry in report.get("cases", []) + report.get("series", []):
        if entry.get("case") == case and name in entry:
            return str(entry[name])
    sidecar = root / "sidecars" / f"{case}.json"
    if sidecar.is_file():
        value = json.loads(sidecar.read_text(encoding="utf-8")).get(name)
        if value is not None:
            return str(value)
    return "unknown"


def assign(cases: list[Case], n_sites: int, method: str, param, seed: int, root: Path, report: dict,
           ) -> tuple[dict[int, list[Case]], dict[str, str]]:
    """Cases per site index, and each case's group (for ``field``/``dirichlet``)."""
    rng = np.random.default_rng(seed)
    order = [cases[i] for i in rng.permutation(len(cases))]
    sites: dict[int, list[Case]] = {}
    groups: dict[str, str] = {}
    if method == "iid":
        for i, case in enumerate(order):
            sites.setdefault(i % n_sites, []).append(case)
    elif method == "size":
        _deal(order, _allocate(len(order), np.arange(1, n_sites + 1, dtype=float)), list(range(n_sites)), sites)
    elif method == "dirichlet":
        for case in order:
            groups[case.name] = str(case.label) if isinstance(case.label, int) else "all"
        for value in sorted(set(groups.values())):
            members = [c for c in order if groups[c.name] == value]
            _deal(members, _allocate(len(members), rng.dirichlet(np.full(n_sites, param))), list(range(n_sites)), sites)
    else:  # field
        for case in order:
            groups[case.name] = case_field(root, case.name, param, report)
        by_group: dict[str, list[Case]] = {}
        for case in order:
            by_group.setdefault(groups[case.name], []).append(case)
        ranked = sorted(by_group.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        if len(ranked) >= n_sites:  # whole groups, largest first, to the site with fewest cases
            for _, members in ranked:
                target = min(range(n_sites), key=lambda s: (len(sites.get(s, [])), s))
                sites.setdefault(target, []).extend(members)
        else:  # fewer groups than sites: each group gets sites in proportion to its size
            per_group = _allocate(n_sites - len(ranked), np.array([len(m) for _, m in ranked], float))
            next_site = 0
            for (_, members), extra in zip(ranked, per_group):
                ids = list(range(next_site, next_site + 1 + extra))
                next_site += len(ids)
                _deal(members, _allocate(len(members), np.ones(len(ids))), ids, sites)
    return {s: sites.get(s, []) for s in range(n_sites)}, groups


def _site_split(cases: list[Case], fraction: float, seed: int, site: int) -> tuple[list[Case], list[Case]]:
    """(train, test) of one site: a seeded ``fraction`` of its labelled cases is held out."""
    labelled = [c for c in cases if c.label is not None]
    rng = np.random.default_rng([seed, site])
    labelled = [labelled[i] for i in rng.permutation(len(labelled))]
    n_test = int(round(fraction * len(labelled)))
    if fraction > 0 and len(labelled) >= 2:
        n_test = min(max(1, n_test), len(labelled) - 1)
    test = labelled[:n_test] + [c for c in cases if c.label is None]
    return labelled[n_test:], test


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _write_site(ds: SiteDataset, site_dir: Path, train: list[Case], test: list[Case], report: dict,
                mapping: dict, note: dict) -> None:
    """One simulated site: the cases' files, dataset.json, fingerprint, report, private mapping."""
    entries, stats_cases = {"training": [], "test": []}, []
    channel_modality = "CT" if ds.modality == "CT" else "MR"
    kinds = channel_kinds(ds.channel_names or (ds.modality,))
    for split, cases in (("training", train), ("test", test)):
        img_dir, lab_dir = ("imagesTr", "labelsTr") if split == "training" else ("imagesTs", "labelsTs")
        for case in cases:
            files = []
            for c, path in enumerate(case.images):
                rel = f"{img_dir}/{case.name}_{c:04d}{ds.extra.get('file_ending', '.nii.gz')}"
                _copy(path, site_dir / rel)
                files.append(rel)
            label = case.label
            if isinstance(case.label, Path):
                label = f"{lab_dir}/{case.label.name}"
                _copy(case.label, site_dir / label)
            sidecar = ds.root / "sidecars" / f"{case.name}.json"
            if sidecar.is_file():
                _copy(sidecar, site_dir / "sidecars" / sidecar.name)
            entries[split].append({"image": files[0], "label": label})
            img = nib.load(str(case.images[0]))
            lab = np.asanyarray(nib.load(str(case.label)).dataobj) if isinstance(case.label, Path) else None
            per_channel = [case_stats(np.asanyarray(nib.load(str(p)).dataobj), kind, lab if c == 0 else None)
                           for c, (p, kind) in enumerate(zip(case.images, kinds))]
            stats_cases.append({"shape": list(img.shape[:3]), "spacing": [float(z) for z in img.header.get_zooms()[:3]],
                                "stats": per_channel[0], "per_channel": per_channel})
    channel_names = {str(i): n for i, n in enumerate(ds.channel_names)} or None
    extra = {k: v for k, v in ds.extra.items() if k not in ("name", "channel_names", "labels", "numTraining",
                                                             "numTest", "file_ending", "simulated")}
    write_dataset_json(site_dir, f"{ds.name}-{site_dir.name}", ds.modality, ds.labels, entries["training"],
                       entries["test"], channel_names=channel_names, simulated=True, **extra)
    counts = {"cases": len(stats_cases), "training": len(train), "test": len(test)}
    fingerprint = build_fingerprint(stats_cases, channel_modality, counts)
    fingerprint["channel_names"] = channel_names or {"0": ds.modality}
    if len(kinds) > 1:  # per-channel intensity statistics, as the importer writes them
        fingerprint["channels"] = {
            name: (build_fingerprint([{**c, "stats": c["per_channel"][i]} for c in stats_cases], kinds[i], counts)
                   ["statistics"] or {}).get("intensity")
            for i, name in enumerate(ds.channel_names)}
    atomic_write_json(site_dir / "fingerprint.json", fingerprint)
    names = {c.name for c in train + test}
    kept = [e for e in report.get("cases", []) + report.get("series", []) if e.get("case") in names]
    atomic_write_json(site_dir / "prep_report.json", {
        "summary": {"cases": len(names), "converted": len(names), "rejected": 0, "simulated": True},
        "options": {"split": note}, "cases": kept})
    private = deid.private_dir(site_dir)
    atomic_write_json(private / "mapping.json", {k: v for k, v in mapping.items() if k in names}, mode=0o600)


def split_dataset(site_dataset, output_dir, sites: int, by: str = "iid", test_fraction: float = 0.2,
                  seed: int = 0, force: bool = False) -> dict:
    """Partition ``site_dataset`` into ``sites`` simulated sites under ``output_dir``; returns split.json."""
    method, param = parse_method(by)
    if sites < 2:
        raise SplitError(f"--sites must be at least 2, got {sites}")
    if not 0.0 <= test_fraction < 1.0:
        raise SplitError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    try:
        ds = load_site_dataset(site_dataset)
    except DatasetError as exc:
        raise SplitError(str(exc)) from None
    out = Path(output_dir).expanduser().resolve()
    if out == ds.root or ds.root in out.parents or out in ds.root.parents:
        raise SplitError(f"output folder {out} must not be inside (or contain) the site dataset {ds.root}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise SplitError(f"output folder {out} is not empty; choose an empty folder or pass --force")
    report_path, mapping_path = ds.root / "prep_report.json", ds.root / deid.PRIVATE_DIR / "mapping.json"
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else {}
    mapping = json.loads(mapping_path.read_text(encoding="utf-8")) if mapping_path.is_file() else {}
    pool = list(ds.training) + list(ds.test)
    assigned, groups = assign(pool, sites, method, param, seed, ds.root, report)
    note = {"method": method, "by": by, "seed": seed, "test_fraction": test_fraction, "sites": sites}
    summary = {"simulated": True, "note": SIMULATED_NOTE, "source": {"name": ds.name, "cases": len(pool)},
               **note, "counts": {}}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        assignment = {}
        for s in range(sites):
            train, test = _site_split(assigned[s], test_fraction, seed, s)
            if not train:
                raise SplitError(f"site-{s} would get no training case ({len(assigned[s])} case(s) in all); "
                                 "use fewer sites, another --by, or a larger data set")
            name = f"site-{s}"
            _write_site(ds, tmp / name, train, test, report, mapping, note)
            summary["counts"][name] = {"training": len(train), "test": len(test)}
            if groups:
                summary["counts"][name]["groups"] = dict(sorted(Counter(groups[c.name] for c in assigned[s]).items()))
            assignment.update({c.name: name for c in assigned[s]})
        atomic_write_json(tmp / "split.json", summary)
        atomic_write_json(deid.private_dir(tmp) / "split_assignment.json", assignment, mode=0o600)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{tmp.name[-12:]}")
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return summary


def split_main(argv: list[str] | None = None) -> int:
    """``fedimaging split SITE_DATASET OUTPUT_DIR --sites N [--by ...] [--test-fraction F] [--seed S]``."""
    parser = argparse.ArgumentParser(prog="fedimaging split", description=(
        "Research only: partition one site dataset into N SIMULATED sites site-0..site-{N-1} "
        "(use with data-path-template='OUTPUT_DIR/{site}')."))
    parser.add_argument("site_dataset", metavar="SITE_DATASET")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR")
    parser.add_argument("--sites", type=int, required=True, help="number of simulated sites (at least 2)")
    parser.add_argument("--by", default="iid", help="iid (default) | size | dirichlet:ALPHA | field:NAME "
                        "(a per-case field of prep_report.json or the sidecar, e.g. dtype, intensity_range)")
    parser.add_argument("--test-fraction", type=float, default=0.2,
                        help="fraction of each site's labelled cases held out for testing (default 0.2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUTPUT_DIR")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code not in (0, None) else 0
    try:
        summary = split_dataset(args.site_dataset, args.output_dir, args.sites, args.by, args.test_fraction,
                                args.seed, args.force)
    except SplitError as exc:
        print(f"fedimaging split: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for name, counts in summary["counts"].items():
        print(f"{name}: {counts['training']} training, {counts['test']} test"
              + (f", groups {counts['groups']}" if counts.get("groups") else ""))
    print(f"{summary['note']}\nsplit written to {Path(args.output_dir).resolve()} (split.json)")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(split_main())
