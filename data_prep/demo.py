"""Synthetic multi-hospital demo federation: abdominal CT/MR-like volumes with an organ and lesions.

The demo must behave like a real multi-site study, not a toy, so that strategy and privacy
comparisons mean something:

* anatomy in physical (RAS, mm) coordinates: body with a fat ring, spine, a deformed
  liver-like organ (label 1) with 0-2 hypo/hyper-intense lesions (label 2), and a
  spleen-like distractor of similar intensity that is *not* labelled (the model must use
  shape and position, not a threshold);
* sites differ like scanners do: calibration scale/offset, noise (site-c is a low-dose,
  thick-slice protocol), blur (resolution), voxel spacing, field of view,
  storage orientation, lesion contrast, size and prevalence, and case counts (imbalanced);
* one extra site (``site-unseen``) with its own scanner exists only for generalization tests.

A site reaches its dataset through the real path (:mod:`data_prep.demo_dicom`): each case is
written as the DICOM series its scanner would export (own manufacturer and model, slice plane
and order, int16 with rescale, some sites RLE or JPEG 2000 lossless) plus a NIfTI label map,
and ``prep`` converts that tree. The prepped voxels equal the generated ones; the NIfTI storage
order is prep's (third axis along the DICOM slice normal, as dcm2niix), so e.g. an 'LAS'
volume comes back 'LAI': the same voxels in the same RAS positions.

Every case is generated from ``numpy.random.default_rng([seed, site, case])``: the same seed
gives identical voxels, labels and case names regardless of the order in which sites are
generated. Sites are written with :func:`fedimaging.io.atomic_directory`, so simulated sites
generating in parallel never see half-written data.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from data_prep import demo_dicom
from data_prep.site_dataset import write_dataset_json
from fedimaging.io import atomic_directory

log = logging.getLogger("fedimaging.demo")

GENERATOR_VERSION = "v2"  # v2: written as DICOM and prepped; site-b coronal; MR stored as integers
SEGMENTATION_LABELS = {"background": 0, "organ": 1, "lesion": 2}
CLASSIFICATION_LABELS = {"no-lesion": 0, "lesion": 1}
UNSEEN_SITE = "site-unseen"


@dataclass(frozen=True)
class ScannerProfile:
    """How one (simulated) hospital's scanner and population look."""

    name: str
    modality: str  # "CT" or "MR" (the demo sites are CT; MR profiles are supported for studies/tests)
    spacing: tuple[float, float, float]  # mm, in storage order (i, j, k)
    fov_mm: tuple[float, float, float]
    orientation: str  # storage orientation of the voxel axes, e.g. "LPS" or "RAS"
    n_train: int
    n_test: int
    scale: float  # intensity calibration (CT) or global gain (MR)
    offset: float
    noise_sd: float  # in the site's output units
    blur_mm: float  # in-plane point spread (Gaussian sigma, mm)
    lesion_contrast: float  # lesion intensity relative to organ (HU for CT; fraction for MR)
    lesion_radius_mm: tuple[float, float]
    lesion_prevalence: float
    organ_scale: float = 1.0  # population difference in organ size
    manufacturer: str = "SYNTHETIC"  # DICOM Manufacturer / ManufacturerModelName of the site's scanner
    model: str = "DEMO"
    transfer_syntax: str = "explicit"  # how its DICOM is stored: explicit | rle | jpeg2000 (lossless)


