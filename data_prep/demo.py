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

Every case is generated from ``numpy.random.default_rng([seed, site, case])``: the same seed
gives byte-identical data regardless of the order in which sites are generated. Sites are
written with :func:`fedimaging.io.atomic_directory`, so simulated sites generating in
parallel never see half-written data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from data_prep.site_dataset import write_dataset_json
from fedimaging.io import atomic_directory

GENERATOR_VERSION = "v1"
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


DEMO_PROFILES: dict[str, ScannerProfile] = {
    "site-a": ScannerProfile(
        "site-a", "CT", (1.25, 1.25, 2.5), (170, 150, 140), "LPS", 32, 8,
        scale=1.0, offset=0.0, noise_sd=12.0, blur_mm=0.8, lesion_contrast=-45.0,
        lesion_radius_mm=(10.0, 20.0), lesion_prevalence=0.75,
    ),
    "site-b": ScannerProfile(
        "site-b", "CT", (0.9, 0.9, 3.0), (160, 140, 135), "RAS", 16, 4,
        scale=1.08, offset=-25.0, noise_sd=22.0, blur_mm=1.4, lesion_contrast=-40.0,
        lesion_radius_mm=(9.0, 17.0), lesion_prevalence=0.65, organ_scale=0.92,
    ),
    "site-c": ScannerProfile(
        "site-c", "CT", (0.8, 0.8, 5.0), (180, 160, 140), "LAS", 5, 3,
        scale=1.0, offset=20.0, noise_sd=35.0, blur_mm=1.6, lesion_contrast=-40.0,
        lesion_radius_mm=(12.0, 22.0), lesion_prevalence=0.8, organ_scale=1.08,
    ),
    # Optional fourth hospital (demo-sites=4): an MR site, the hardest domain shift.
    "site-d": ScannerProfile(
        "site-d", "MR", (1.5, 1.5, 4.0), (160, 180, 140), "PLS", 12, 4,
        scale=1.0, offset=0.0, noise_sd=25.0, blur_mm=1.8, lesion_contrast=0.45,
        lesion_radius_mm=(12.0, 22.0), lesion_prevalence=0.8, organ_scale=1.08,
    ),
    UNSEEN_SITE: ScannerProfile(
        UNSEEN_SITE, "CT", (1.1, 1.1, 2.0), (165, 145, 130), "LPI", 0, 10,
        scale=0.95, offset=15.0, noise_sd=18.0, blur_mm=1.1, lesion_contrast=-40.0,
        lesion_radius_mm=(9.0, 19.0), lesion_prevalence=0.7, organ_scale=1.0,
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
    """Return (image, label, affine) for one case of ``profile``; label 1 organ, 2 lesion."""
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
        image = np.clip(image, 0, None)

    label = np.zeros(shape, dtype=np.uint8)
    label[organ] = 1
    label[lesion] = 2
    dtype = np.int16 if profile.modality == "CT" else np.float32
    return image.astype(dtype), label, affine


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header["descrip"] = b"fedimaging synthetic demo"
    nib.save(img, str(path))


def demo_site_path(root: str | os.PathLike, seed: int, task: str, site: str, size: str) -> Path:
    """Cache location of one demo site; changes whenever the generated content would."""
    return Path(root) / GENERATOR_VERSION / f"seed-{seed}" / size / task / site


def write_demo_site(
    out_dir: str | os.PathLike, site: str, seed: int, task: str = "segmentation", size: str = "standard"
) -> Path:
    """Generate one demo site dataset into ``out_dir`` (atomically; no-op if it exists)."""
    if site not in DEMO_PROFILES:
        raise ValueError(f"unknown demo site {site!r}; known: {sorted(DEMO_PROFILES)}")
    if task not in ("segmentation", "classification"):
        raise ValueError(f"task must be 'segmentation' or 'classification', got {task!r}")
    out_dir = Path(out_dir)
    if (out_dir / "dataset.json").is_file():
        return out_dir
    profile = scaled_profile(DEMO_PROFILES[site], size)
    site_index = list(DEMO_PROFILES).index(site)
    with atomic_directory(out_dir) as tmp:
        lists: dict[str, list[dict]] = {"training": [], "test": []}
        n_total = profile.n_train + profile.n_test
        for case_index in range(n_total):
            rng = np.random.default_rng([seed, site_index, case_index])
            with_lesion = bool(rng.random() < profile.lesion_prevalence)
            image, label, affine = synthesize_case(profile, rng, with_lesion)
            split = "Tr" if case_index < profile.n_train else "Ts"
            case = f"{site.replace('-', '')}_{case_index:03d}"
            (tmp / f"images{split}").mkdir(exist_ok=True)
            _save_nifti(image, affine, tmp / f"images{split}" / f"{case}_0000.nii.gz")
            entry: dict = {"image": f"images{split}/{case}_0000.nii.gz"}
            if task == "segmentation":
                (tmp / f"labels{split}").mkdir(exist_ok=True)
                _save_nifti(label, affine, tmp / f"labels{split}" / f"{case}.nii.gz")
                entry["label"] = f"labels{split}/{case}.nii.gz"
            else:
                entry["label"] = int(bool((label == 2).any()))
            lists["training" if split == "Tr" else "test"].append(entry)
        write_dataset_json(
            tmp,
            name=f"fedimaging-demo-{site}",
            modality=profile.modality,
            labels=SEGMENTATION_LABELS if task == "segmentation" else CLASSIFICATION_LABELS,
            training=lists["training"],
            test=lists["test"],
            description="Synthetic demo site generated by fedimaging (no patient data).",
            synthetic=True,
        )
    return out_dir


def ensure_demo_site(
    root: str | os.PathLike, site: str, seed: int, task: str = "segmentation", size: str = "standard"
) -> Path:
    """Return the cached demo site dataset, generating it on first use."""
    return write_demo_site(demo_site_path(root, seed, task, site, size), site, seed, task, size)
