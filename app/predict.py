"""``fedimaging predict``: apply a run's trained model to new cases at a site.

The model is rebuilt from the run's own ``run_config.json`` (found beside ``final_model.pt``, or
one folder up for ``checkpoints/*.pt``; ``--config`` overrides), so prediction uses exactly the
transforms and sliding-window settings of the in-training evaluation. A case is a NIfTI file or a
DICOM series folder (converted by the same code as ``fedimaging prep``). Segmentation writes a
uint8 label map on the input's own grid: the spatial preprocessing (RAS reorientation,
resampling) is inverted with MONAI's ``Invertd`` using nearest-neighbour interpolation, and the
file gets the input's affine and shape. Classification writes a JSON file with class
probabilities.

FedBN: the normalisation layers never leave the sites, so ``final_model.pt`` holds the server's
untouched initial copy of them. Predicting with a FedBN model therefore needs one site's layers:
``--site NAME`` (simulation: ``<state-root>/<NAME>``) or ``--site-state PATH`` (the site's
``state-dir``, or one ``fedbn-round-*.pt`` file in it).

Personalization (``--personal``): a site's personal model (``personalization=finetune|ditto``)
never left the site; the same ``--site``/``--site-state`` find it there (the latest
``personal-round-*.pt``, a full weights-only state dict) and it replaces ``final_model.pt``'s weights.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from app.config import ConfigError, RunConfig, parse_run_config
from fedimaging.io import atomic_write_json, read_json_object
from fedimaging.weights import WeightsError, load_tensors
from tasks import Task, get_task

NIFTI_SUFFIXES = (".nii.gz", ".nii")
CT_AIR_THRESHOLD = -500.0  # HU: any voxel below this means the image is a CT (air is -1000)
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class PredictError(ValueError):
    """Bad model, config or input; the message names the file or option to fix."""


# --------------------------------------------------------------------------------------------
# Model loading
# --------------------------------------------------------------------------------------------
def run_dir_of(model_path: Path) -> Path:
    """The run directory a model file belongs to (``checkpoints/`` lives one level down)."""
    parent = model_path.resolve().parent
    return parent.parent if parent.name in ("checkpoints", "models") else parent


def read_run_config(path: Path) -> RunConfig:
    """Parse a run directory's ``run_config.json`` (keys starting with ``_`` are provenance)."""
    if not path.is_file():
        raise PredictError(f"run config {path} not found; pass --config RUN_DIR/run_config.json")
    raw = read_json_object(path, PredictError)
    values = {k: v for k, v in raw.items() if not k.startswith("_")}
    try:
        return parse_run_config(values)
    except ConfigError as exc:
        raise PredictError(f"run config {path}: {exc}") from None


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A weights-only state dict (never unpickles arbitrary objects; ``fedimaging.weights``)."""
    try:
        state = load_tensors(path)
    except WeightsError as exc:
        raise PredictError(str(exc)) from None
    damaged = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if damaged:  # a NaN weight makes every voxel background: refuse rather than write that mask
        raise PredictError(f"model file {path} holds NaN or infinite weights in {len(damaged)} tensor(s), "
                           f"e.g. {damaged[0]!r}; use another checkpoint (e.g. checkpoints/best.pt)")
    return state


def fedbn_site_state(run: RunConfig, run_dir: Path, site: str | None, site_state: Path | None,
                     kind: str = "fedbn") -> Path:
    """The file holding one site's FedBN layers (``kind="personal"``: its personal model) for this
    run (the latest round saved)."""
    what = "FedBN layers" if kind == "fedbn" else "personal model"
    if site_state is None and not site:
        why = ("this model was trained with FedBN: its normalisation layers stayed at the sites"
               if kind == "fedbn" else "--personal: a personal model stays at its site")
        raise PredictError(f"{why}. Pass --site NAME (simulation) or --site-state PATH "
                           f"(the site's state-dir or a {kind}-round-*.pt file)")
    if site_state is not None and site_state.is_file():
        return site_state
    state_dir = site_state if site_state is not None else run.state_root_path / str(site)
    folder = state_dir / "runs" / run_dir.name
    files = sorted(folder.glob(f"{kind}-round-*.pt"))
    if not files:
        raise PredictError(f"no {what} of run {run_dir.name!r} under {state_dir} (looked for {folder}/{kind}-round-*.pt)")
    return files[-1]


def _network_of(run: RunConfig) -> str:
    """The run config's description of the network, for error messages."""
    if run.task == "classification":
        return f"classifier={run.classifier}, classifier-width={run.classifier_width:g}"
    return f"channels={list(run.channels)}"