DEMO_PROFILES: dict[str, ScannerProfile] = {
    "site-a": ScannerProfile(
        "site-a", "CT", (1.25, 1.25, 2.5), (170, 150, 140), "LPS", 32, 8,
        scale=1.0, offset=0.0, noise_sd=12.0, blur_mm=0.8, lesion_contrast=-45.0,
        lesion_radius_mm=(10.0, 20.0), lesion_prevalence=0.75,
        manufacturer="GE MEDICAL SYSTEMS", model="LightSpeed VCT",
    ),
    # Coronal slices (left-right x superior-inferior, stacked anterior to posterior), RLE compressed.
    "site-b": ScannerProfile(
        "site-b", "CT", (0.9, 0.9, 3.0), (160, 135, 140), "LIP", 16, 4,
        scale=1.08, offset=-25.0, noise_sd=22.0, blur_mm=1.4, lesion_contrast=-40.0,
        lesion_radius_mm=(9.0, 17.0), lesion_prevalence=0.65, organ_scale=0.92,
        manufacturer="SIEMENS", model="SOMATOM Definition AS", transfer_syntax="rle",
    ),
    "site-c": ScannerProfile(
        "site-c", "CT", (0.8, 0.8, 5.0), (180, 160, 140), "LAS", 5, 3,
        scale=1.0, offset=20.0, noise_sd=35.0, blur_mm=1.6, lesion_contrast=-40.0,
        lesion_radius_mm=(12.0, 22.0), lesion_prevalence=0.8, organ_scale=1.08,
        manufacturer="Philips", model="Brilliance 64", transfer_syntax="jpeg2000",
    ),
    # Optional fourth hospital (demo-sites=4): an MR site, the hardest domain shift.
    "site-d": ScannerProfile(
        "site-d", "MR", (1.5, 1.5, 4.0), (160, 180, 140), "PLS", 12, 4,
        scale=1.0, offset=0.0, noise_sd=25.0, blur_mm=1.8, lesion_contrast=0.45,
        lesion_radius_mm=(12.0, 22.0), lesion_prevalence=0.8, organ_scale=1.08,
        manufacturer="Hitachi Medical Corporation", model="ECHELON OVAL",
    ),
    UNSEEN_SITE: ScannerProfile(
        UNSEEN_SITE, "CT", (1.1, 1.1, 2.0), (165, 145, 130), "LPI", 0, 10,
        scale=0.95, offset=15.0, noise_sd=18.0, blur_mm=1.1, lesion_contrast=-40.0,
        lesion_radius_mm=(9.0, 19.0), lesion_prevalence=0.7, organ_scale=1.0,
        manufacturer="TOSHIBA", model="Aquilion ONE",
    ),
}

# Tissue intensities: CT in HU; MR in arbitrary T2-like units (lesions hyperintense).
_CT = {"air": -1000.0, "fat": -95.0, "soft": 35.0, "organ": 62.0, "spleen": 48.0, "bone": 450.0}
_MR = {"air": 0.0, "fat": 820.0, "soft": 320.0, "organ": 520.0, "spleen": 560.0, "bone": 140.0}


def demo_site_names(n_sites: int) -> list[str]:
    """Names of the first ``n_sites`` training sites of the demo federation."""
    names = [n for n in DEMO_PROFILES if n != UNSEEN_SITE]
    if not 1 <= n_sites <= len(names):
        raise ValueError(f"demo-sites must be between 1 and {len(names)}, got {n_sites}")
    return names[:n_sites]


def scaled_profile(profile: ScannerProfile, size: str) -> ScannerProfile:
    """``size="small"``: coarser voxels and fewer cases, for tests and quick trials."""
    if size == "standard":
        return profile
    if size != "small":
        raise ValueError(f"demo-size must be 'standard' or 'small', got {size!r}")
    return ScannerProfile(
        **{
            **profile.__dict__,
            "spacing": tuple(2.5 * s for s in profile.spacing),
            "n_train": min(profile.n_train, 4),
            "n_test": min(profile.n_test, 2),
        }
    )


def _orientation_affine(profile: ScannerProfile, shape: tuple[int, int, int]) -> np.ndarray:
    """Affine (voxel -> RAS mm) for storage orientation codes like 'LPS', centred on 0."""
    axes = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    for voxel_axis, code in enumerate(profile.orientation):
        world_axis, sign = axes[code]
        affine[world_axis, voxel_axis] = sign * profile.spacing[voxel_axis]
    centre = (np.array(shape) - 1) / 2.0
    affine[:3, 3] = -affine[:3, :3] @ centre
    return affine


def _smooth_field(rng: np.random.Generator, xyz: tuple[np.ndarray, ...], amplitude: float) -> np.ndarray:
    """Sum of a few random low-frequency cosines: organ shape perturbation and texture."""
    field = np.zeros_like(xyz[0])
    for _ in range(3):
        freq = rng.normal(0.0, 1.0, 3)
        freq *= rng.uniform(0.02, 0.05) / np.linalg.norm(freq)
        phase = rng.uniform(0, 2 * np.pi)
        field += np.cos(freq[0] * xyz[0] + freq[1] * xyz[1] + freq[2] * xyz[2] + phase)
    return amplitude * field / 3.0


