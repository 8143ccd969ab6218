"""``fedimaging predict``: apply a run's trained model to new cases at a site.

The model and its run settings come from :mod:`app.predict_model` (FedBN site layers, personal
models), the cases from :mod:`app.predict_input` (NIfTI, or a DICOM series converted by the same
code as ``fedimaging prep``). Segmentation writes a uint8 label map on the input's own grid: the
spatial preprocessing (RAS reorientation, resampling) is inverted with MONAI's ``Invertd`` using
nearest-neighbour interpolation, and the file gets the input's affine and shape. Classification
writes a JSON file with class probabilities (and ``warnings`` where the input cannot mean
anything to the model: an empty mask for ``shape-descriptors``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.predict_input import NIFTI_SUFFIXES, CaseInput, guess_modality, open_case
from app.predict_model import LoadedModel, PredictError, load_model
from fedimaging.io import atomic_write_json

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


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
    # a model may say why this input means nothing to it (shape-descriptors: an empty mask)
    warnings = loaded.model.input_warnings(image) if hasattr(loaded.model, "input_warnings") else []
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
        **({"warnings": warnings} if warnings else {}),
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
                    result = predict_classification(loaded, case, args.modality, names)
                    for warning in result.get("warnings", []):
                        bar.write(f"warning: {path}: {warning}", file=sys.stderr)
                    atomic_write_json(target, result)
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