@dataclass
class LoadedModel:
    """A trained model ready for inference, with the run settings it was trained under."""

    run: RunConfig
    task: Task
    model: nn.Module
    device: torch.device
    model_path: Path
    run_dir: Path
    site_state: Path | None = None


def pick_device(name: str | None) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PredictError("--device cuda: no CUDA device is available here (use --device cpu)")
    if name not in ("cpu", "cuda"):
        raise PredictError(f"--device must be cpu or cuda, got {name!r}")
    return torch.device(name)


def load_model(
    model_path: str | Path,
    config_path: str | Path | None = None,
    site: str | None = None,
    site_state: str | Path | None = None,
    device: str | None = None,
    personal: bool = False,
) -> LoadedModel:
    """Rebuild the run's model and load ``model_path`` (and, for FedBN, a site's layers; with
    ``personal``, the site's personal model instead)."""
    model_path = Path(model_path).expanduser()
    if not model_path.is_file():
        raise PredictError(f"model file {model_path} not found (expected runs/<run>/final_model.pt or a checkpoint)")
    run_dir = run_dir_of(model_path)
    run = read_run_config(Path(config_path).expanduser() if config_path else run_dir / "run_config.json")
    task = get_task(run.task, run.task_settings())
    model = task.build_model()
    state = load_state_dict(model_path)
    used_site_state = None
    if personal:
        if run.personalization == "none":
            raise PredictError(f"--personal: run {run_dir.name!r} was trained with personalization=none")
        used_site_state = fedbn_site_state(run, run_dir, site, Path(site_state).expanduser() if site_state else None,
                                           "personal")
        state = load_state_dict(used_site_state)
    elif run.strategy == "fedbn":
        used_site_state = fedbn_site_state(run, run_dir, site, Path(site_state).expanduser() if site_state else None)
        local = load_state_dict(used_site_state)
        expected = task.local_param_names(model)
        unknown = sorted(set(local) - set(model.state_dict()))
        if unknown or not set(local) <= expected:
            raise PredictError(f"{used_site_state} does not hold this model's normalisation layers (e.g. {unknown[:3]})")
        state.update(local)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise PredictError(
            f"{model_path} does not match the model described by the run config "
            f"(task={run.task}, {_network_of(run)}): {str(exc).splitlines()[0]}"
        ) from None
    dev = pick_device(device)
    model.to(dev).eval()
    return LoadedModel(run, task, model, dev, model_path, run_dir, used_site_state)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
@dataclass
class CaseInput:
    """One case as a NIfTI file (converted from DICOM if needed) plus the grid to write back on."""

    name: str
    nifti: Path
    affine: np.ndarray
    shape: tuple[int, int, int]
    modality: str | None  # from the DICOM header; None for NIfTI
    channels: tuple[Path, ...] = ()  # multi-channel models: one file per channel (see app.predict_channels)

    @property
    def image_item(self) -> str | list[str]:
        """What the task's LoadImaged reads: the file, or the channel files (stacked as channels)."""
        return [str(p) for p in self.channels] if self.channels else str(self.nifti)