def _ellipsoid(xyz, centre, radii) -> np.ndarray:
    return sum(((c - c0) / r) ** 2 for c, c0, r in zip(xyz, centre, radii))


def synthesize_case(
    profile: ScannerProfile, rng: np.random.Generator, with_lesion: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (image, label, affine) for one case of ``profile``; label 1 organ, 2 lesion.

    The image is int16 as the scanner stores it: CT in HU (truncated), MR rounded to integers.
    """
    shape = tuple(int(round(f / s)) for f, s in zip(profile.fov_mm, profile.spacing))
    affine = _orientation_affine(profile, shape)
    ijk = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    x, y, z = (
        affine[a, 0] * ijk[0] + affine[a, 1] * ijk[1] + affine[a, 2] * ijk[2] + affine[a, 3]
        for a in range(3)
    )
    xyz = (x, y, z)

    body_rx, body_ry = rng.uniform(64, 74), rng.uniform(50, 58)
    body = (x / body_rx) ** 2 + (y / body_ry) ** 2
    inside_body = body < 1.0
    fat_ring = inside_body & (body > (1 - 11.0 / body_ry) ** 2)
    spine = ((x / 11.0) ** 2 + ((y + body_ry - 16.0) / 11.0) ** 2) < 1.0

    s = profile.organ_scale * rng.uniform(0.88, 1.12)
    organ_centre = (rng.uniform(-30, -18), rng.uniform(-4, 10), rng.uniform(-12, 12))
    organ_radii = (36.0 * s, 29.0 * s * rng.uniform(0.9, 1.1), 38.0 * s * rng.uniform(0.9, 1.1))
    organ_q = _ellipsoid(xyz, organ_centre, organ_radii) / (1.0 + _smooth_field(rng, xyz, 0.35)) ** 2
    organ = (organ_q < 1.0) & inside_body & ~spine

    spleen_centre = (rng.uniform(30, 42), rng.uniform(-12, 2), rng.uniform(-20, 5))
    spleen_radii = (16.0 * s, 22.0 * s, 26.0 * s)
    spleen = (_ellipsoid(xyz, spleen_centre, spleen_radii) < 1.0) & inside_body & ~organ & ~spine

    lesion = np.zeros(shape, dtype=bool)
    if with_lesion:
        core = np.argwhere(organ_q < 0.45)
        for _ in range(rng.integers(1, 3)):
            if len(core) == 0:
                break
            centre_idx = core[rng.integers(len(core))]
            centre = [x[tuple(centre_idx)], y[tuple(centre_idx)], z[tuple(centre_idx)]]
            radius = rng.uniform(*profile.lesion_radius_mm)
            radii = [radius * rng.uniform(0.8, 1.2) for _ in range(3)]
            q = _ellipsoid(xyz, centre, radii) / (1.0 + _smooth_field(rng, xyz, 0.2)) ** 2
            lesion |= (q < 1.0) & organ

    tissue = _MR if profile.modality == "MR" else _CT
    image = np.full(shape, tissue["air"], dtype=np.float32)
    image[inside_body] = tissue["soft"]
    image[fat_ring] = tissue["fat"]
    image[spine & inside_body] = tissue["bone"]
    image[spleen] = tissue["spleen"]
    texture = _smooth_field(rng, xyz, 1.0)
    image[organ] = tissue["organ"] + 6.0 * texture[organ]
    if profile.modality == "MR":
        image[lesion] = tissue["organ"] * (1.0 + profile.lesion_contrast)
    else:
        image[lesion] = tissue["organ"] + profile.lesion_contrast

    sigma_vox = [profile.blur_mm / sp for sp in profile.spacing]
    sigma_vox[2] = max(sigma_vox[2], 0.5)
    image = ndimage.gaussian_filter(image, sigma=sigma_vox)
    if profile.modality == "MR":
        image *= 1.0 + _smooth_field(rng, xyz, 0.25)  # receive-coil bias field
    image = profile.scale * image + profile.offset
    image += rng.normal(0.0, profile.noise_sd, shape).astype(np.float32)
    if profile.modality == "MR":
        image = np.round(np.clip(image, 0, None))

    label = np.zeros(shape, dtype=np.uint8)
    label[organ] = 1
    label[lesion] = 2
    return image.astype(np.int16), label, affine


def demo_site_path(root: str | os.PathLike, seed: int, task: str, site: str, size: str) -> Path:
    """Cache location of one demo site; changes whenever the generated content would."""
    return Path(root) / GENERATOR_VERSION / f"seed-{seed}" / size / task / site


def _class_labels(root: Path, dataset: dict) -> dict:
    """The classification variant: each case's label map becomes its class (lesion present)."""
    for split in ("training", "test"):
        for entry in dataset[split]:
            label = np.asanyarray(nib.load(str(root / entry["label"])).dataobj)
            entry["label"] = CLASSIFICATION_LABELS["lesion" if (label == 2).any() else "no-lesion"]
    for folder in ("labelsTr", "labelsTs"):
        shutil.rmtree(root / folder, ignore_errors=True)
    return dataset


def write_demo_site(
    out_dir: str | os.PathLike, site: str, seed: int, task: str = "segmentation", size: str = "standard",
    workers: int = 1, keep_dicom: str | os.PathLike | None = None,
) -> Path:
    """Generate one demo site dataset into ``out_dir`` (atomically; no-op if it exists).

    The cases are written as DICOM into a temporary staging folder and converted by ``prep``
    (``workers`` processes); ``keep_dicom`` keeps that DICOM tree (``images/`` + ``labels/``).
    """
    if site not in DEMO_PROFILES:
        raise ValueError(f"unknown demo site {site!r}; known: {sorted(DEMO_PROFILES)}")
    if task not in ("segmentation", "classification"):
        raise ValueError(f"task must be 'segmentation' or 'classification', got {task!r}")
    out_dir = Path(out_dir)
    if (out_dir / "dataset.json").is_file():
        return out_dir
    profile = scaled_profile(DEMO_PROFILES[site], size)
    site_index = list(DEMO_PROFILES).index(site)
    total = profile.n_train + profile.n_test
    log.info("Generating demo site %s (%d cases as DICOM, then prep; first use only, cached in %s)",
             site, total, out_dir)
    with atomic_directory(out_dir) as tmp, demo_dicom.staging_folder(out_dir, keep_dicom) as staging:
        mapping: dict[str, dict] = {}
        for case_index in range(total):
            if case_index and case_index % 5 == 0:
                log.info("Generating demo site %s: %d of %d cases", site, case_index, total)
            rng = np.random.default_rng([seed, site_index, case_index])
            with_lesion = bool(rng.random() < profile.lesion_prevalence)
            image, label, affine = synthesize_case(profile, rng, with_lesion)
            case = f"{site.replace('-', '')}_{case_index:03d}"
            uid_seed = f"fedimaging-demo/{GENERATOR_VERSION}/{seed}/{site}/{size}/{case_index}"
            name, entry = demo_dicom.stage_case(staging, profile, site, case, uid_seed, image, label,
                                                affine, held_out=case_index >= profile.n_train)
            mapping[name] = entry
        demo_dicom.write_mapping(staging, mapping)
        log.info("Generating demo site %s: converting %d DICOM series with prep", site, total)
        demo_dicom.prep_staged_site(
            staging, tmp, secret_seed=f"fedimaging-demo/{GENERATOR_VERSION}/{seed}/{site}",
            modality=profile.modality, name=f"fedimaging-demo-{site}",
            label_names={k: v for k, v in SEGMENTATION_LABELS.items() if v}, workers=workers)
        dataset = json.loads((tmp / "dataset.json").read_text(encoding="utf-8"))
        if task == "classification":
            dataset = _class_labels(tmp, dataset)
        write_dataset_json(
            tmp,
            name=dataset["name"],
            modality=profile.modality,
            labels=SEGMENTATION_LABELS if task == "segmentation" else CLASSIFICATION_LABELS,
            training=dataset["training"],
            test=dataset["test"],
            description="Synthetic demo site generated by fedimaging (no patient data): "
                        "written as DICOM, converted by fedimaging prep.",
            synthetic=True,
        )
    return out_dir


def ensure_demo_site(
    root: str | os.PathLike, site: str, seed: int, task: str = "segmentation", size: str = "standard"
) -> Path:
    """Return the cached demo site dataset, generating it on first use.

    One process per site (the ClientApp may run inside simulation workers): prep runs without
    worker processes here; sites generating concurrently share the machine anyway.
    """
    return write_demo_site(demo_site_path(root, seed, task, site, size), site, seed, task, size)
