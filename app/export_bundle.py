"""``fedimaging export RUN_DIR OUT_DIR``: a run's model as a self-contained MONAI bundle.

The bundle (``configs/metadata.json``, ``configs/inference.json``, ``models/model.pt``,
``docs/README.md``) needs only MONAI, PyTorch and nibabel: it runs with MONAI's own runner

    python -m monai.bundle run --config_file OUT_DIR/configs/inference.json \
        --bundle_root OUT_DIR --input_file case.nii.gz --output_dir predictions

(``pip install fire`` for that command line; ``monai.bundle.run(...)`` works without it) and
writes ``predictions/<case>_seg.nii.gz``, the same mask as ``fedimaging predict`` (same
transforms, sliding window and inversion onto the input grid; a test checks this). The
inference config is written from the run config; the model weights are a plain state dict
(loaded with ``weights_only=True``). Segmentation only for now.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import monai
import nibabel
import numpy as np
import torch

from app.predict_input import CT_AIR_THRESHOLD
from app.predict_model import LoadedModel, PredictError, load_model
from fedimaging.io import atomic_directory, atomic_path, atomic_write_json, atomic_write_text
from tasks.segmentation import mirror_flips
from tasks.transforms import RAS_LABELS

BUNDLE_VERSION = "0.1.0"
META_SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"


def _multichannel(loaded: LoadedModel) -> dict[str, Any]:
    """Config entries that differ for an N-channel model: a list of channel files, fixed normalisation.

    MONAI's own transforms normalise all channels alike, so a model mixing CT and MR channels is
    not exported (``fedimaging predict`` handles it).
    """
    from app.predict_channels import channel_names_of_run
    from tasks.channels import channel_kinds

    n = loaded.task.settings.in_channels
    names = channel_names_of_run(loaded.run_dir, n) or tuple(f"channel{c}" for c in range(n))
    kinds = set(channel_kinds(names))
    if len(kinds) > 1:
        raise PredictError(f"channels {list(names)} mix CT and MR: the bundle's MONAI transforms cannot "
                           "normalise them differently; use 'fedimaging predict'")
    return {"input_files": [], "datalist": "$[{'image': @input_files}]", "resolved_modality": kinds.pop(),
            "channel_names": list(names)}


def inference_config(loaded: LoadedModel) -> dict[str, Any]:
    """MONAI bundle config reproducing ``app.predict.predict_segmentation`` with plain MONAI objects.

    Multi-channel models take ``input_files`` (one file per channel) instead of ``input_file``.
    """
    s = loaded.task.settings
    num_classes = int(getattr(loaded.task, "num_classes"))
    strides = [2] * (len(s.channels) - 1)
    keys = "image"
    config = {
        "imports": ["$import numpy", "$import nibabel", "$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "input_file": "",
        "output_dir": "$@bundle_root + '/eval'",
        "output_postfix": "seg",
        "modality": "auto",
        "resolved_modality": (
            "$@modality if @modality in ('CT', 'MR') else ('CT' if float(numpy.min(numpy.asanyarray("
            f"nibabel.load(@input_file).dataobj))) < {CT_AIR_THRESHOLD} else 'MR')"
        ),
        "datalist": "$[{'image': @input_file}]",
        "network_def": {
            "_target_": "UNet",
            "spatial_dims": 3,
            "in_channels": s.in_channels,
            "out_channels": num_classes,
            "channels": list(s.channels),
            "strides": strides,
            "num_res_units": s.num_res_units,
            "norm": ["instance", {"affine": True}],
        },
        "network": "$@network_def.to(@device)",
        "checkpoint": "$@bundle_root + '/models/model.pt'",
        "intensity_ct": {
            "_target_": "ScaleIntensityRanged", "keys": keys, "a_min": float(s.ct_window[0]),
            "a_max": float(s.ct_window[1]), "b_min": 0.0, "b_max": 1.0, "clip": True,
        },
        "intensity_mr": {"_target_": "NormalizeIntensityd", "keys": keys, "nonzero": True, "channel_wise": True},
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": keys, "image_only": True},
                {"_target_": "EnsureChannelFirstd", "keys": keys},
                {"_target_": "Orientationd", "keys": keys, "axcodes": "RAS",
                 "labels": [list(pair) for pair in RAS_LABELS]},  # explicit: MONAI's default is changing
                {"_target_": "Spacingd", "keys": keys, "pixdim": list(s.spacing), "mode": "bilinear"},
                "$@intensity_ct if @resolved_modality == 'CT' else @intensity_mr",
                {"_target_": "EnsureTyped", "keys": keys, "dtype": "$torch.float32", "track_meta": True},
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "inferer": {
            "_target_": "SlidingWindowInferer", "roi_size": list(s.roi_size), "sw_batch_size": 4,
            "overlap": float(s.sw_overlap), "mode": "gaussian",
        },
        "infer": (
            "$torch.no_grad()(lambda d: dict(d, pred=@inferer(d['image'][None].to(@device), @network)[0]"
            ".argmax(dim=0, keepdim=True).to(torch.uint8).cpu()))"
        ),
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": keys,
                 "nearest_interp": True, "to_tensor": True},
                {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir",
                 "output_postfix": "@output_postfix", "output_ext": ".nii.gz", "output_dtype": "$numpy.uint8",
                 "resample": False, "separate_folder": False, "print_log": False},
            ],
        },
        "initialize": [
            "$@network.load_state_dict(torch.load(@checkpoint, map_location=@device, weights_only=True))",
            "$@network.eval()",
        ],
        "run": ["$[@postprocessing(@infer(d)) for d in @dataset]"],
    }
    if s.mirror_axes:
        config.update(_mirrored(s.mirror_axes))
    if s.in_channels > 1:
        config.update(_multichannel(loaded))
        config.pop("input_file")
    return config


def _mirrored(mirror_axes: tuple[int, ...]) -> dict[str, Any]:
    """Test-time mirroring as ``SegmentationTask.predict_logits`` does it: the argmax of the softmax
    summed over the image mirrored along every combination of ``mirror-axes``."""
    return {
        "mirror_flips": [list(flip) for flip in mirror_flips(mirror_axes)],
        "infer": (
            "$torch.no_grad()(lambda d: dict(d, pred=sum(torch.softmax(@inferer(d['image'][None].to(@device).flip(f), "
            "@network), dim=1).flip(f) for f in @mirror_flips)[0].argmax(dim=0, keepdim=True).to(torch.uint8).cpu()))"
        ),
    }


def metadata(loaded: LoadedModel, run_summary: dict[str, Any]) -> dict[str, Any]:
    """``configs/metadata.json`` in MONAI's bundle metadata format."""
    s = loaded.task.settings
    num_classes = int(getattr(loaded.task, "num_classes"))
    channel_def = {"0": "background", **{str(i): f"label-{i}" for i in range(1, num_classes)}}
    return {
        "schema": META_SCHEMA,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by fedimaging from run {loaded.run_dir.name}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"nibabel": nibabel.__version__},
        "name": f"fedimaging {loaded.run.task} ({loaded.run.strategy})",
        "task": f"3D {loaded.run.task} of CT/MR volumes, trained by federated learning",
        "description": (
            f"MONAI UNet trained with fedimaging ({loaded.run.strategy}, {run_summary.get('rounds', '?')} rounds, "
            f"{run_summary.get('sites', '?')} sites). Intensities: CT clipped to {list(s.ct_window)} HU and scaled "
            "to [0, 1]; MR z-scored over non-zero voxels. Resampled to RAS at the training spacing; the mask "
            "is written back on the input grid."
            + (f" Test-time mirroring: the softmax is averaged over the image mirrored along every combination "
               f"of RAS axes {list(s.mirror_axes)} (run config mirror-axes) before the argmax."
               if s.mirror_axes else "")
        ),
        "authors": "fedimaging",
        "copyright": "see the training sites' data agreements",
        "federated_run": run_summary,
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image", "format": "hounsfield|magnitude", "modality": "CT|MR",
                    "num_channels": s.in_channels,
                    "spatial_shape": list(s.roi_size), "dtype": "float32", "value_range": [],
                    "is_patch_data": True,
                    "channel_def": ({"0": "image"} if s.in_channels == 1 else
                                    {str(c): n for c, n in enumerate(_multichannel(loaded)["channel_names"])}),
                    "pixdim": list(s.spacing),
                }
            },
            "outputs": {
                "pred": {
                    "type": "image", "format": "segmentation", "num_channels": num_classes,
                    "spatial_shape": list(s.roi_size), "dtype": "float32", "value_range": [],
                    "is_patch_data": True, "channel_def": channel_def,
                }
            },
        },
    }