def case_name(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name[:-5] if name.endswith("_0000") else name


def check_finite_image(data: np.ndarray, where: Path) -> None:
    """Refuse an image with NaN or infinite voxels: the model would see garbage and say 'background'."""
    if data.dtype.kind not in "fc":
        return
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise PredictError(f"{where}: {bad} of {data.size} voxels are NaN or infinite; predict refuses "
                           "such an image (a damaged export? convert it again)")


def _check_3d(shape: tuple[int, ...], where: Path) -> tuple[int, int, int]:
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise PredictError(f"{where}: expected a 3D volume, got shape {tuple(shape)} (split 4D series first)")
    return tuple(int(s) for s in shape)  # type: ignore[return-value]


def dicom_series_to_nifti(folder: Path, out: Path) -> tuple[np.ndarray, tuple[int, int, int], str]:
    """Convert the one image series in ``folder`` with prep's own code; returns (affine, shape, modality)."""
    from data_prep.geometry import GeometryError, GeometryOptions, plan_volume
    from data_prep.nifti_writer import write_nifti
    from data_prep.pixels import PixelError, read_volume
    from data_prep.scan import scan_tree
    from data_prep.series import group_series

    scan = scan_tree(folder)
    groups = group_series(scan.frames)
    volumes = [g for g in groups if g.status == "pending"]
    if not volumes:
        reasons = sorted({str(g.reason) for g in groups}) or ["no DICOM image files"]
        raise PredictError(f"{folder}: no convertible image series ({', '.join(reasons)})")
    if len(volumes) > 1:
        raise PredictError(
            f"{folder}: holds {len(volumes)} image series; point --input at one series folder "
            "(or run 'fedimaging prep' and predict on its NIfTI files)"
        )
    group = volumes[0]
    try:
        plan = plan_volume(group.frames, GeometryOptions())
        data = read_volume(plan)
    except (GeometryError, PixelError) as exc:
        raise PredictError(f"{folder}: cannot convert the series: {getattr(exc, 'reason', exc)}") from None
    shape = _check_3d(data.shape, folder)
    check_finite_image(data, folder)
    write_nifti(out, data.reshape(shape), plan.affine)
    return np.asarray(nib.load(str(out)).affine), shape, group.modality


def open_case(path: Path, workdir: Path, in_channels: int = 1) -> CaseInput:
    """A NIfTI file as is, or a DICOM series folder converted into ``workdir``; N channels: see predict_channels."""
    if in_channels > 1:
        from app.predict_channels import open_channels

        if not path.is_file():
            raise PredictError(f"input {path} does not exist")
        name, files, affine, shape = open_channels(path, workdir, in_channels, PredictError)
        return CaseInput(name, files[0], affine, shape, None, tuple(files))
    if path.is_dir():
        nifti = workdir / f"{path.name or 'series'}.nii.gz"
        affine, shape, modality = dicom_series_to_nifti(path, nifti)
        return CaseInput(path.name, nifti, affine, shape, modality)
    if not path.is_file():
        raise PredictError(f"input {path} does not exist")
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise PredictError(f"input {path}: expected a .nii/.nii.gz file or a DICOM series folder")
    try:
        image = nib.load(str(path))
    except Exception as exc:  # noqa: BLE001 - nibabel raises several types
        raise PredictError(f"cannot read NIfTI {path}: {exc}") from None
    shape = _check_3d(tuple(image.shape), path)
    try:
        voxels = np.asanyarray(image.dataobj)
    except Exception as exc:  # noqa: BLE001 - a truncated or corrupt file fails while read
        raise PredictError(f"cannot read the voxels of NIfTI {path}: {type(exc).__name__}: {exc}") from None
    check_finite_image(voxels, path)
    return CaseInput(case_name(path), path, np.asarray(image.affine), shape, None)


def guess_modality(case: CaseInput, requested: str = "auto", channel_names=None):
    """CT or MR: as requested, else the DICOM header, else CT if the image holds air in HU.

    A multi-channel case is normalised per channel by the names the sites agreed on (``channel_names``).
    """
    if case.channels:
        if channel_names:
            return tuple(channel_names)
        return (requested if requested in ("CT", "MR") else "MR",) * len(case.channels)
    if requested in ("CT", "MR"):
        return requested
    if case.modality in ("CT", "MR"):
        return case.modality
    data = np.asanyarray(nib.load(str(case.nifti)).dataobj)
    return "CT" if float(np.min(data)) < CT_AIR_THRESHOLD else "MR"


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------
def segmentation_preprocessing(loaded: LoadedModel, modality: str):
    """The task's evaluation chain, keeping MONAI metadata so the spatial steps can be inverted."""
    from monai.transforms import Compose, EnsureTyped

    from tasks.segmentation import preprocessing

    s = loaded.task.settings
    chain = [t for t in preprocessing(modality, s.spacing, s.ct_window, keys=("image",)) if not isinstance(t, EnsureTyped)]
    chain.append(EnsureTyped("image", dtype=torch.float32, track_meta=True))
    return Compose(chain)


def sliding_window_logits(loaded: LoadedModel, image: torch.Tensor) -> torch.Tensor:
    """The task's own sliding-window inference, on the device chosen for prediction."""
    return loaded.task.predict_logits(loaded.model, image, loaded.device)


@dataclass
class SegmentationResult:
    mask: np.ndarray  # uint8 on the input grid
    affine: np.ndarray  # the input's affine
    task_space_label: np.ndarray  # argmax at task spacing (RAS), before inversion
    modality: str


def predict_segmentation(loaded: LoadedModel, case: CaseInput, modality: str = "auto") -> SegmentationResult:
    """Label map on the input's grid (the spatial preprocessing inverted, nearest neighbour)."""
    from monai.transforms import Invertd

    modality = guess_modality(case, modality, _run_channel_names(loaded))
    pre = segmentation_preprocessing(loaded, modality)
    data = pre({"image": case.image_item})
    logits = sliding_window_logits(loaded, data["image"][None])
    if not bool(torch.isfinite(logits).all()):  # e.g. NaN running statistics in a FedBN site file
        raise PredictError(f"{case.name}: the model produced NaN or infinite scores (damaged weights in "
                           f"{loaded.site_state or loaded.model_path}?); no mask written")
    label = logits[0].argmax(dim=0, keepdim=True).to(torch.uint8).cpu()
    data["pred"] = label
    inverted = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True, to_tensor=True)(data)
    mask = np.asarray(inverted["pred"].detach().cpu().numpy()[0]).round().astype(np.uint8)
    if tuple(mask.shape) != case.shape:
        raise PredictError(f"internal error: inverted mask shape {mask.shape} != input shape {case.shape}")
    return SegmentationResult(mask, case.affine, label.numpy()[0], modality)


