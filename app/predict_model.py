"""The trained model ``fedimaging predict`` applies, rebuilt from its run's own settings.

The model is rebuilt from the run's ``run_config.json`` (found beside ``final_model.pt``, or one
folder up for ``checkpoints/*.pt``; ``--config`` overrides), so prediction uses exactly the
transforms and sliding-window settings of the in-training evaluation. Weights are loaded
weights-only and refused when they hold NaN or infinite values.

FedBN: the normalisation layers never leave the sites, so ``final_model.pt`` holds the server's
untouched initial copy of them. Predicting with a FedBN model therefore needs one site's layers:
``--site NAME`` (simulation: ``<state-root>/<NAME>``) or ``--site-state PATH`` (the site's
``state-dir``, or one ``fedbn-round-*.pt`` file in it).

Personalization (``--personal``): a site's personal model (``personalization=finetune|ditto``)
never left the site; the same ``--site``/``--site-state`` find it there (the latest
``personal-round-*.pt``, a full weights-only state dict) and it replaces ``final_model.pt``'s weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from app.config import ConfigError, RunConfig, parse_run_config
from fedimaging.io import read_json_object
from fedimaging.weights import WeightsError, load_tensors
from tasks import Task, get_task


class PredictError(ValueError):
    """Bad model, config or input; the message names the file or option to fix."""


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