def _run_summary(loaded: LoadedModel) -> dict[str, Any]:
    """Run facts for the metadata: counts and the final metric, no site names or paths."""
    from strategies.run_dir import RunDirectory

    records = RunDirectory(loaded.run_dir).read_metrics() if loaded.run_dir.is_dir() else []
    sites = {name for r in records for name in (r.get("sites") or {})}
    rounds = max((int(r.get("round", 0)) for r in records), default=0)
    metric = loaded.task.best_metric
    final = [r for r in records if r.get("phase") == "evaluate" and metric in (r.get("aggregate") or {})]
    out: dict[str, Any] = {"strategy": loaded.run.strategy, "rounds": rounds, "sites": len(sites),
                           "model_file": loaded.model_path.name}
    if final:
        out[f"final_{metric}"] = final[-1]["aggregate"][metric]
    if loaded.site_state is not None:
        out["fedbn_site_layers"] = True
    return out


def _tta(mirror_axes: tuple[int, ...]) -> str:
    """The README's words for test-time mirroring (nothing when the run had none)."""
    if not mirror_axes:
        return ""
    return (f", the softmax averaged over the image mirrored along every combination of RAS axes "
            f"{list(mirror_axes)} ({len(mirror_flips(mirror_axes))} passes: the run's `mirror-axes`)")