def predict_classification(
    loaded: LoadedModel, case: CaseInput, modality: str = "auto", class_names: list[str] | None = None
) -> dict[str, Any]:
    """Class probabilities from the classification task (its own inference transforms)."""
    task: Any = loaded.task
    modality = guess_modality(case, modality, _run_channel_names(loaded))
    if not hasattr(task, "predict_proba") or not hasattr(task, "inference_transform"):
        raise PredictError("the classification task offers no inference API (predict_proba/inference_transform)")
    image = task.inference_transform(modality)({"image": case.image_item})["image"]
    probs = task.predict_proba(loaded.model, image[None].to(loaded.device))[0].detach().cpu().numpy()
    if not np.all(np.isfinite(probs)):
        raise PredictError(f"{case.name}: the model produced non-finite probabilities (damaged weights?)")
    names = list(class_names or getattr(task, "class_names", None) or [f"class-{i}" for i in range(len(probs))])
    if len(names) != len(probs):
        raise PredictError(f"--class-names gives {len(names)} names but the model has {len(probs)} classes")
    return {
        "case": case.name,
        "modality": modality if isinstance(modality, str) else list(modality),
        "probabilities": {str(n): float(p) for n, p in zip(names, probs)},
        "predicted": str(names[int(np.argmax(probs))]),
        "run": loaded.run_dir.name,
        "model": loaded.model_path.name,
    }


def _run_channel_names(loaded: LoadedModel):
    from app.predict_channels import channel_names_of_run

    return channel_names_of_run(loaded.run_dir, loaded.run.in_channels)


def write_mask(path: Path, result: SegmentationResult) -> None:
    from data_prep.nifti_writer import write_nifti

    write_nifti(path, result.mask, result.affine, label=True)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _output_for(out: Path, case: CaseInput, task: str, single: bool) -> Path:
    suffixes = (".json",) if task == "classification" else NIFTI_SUFFIXES
    if single and out.name.endswith(suffixes):
        return out
    return out / (f"{case.name}_pred.json" if task == "classification" else f"{case.name}_seg.nii.gz")


