"""Benchmark ``fedimaging prep`` against dcm2niix (and dicom2nifti when installed).

    python -m bench.prep INPUT_DIR [--workers N] [--repeat R]
    python -m bench.prep --synthetic 4 --slices 200      # writes CT series to a temp folder first

Prints one JSON object: series converted, seconds and slices per second for each converter on
the same input (.nii.gz output), and how many of prep's series agree with dcm2niix (affine
within 1e-3 mm and voxel values within 1e-3 after canonical reorientation).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from data_prep.prep import prepare_site

AFFINE_TOL = 1e-3
VOXEL_TOL = 1e-3


def _canonical(path):
    img = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asanyarray(img.get_fdata(dtype=np.float32))
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return img.affine, data


def _agrees(ours: Path, refs: list[Path]) -> bool:
    aff, data = _canonical(ours)
    for ref in refs:
        raff, rdata = _canonical(ref)
        if rdata.shape == data.shape and np.abs(raff - aff).max() <= AFFINE_TOL \
                and np.abs(rdata - data).max() <= VOXEL_TOL:
            return True
    return False


def _count_slices(out: Path) -> int:
    report = json.loads((out / "prep_report.json").read_text())
    return sum(s["files"] for s in report["series"] if s["status"] == "converted")


def run_prep(src: Path, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "site"
        start = time.perf_counter()
        result = prepare_site(src, out, workers=workers)
        seconds = time.perf_counter() - start
        converted = result.report["summary"]["converted"]
        mapping = json.loads((out / "private/mapping.json").read_text())
        images = {c: sorted(out.glob(f"images*/{c}*_0000.nii.gz")) for c in mapping}
        files = _count_slices(out)
        keep = Path(tempfile.mkdtemp(prefix="bench-prep-"))
        kept = {}
        for case, paths in images.items():
            kept[case] = []
            for p in paths:
                shutil.copy(p, keep / p.name)
                kept[case].append(keep / p.name)
    return {"seconds": seconds, "series_converted": converted, "files": files,
            "mapping": mapping, "images": kept, "keep": keep}


def run_dcm2niix(src: Path, out: Path, scaling: str = "y") -> dict:
    exe = shutil.which("dcm2niix")
    if exe is None:
        return {"available": False}
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    subprocess.run([exe, "-p", scaling, "-z", "y", "-b", "n", "-f", "%j_%s_%e_%z", "-o", str(out), str(src)],
                   check=False, capture_output=True)
    seconds = time.perf_counter() - start
    files = sorted(out.glob("*.nii.gz"))
    return {"available": True, "seconds": seconds, "files": files}


def run_dicom2nifti(src: Path, out: Path) -> dict:
    try:
        import dicom2nifti  # noqa: F401
    except ImportError:
        return {"available": False}
    import dicom2nifti

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        dicom2nifti.convert_directory(str(src), str(out), compression=True, reorient=False)
    except Exception as exc:  # it refuses some inputs; report, do not fail the benchmark
        return {"available": True, "error": type(exc).__name__}
    return {"available": True, "seconds": time.perf_counter() - start,
            "series_converted": len(list(out.glob("*.nii.gz")))}


def make_synthetic(folder: Path, n_series: int, n_slices: int, size: int = 512) -> Path:
    """CT-like series (air outside an elliptic body with noisy soft tissue and a bone ring),
    int16 HU, written with pydicom; realistic compressibility for timing."""
    from data_prep.synthetic_dicom import write_volume

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    r = ((xx - size / 2) / (0.42 * size)) ** 2 + ((yy - size / 2) / (0.3 * size)) ** 2
    for i in range(n_series):
        vol = np.full((size, size, n_slices), -1024, dtype=np.int16)
        for k in range(n_slices):
            sl = np.where(r < 1, 40 + rng.normal(0, 15, r.shape), -1024)
            sl[(r > 0.85) & (r < 1)] = 900
            vol[:, :, k] = sl.round().astype(np.int16).T
        affine = np.diag([0.7, 0.7, 1.25, 1.0])
        affine[:3, 3] = (-180, -180, -200 + 5 * i)
        write_volume(folder / f"series{i}", affine, vol, intercept=-1024.0)
    return folder


def benchmark(src: Path, workers: int) -> dict:
    ours = run_prep(src, workers)
    with tempfile.TemporaryDirectory() as tmp:
        ref = run_dcm2niix(src, Path(tmp) / "dcm2niix")
        ref_n = run_dcm2niix(src, Path(tmp) / "dcm2niix_pn", "n") if ref.get("available") else {}
        d2n = run_dicom2nifti(src, Path(tmp) / "dicom2nifti")
        result = {
            "input": "(given folder)",
            "workers": workers,
            "prep": {"series_converted": ours["series_converted"], "seconds": round(ours["seconds"], 3),
                     "slices_per_second": round(ours["files"] / ours["seconds"], 1)},
        }
        if ref.get("available"):
            refs = ref["files"] + ref_n["files"]
            agree = 0
            for case, info in ours["mapping"].items():
                candidates = [r for r in refs if r.name.startswith(info["series_uid"] + "_")]
                if any(_agrees(p, candidates) for p in ours["images"][case]):
                    agree += 1
            result["dcm2niix"] = {"files_written": len(ref["files"]), "seconds": round(ref["seconds"], 3),
                                  "slices_per_second": round(ours["files"] / ref["seconds"], 1)}
            result["agreement_with_dcm2niix"] = {"series_agreeing": agree,
                                                 "series_compared": len(ours["mapping"])}
            result["time_ratio_prep_over_dcm2niix"] = round(ours["seconds"] / ref["seconds"], 2)
        else:
            result["dcm2niix"] = "not installed"
        if d2n.get("available"):
            result["dicom2nifti"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in d2n.items()
                                     if k != "available"}
    shutil.rmtree(ours["keep"], ignore_errors=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.prep", description=__doc__.splitlines()[0])
    parser.add_argument("input_dir", nargs="?", help="DICOM folder (read only)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--synthetic", type=int, metavar="N", help="benchmark N synthetic CT series instead")
    parser.add_argument("--slices", type=int, default=200, help="slices per synthetic series")
    args = parser.parse_args(argv)
    if args.synthetic:
        with tempfile.TemporaryDirectory() as tmp:
            src = make_synthetic(Path(tmp) / "dicom", args.synthetic, args.slices)
            result = benchmark(src, args.workers)
            result["input"] = f"synthetic: {args.synthetic} CT series x {args.slices} slices of 512x512"
    elif args.input_dir:
        result = benchmark(Path(args.input_dir), args.workers)
    else:
        parser.error("give INPUT_DIR or --synthetic N")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