def readme(loaded: LoadedModel, summary: dict[str, Any]) -> str:
    fedbn = (
        "\nThis is a FedBN model: the normalisation layers in `models/model.pt` are one site's own "
        "layers (chosen at export with `--site`/`--site-state`); use it at that site.\n"
        if loaded.site_state is not None else ""
    )
    n = loaded.task.settings.in_channels
    if n > 1:
        names = _multichannel(loaded)["channel_names"]
        fedbn += (f"\nThis model takes {n} channels {names}: pass `--input_files \"['c0.nii.gz', ...]\"` "
                  f"(one 3D file per channel, in that order) instead of `--input_file`.\n")
    return f"""# fedimaging {loaded.run.task} model (MONAI bundle)

Exported by `fedimaging export` from run `{loaded.run_dir.name}` (strategy {loaded.run.strategy},
{summary.get('rounds', '?')} rounds, {summary.get('sites', '?')} sites).
{fedbn}
## Run

```
pip install "monai=={monai.__version__}" nibabel fire
python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\
    --input_file /path/to/case.nii.gz --output_dir predictions
```

Overrides (`--key value`):

| key | default | meaning |
|---|---|---|
| `input_file` | (required) | a 3D NIfTI image |
| `output_dir` | `<bundle_root>/eval` | where `<case>_seg.nii.gz` is written |
| `bundle_root` | `.` | this folder (run from it or pass it) |
| `modality` | `auto` | `CT` (HU window) or `MR` (z-score); `auto`: CT if the image has values below {CT_AIR_THRESHOLD:g} |
| `device` | CUDA if present | e.g. `--device "$torch.device('cpu')"` |

From Python: `monai.bundle.run(config_file="configs/inference.json", bundle_root=".", input_file=..., output_dir=...)`.

## What it does

Load, channel-first, reorient to RAS, resample to {list(loaded.task.settings.spacing)} mm, normalise
intensities, sliding-window inference (ROI {list(loaded.task.settings.roi_size)}, Gaussian blending,
overlap {loaded.task.settings.sw_overlap}){_tta(loaded.task.settings.mirror_axes)}, argmax, then invert the reorientation and resampling with
nearest-neighbour interpolation: the uint8 label map has the input's shape and affine. This is exactly
what `fedimaging predict` does. A DICOM series must first be converted (`fedimaging prep`, or
`fedimaging predict`, which reads DICOM directly).

Label values: 0 background, 1..{int(getattr(loaded.task, 'num_classes')) - 1} the classes of the
training sites' `dataset.json` `labels`.
"""


def export_bundle(
    run_dir: str | Path, out_dir: str | Path, model: str = "final", site: str | None = None,
    site_state: str | Path | None = None, force: bool = False,
) -> Path:
    """Write the bundle folder atomically (built aside, renamed into place)."""
    run_dir = Path(run_dir).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().resolve()
    names = {"final": run_dir / "final_model.pt", "best": run_dir / "checkpoints" / "best.pt",
             "last": run_dir / "checkpoints" / "last.pt"}
    if model not in names:
        raise PredictError(f"--model must be one of {sorted(names)}, got {model!r}")
    loaded = load_model(names[model], run_dir / "run_config.json", site, site_state, device="cpu")
    if loaded.run.task != "segmentation":
        raise PredictError(f"export supports segmentation models; this run's task is {loaded.run.task!r}")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise PredictError(f"output folder {out_dir} is not empty; pass --force to replace it")
        shutil.rmtree(out_dir)
    elif out_dir.exists():
        out_dir.rmdir()
    summary = _run_summary(loaded)
    with atomic_directory(out_dir) as tmp:
        (tmp / "models").mkdir()
        with atomic_path(tmp / "models" / "model.pt") as target:
            torch.save({k: v.detach().cpu() for k, v in loaded.model.state_dict().items()}, target)
        atomic_write_json(tmp / "configs" / "inference.json", inference_config(loaded))
        atomic_write_json(tmp / "configs" / "metadata.json", metadata(loaded, summary))
        atomic_write_text(tmp / "docs" / "README.md", readme(loaded, summary))
    return out_dir


def export_main(argv: list[str] | None = None) -> int:
    """``fedimaging export RUN_DIR OUT_DIR [--model final|best|last] [--site S] [--force]``."""
    p = argparse.ArgumentParser(prog="fedimaging export", description="Export a run's model as a MONAI bundle.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--model", choices=("final", "best", "last"), default="final",
                   help="final_model.pt (default) or checkpoints/best.pt / last.pt")
    p.add_argument("--site", help="FedBN: export this (simulated) site's normalisation layers")
    p.add_argument("--site-state", type=Path, help="FedBN: the site's state-dir or a fedbn-round-*.pt file")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    args = p.parse_args(argv)
    try:
        out = export_bundle(args.run_dir, args.out_dir, args.model, args.site, args.site_state, args.force)
    except PredictError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"MONAI bundle: {out}")
    print(f"run it: python -m monai.bundle run --config_file {out}/configs/inference.json "
          f"--bundle_root {out} --input_file CASE.nii.gz --output_dir OUT")
    return 0


if __name__ == "__main__":
    sys.exit(export_main())