def refuse_input_as_output(target: Path, inputs: list[Path]) -> None:
    """An output may never replace an input file or land inside an input DICOM folder (even with --force)."""
    resolved = target.resolve()
    for path in inputs:
        source = path.expanduser().resolve()
        if resolved == source or (source.is_dir() and source in resolved.parents):
            raise PredictError(f"output {target} would overwrite or write into the input {path}; "
                               "choose another --output")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedimaging predict",
        description="Apply a trained model (final_model.pt or a checkpoint) to NIfTI files or DICOM series folders.",
    )
    p.add_argument("--model", required=True, type=Path, help="runs/<run>/final_model.pt or checkpoints/best.pt")
    p.add_argument("--input", required=True, nargs="+", type=Path,
                   help="NIfTI file(s) or DICOM series folder(s); multi-channel models: <case>_0000.nii.gz "
                        "(other channels beside it) or a 4D NIfTI with the channels in the 4th dimension")
    p.add_argument("--output", required=True, type=Path,
                   help="output file (.nii.gz mask / .json) for one input, else a folder (<case>_seg.nii.gz / <case>_pred.json)")
    p.add_argument("--config", type=Path, help="run_config.json (default: the model's run directory)")
    p.add_argument("--site", help="FedBN: use this (simulated) site's normalisation layers")
    p.add_argument("--site-state", type=Path,
                   help="FedBN / --personal: the site's state-dir or a fedbn-round-*.pt / personal-round-*.pt file")
    p.add_argument("--personal", action="store_true",
                   help="use the site's personal model (personalization=finetune|ditto; with --site or --site-state)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when present")
    p.add_argument("--modality", choices=("auto", "CT", "MR"), default="auto",
                   help="intensity normalisation; auto = DICOM header, else CT if the image has values below -500")
    p.add_argument("--class-names", help="classification: comma-separated class names in label order "
                   "(e.g. the site dataset.json 'labels'); default class-0, class-1, ...")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _quiet_library_noise() -> None:
    """Hide MONAI's start-up notices that say nothing about the user's data (CLI only)."""
    import logging
    import warnings

    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="monai.utils.deprecate_utils")


def predict_main(argv: list[str] | None = None) -> int:
    """``fedimaging predict --model M --input IN [IN...] --output OUT``; 0 ok, 1 a case failed, 2 usage."""
    args = build_parser().parse_args(argv)
    _quiet_library_noise()
    try:
        loaded = load_model(args.model, args.config, args.site, args.site_state, args.device, args.personal)
    except PredictError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if loaded.run.strategy != "fedbn" and not args.personal and (args.site or args.site_state):
        print(f"note: --site/--site-state ignored: strategy {loaded.run.strategy} has no site-local layers", file=sys.stderr)
    single = len(args.input) == 1
    task = loaded.run.task
    from tqdm import tqdm

    failed = 0
    written: set[Path] = set()
    with tempfile.TemporaryDirectory(prefix="fedimaging-predict-") as tmp:
        bar = tqdm(args.input, desc="predict", unit="case", file=sys.stderr, disable=single or args.quiet)
        for path in bar:
            try:
                case = open_case(path.expanduser(), Path(tmp), loaded.run.in_channels)
                target = _output_for(args.output, case, task, single)
                refuse_input_as_output(target, args.input)
                if target in written:
                    raise PredictError(f"{path}: another input already wrote {target} (same case name)")
                if target.exists() and not args.force:
                    raise PredictError(f"{target} exists; pass --force to overwrite")
                if task == "classification":
                    names = [n.strip() for n in args.class_names.split(",")] if args.class_names else None
                    atomic_write_json(target, predict_classification(loaded, case, args.modality, names))
                else:
                    write_mask(target, predict_segmentation(loaded, case, args.modality))
                written.add(target)
                bar.write(f"{path} -> {target}", file=sys.stdout)
            except PredictError as exc:
                failed += 1
                bar.write(f"error: {exc}", file=sys.stderr)
            except Exception as exc:  # noqa: BLE001 - one bad case must not stop the others
                failed += 1
                bar.write(f"error: {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(predict_main())
