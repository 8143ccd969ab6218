"""Run and site configuration, parsed once at the edge into frozen dataclasses.

Run settings come from ``run_config`` (pyproject ``[tool.flwr.app.config]`` plus
``--run-config`` overrides), site settings from ``node_config`` (``--node-config`` of a
SuperNode, or ``partition-id`` in simulation). Tasks and strategies never see a Flower
``Context``. Every key is documented in the README; an unknown or malformed value raises
:class:`ConfigError` naming the key.

This module is the one definition of the run configuration: :class:`RunConfig` holds every key
with its default (pyproject's ``[tool.flwr.app.config]`` is tested equal to it), :func:`_validate`
is the one validation, and the strategies' settings are derived from it by field name
(:func:`strategy_settings`), never copied. Lists of names (tasks, strategies, central-DP modes,
learning-rate schedules) come from the package that implements them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config_values import ConfigError, axes, bool_value, finite, floats, ints, patterns
from fedimaging.home import demo_root, fedimaging_home, runs_root, site_state_root
from strategies import STRATEGY_NAMES, StrategySettings
from strategies.central_dp import CENTRAL_DP_MODES, CENTRAL_DP_STRATEGIES
from strategies.settings import LR_SCHEDULES
from tasks import CLASSIFIER_FEATURE_NORMS, CLASSIFIER_NORMS, CLASSIFIERS, TASK_NAMES
from tasks.base import TaskSettings
from tasks.training import OPTIMIZERS

PERSONALIZATIONS = ("none", "finetune", "ditto")


@dataclass(frozen=True)
class RunConfig:
    """The resolved run configuration (what ``run_config.json`` records)."""

    task: str = "segmentation"
    strategy: str = "fedavg"
    num_server_rounds: int = 30
    local_epochs: int = 2
    batch_size: int = TaskSettings.batch_size
    lr: float = TaskSettings.lr
    optimizer: str = TaskSettings.optimizer
    lr_schedule: str = "cosine"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_available_sites: int = 3
    min_train_sites: int = 1
    min_evaluate_sites: int = 1
    seed: int = 42
    run_name: str = ""
    run_dir: str = ""
    resume_from: str = ""
    home: str = ""
    proximal_mu: float = 0.0
    personalization: str = "none"
    ditto_lambda: float = 0.1
    finetune_epochs: int = 1
    init_from: str = ""
    freeze: tuple[str, ...] = ()  # parameters fixed at every site and kept out of replies (tasks.freeze)
    server_lr: float = 0.0
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    trim_fraction: float = 0.2
    max_update_norm: float = 0.0
    relative_update_norm: float = 0.0
    update_norm_action: str = "reject"
    cross_site_every: int = 0
    evaluate_every: int = 1  # global model's evaluate phase every N rounds and the last (0 = last only)
    evaluate_received: bool = False  # train replies carry the received model's test metrics (received-*)
    local_baselines: bool = False
    dp_required: bool = False
    dp_epsilon: float = 0.0
    dp_study_epsilon: float = 0.0
    dp_delta: float = 0.0
    dp_max_grad_norm: float = 1.0
    central_dp: str = "off"
    central_dp_noise_multiplier: float = 1.0
    central_dp_clipping_norm: float = 1.0
    central_dp_delta: float = 1e-5
    central_dp_sites: int = 0
    secure_aggregation: str = "off"
    he_public_context: str = ""
    demo: bool = True
    demo_sites: int = 3
    demo_size: str = "standard"
    demo_root: str = ""
    data_path_template: str = ""
    state_root: str = ""
    round_timeout_s: float = 86400.0
    best_metric: str = ""
    cross_site: bool = True
    tensorboard: bool = False
    torch_threads: int = 0
    spacing: tuple[float, float, float] = TaskSettings.spacing
    roi_size: tuple[int, int, int] = TaskSettings.roi_size
    crops_per_case: int = TaskSettings.crops_per_case
    mirror_axes: tuple[int, ...] = TaskSettings.mirror_axes
    channels: tuple[int, ...] = TaskSettings.channels
    num_res_units: int = TaskSettings.num_res_units
    ct_window: tuple[float, float] = TaskSettings.ct_window
    cache_max_mb: int = TaskSettings.cache_max_mb
    disk_cache_mb: int = 20480  # preprocessed cases on disk per site (tasks.cache); 0 = off
    in_channels: int = TaskSettings.in_channels
    classifier: str = TaskSettings.classifier
    classifier_width: float = TaskSettings.classifier_width
    classifier_norm: str = TaskSettings.classifier_norm
    classifier_feature_norm: str = TaskSettings.classifier_feature_norm
    classification_size: tuple[int, int, int] = TaskSettings.classification_size

    @property
    def home_path(self) -> Path:
        return fedimaging_home(self.home or None)

    @property
    def demo_root_path(self) -> Path:
        return Path(self.demo_root).expanduser().resolve() if self.demo_root else demo_root(self.home or None)

    @property
    def state_root_path(self) -> Path:
        return Path(self.state_root).expanduser().resolve() if self.state_root else site_state_root(self.home or None)

    def run_dir_path(self, default_name: str) -> Path:
        """Absolute run directory: ``run-dir``, else ``<home>/runs/<run-name or default_name>``."""
        if self.run_dir:
            return Path(self.run_dir).expanduser().resolve()
        return runs_root(self.home or None) / (self.run_name or default_name)

    @property
    def dp_enabled(self) -> bool:
        """A DP study: the model is built DP-compatible at the server and every site."""
        return self.dp_epsilon > 0 or self.dp_required

    @property
    def uses_demo(self) -> bool:
        """Simulation on the built-in demo federation (not a deployment, not own datasets)."""
        return self.demo and not self.data_path_template

    def task_settings(self) -> TaskSettings:
        return TaskSettings(
            spacing=self.spacing,
            roi_size=self.roi_size,
            batch_size=self.batch_size,
            lr=self.lr,
            optimizer=self.optimizer,
            # DP protects a case only if a case contributes one sample per step.
            crops_per_case=1 if self.dp_enabled else self.crops_per_case,
            mirror_axes=self.mirror_axes,
            ct_window=self.ct_window,
            channels=self.channels,
            num_res_units=self.num_res_units,
            cache_max_mb=self.cache_max_mb,
            in_channels=self.in_channels,
            classifier=self.classifier,
            classifier_width=self.classifier_width,
            classifier_norm=self.classifier_norm,
            classifier_feature_norm=self.classifier_feature_norm,
            classification_size=self.classification_size,
            # Central DP clips and noises every array: no BatchNorm statistics or integer counters.
            dp_compatible=self.dp_enabled or self.central_dp != "off",
            seed=self.seed,
            freeze=self.freeze,
        )

    def to_json(self) -> dict[str, Any]:
        """Kebab-case keys as in the run config, lists as lists."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name.replace("_", "-")] = list(value) if isinstance(value, tuple) else value
        return out


_LIST_PARSERS = {
    "spacing": lambda k, v: floats(k, v, 3),
    "roi_size": lambda k, v: ints(k, v, 3),
    "channels": lambda k, v: ints(k, v),
    "ct_window": lambda k, v: floats(k, v, 2),
    "classification_size": lambda k, v: ints(k, v, 3),
    "freeze": patterns,
    "mirror_axes": axes,
}


def parse_run_config(raw: Mapping[str, Any]) -> RunConfig:
    """Turn Flower's ``run_config`` into a :class:`RunConfig`, validating every value."""
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise ConfigError(f"unknown run config key '{key}' (see README 'Run configuration')")
        default = fields[name].default
        try:
            if name in _LIST_PARSERS:
                values[name] = _LIST_PARSERS[name](key, value)
            elif isinstance(default, bool):
                values[name] = bool_value(key, value)
            elif isinstance(default, int):
                number = finite(value)
                if number != int(number):
                    raise ValueError
                values[name] = int(number)
            elif isinstance(default, float):
                values[name] = finite(value)
            else:
                if not isinstance(value, (str, int, float)) or "\x00" in str(value):
                    raise TypeError
                values[name] = str(value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ConfigError(
                f"run config '{key}': cannot use {value!r} as a finite {type(default).__name__}") from exc
    config = RunConfig(**values)
    _validate(config)
    return config


def _validate(c: RunConfig) -> None:
    def one_of(names: tuple[str, ...]) -> str:
        return "one of " + ", ".join(repr(n) for n in names)

    checks = [
        (c.task in TASK_NAMES, "task", one_of(TASK_NAMES)),
        (c.strategy in STRATEGY_NAMES, "strategy", one_of(STRATEGY_NAMES)),
        (c.num_server_rounds >= 1, "num-server-rounds", ">= 1"),
        (c.local_epochs >= 1, "local-epochs", ">= 1"),
        (c.batch_size >= 1, "batch-size", ">= 1"),
        (c.lr > 0, "lr", "> 0"),
        (c.optimizer in OPTIMIZERS, "optimizer", one_of(OPTIMIZERS)),
        (c.lr_schedule in LR_SCHEDULES, "lr-schedule", one_of(LR_SCHEDULES)),
        (0 < c.fraction_train <= 1, "fraction-train", "in (0, 1]"),
        (0 <= c.fraction_evaluate <= 1, "fraction-evaluate", "in [0, 1]"),
        (c.min_available_sites >= 1, "min-available-sites", ">= 1"),
        (c.min_train_sites >= 1, "min-train-sites", ">= 1"),
        (c.min_evaluate_sites >= 0, "min-evaluate-sites", ">= 0"),
        (c.proximal_mu >= 0, "proximal-mu", ">= 0"),
        (c.personalization in PERSONALIZATIONS, "personalization", one_of(PERSONALIZATIONS)),
        (c.ditto_lambda >= 0, "ditto-lambda", ">= 0"),
        (c.finetune_epochs >= 1, "finetune-epochs", ">= 1"),
        (c.personalization == "none" or not c.dp_enabled, "personalization",
         "'none' in a DP study (a personal model trained without DP-SGD is not protected by the site's budget)"),
        (not c.freeze or c.central_dp == "off", "freeze",
         "empty under central-dp (Flower's clipping pairs every array of the model with the reply's)"),
        (c.server_lr >= 0, "server-lr", ">= 0 (0 = the strategy's default)"),
        (0 <= c.beta_1 < 1, "beta-1", "in [0, 1)"),
        (0 <= c.beta_2 < 1, "beta-2", "in [0, 1)"),
        (c.tau > 0, "tau", "> 0"),
        (0 <= c.trim_fraction < 0.5, "trim-fraction", "in [0, 0.5)"),
        (c.max_update_norm >= 0, "max-update-norm", ">= 0 (0 = off)"),
        (c.relative_update_norm >= 0, "relative-update-norm", ">= 0 (0 = off)"),
        (c.update_norm_action in ("reject", "clip"), "update-norm-action", "'reject' or 'clip'"),
        (c.cross_site_every >= 0, "cross-site-every", ">= 0 (0 = only at the end)"),
        (c.demo_size in ("standard", "small"), "demo-size", "'standard' or 'small'"),
        (1 <= c.demo_sites <= 4, "demo-sites", "between 1 and 4"),
        (c.dp_epsilon >= 0, "dp-epsilon", ">= 0 (0 = no DP)"),
        (c.dp_study_epsilon >= 0, "dp-study-epsilon", ">= 0 (0 = a quarter of each site's budget)"),
        (c.dp_delta == 0 or 0 < c.dp_delta < 1, "dp-delta", "in (0, 1) (0 = the site's default)"),
        (c.dp_max_grad_norm > 0, "dp-max-grad-norm", "> 0"),
        (c.central_dp in CENTRAL_DP_MODES, "central-dp", one_of(CENTRAL_DP_MODES)),
        (c.central_dp == "off" or c.strategy in CENTRAL_DP_STRATEGIES, "central-dp",
         f"'off' unless strategy is {' or '.join(CENTRAL_DP_STRATEGIES)} (its noise is calibrated for a plain mean)"),
        (c.central_dp == "off" or c.server_lr in (0.0, 1.0), "server-lr",
         "0 or 1 under central-dp (plain averaging)"),
        (c.central_dp_noise_multiplier > 0, "central-dp-noise-multiplier", "> 0"),
        (c.central_dp_clipping_norm > 0, "central-dp-clipping-norm", "> 0"),
        (0 < c.central_dp_delta < 1, "central-dp-delta", "in (0, 1)"),
        (c.central_dp_sites >= 0, "central-dp-sites", ">= 0 (0 = the sites sampled per round)"),
        (c.secure_aggregation in ("off", "he"), "secure-aggregation", "'off' or 'he'"),
        (c.round_timeout_s > 0, "round-timeout-s", "> 0"),
        (c.torch_threads >= 0, "torch-threads", ">= 0 (0 = all cores)"),
        (all(v > 0 for v in c.spacing), "spacing", "three numbers > 0 (mm)"),
        (all(v % 8 == 0 for v in c.roi_size), "roi-size", "three multiples of 8"),
        (c.crops_per_case >= 1, "crops-per-case", ">= 1"),
        (not c.mirror_axes or c.task == "segmentation", "mirror-axes",
         "empty unless task is 'segmentation' (mirroring is a segmentation augmentation here)"),
        (c.classifier in CLASSIFIERS, "classifier", f"one of {CLASSIFIERS}"),
        (c.classifier_width > 0 and (c.classifier.startswith("resnet") or c.classifier_width == 1.0),
         "classifier-width", "> 0 (a ResNet's channel multiplier; 1.0 for densenet121 and shape-descriptors)"),
        (c.classifier_norm in CLASSIFIER_NORMS, "classifier-norm", one_of(CLASSIFIER_NORMS)),
        (c.classifier_norm == "batch" or c.task == "classification", "classifier-norm",
         "'batch' unless task is 'classification' (the segmentation UNet uses instance norm)"),
        (c.classifier_feature_norm in CLASSIFIER_FEATURE_NORMS, "classifier-feature-norm",
         one_of(CLASSIFIER_FEATURE_NORMS)),
        (c.classifier_feature_norm == "none" or c.task == "classification", "classifier-feature-norm",
         "'none' unless task is 'classification'"),
        (c.evaluate_every >= 0, "evaluate-every", ">= 0 (0 = only after the last round)"),
        (c.disk_cache_mb >= 0, "disk-cache-mb", ">= 0 (0 = no preprocessed cache on disk)"),
        (c.in_channels >= 1, "in-channels", ">= 1 (the image channels of every site's dataset)"),
        (c.num_res_units >= 0, "num-res-units", ">= 0"),
        (c.cache_max_mb >= 0, "cache-max-mb", ">= 0"),
        (c.ct_window[0] < c.ct_window[1], "ct-window", "low,high with low < high"),
        (not c.run_name or (re.fullmatch(r"[A-Za-z0-9._-]+", c.run_name) is not None
                            and c.run_name.strip(".") != ""), "run-name",
         "letters, digits, '.', '_' and '-' only (not '.' or '..')"),
    ]
    for ok, key, expected in checks:
        if not ok:
            raise ConfigError(f"run config '{key}' must be {expected}, got {getattr(c, key.replace('-', '_'))!r}")
    if c.data_path_template and "{site}" not in c.data_path_template and "{partition}" not in c.data_path_template:
        raise ConfigError("run config 'data-path-template' must contain '{site}' or '{partition}'")
    if c.secure_aggregation != "off":
        from strategies.secure_aggregation import refusal  # local: tenseal only with secure aggregation

        if reason := refusal(c):
            raise ConfigError(reason)


# StrategySettings fields that are not run-config keys of the same name: derived below.
_DERIVED = {"min_available_sites", "min_train_sites", "min_evaluate_sites", "best_metric", "unseen_site"}


def strategy_settings(run: RunConfig, best_metric: str, min_sites: int) -> StrategySettings:
    """The strategies' view of the run config: every field of the same name, plus the derived ones.

    ``best_metric`` is the task's default when ``best-metric`` is unset; ``min_sites`` the sites
    the study waits for (all demo sites in a demo simulation).
    """
    fields = {f.name for f in dataclasses.fields(StrategySettings)}
    same = {name: getattr(run, name) for name in fields - _DERIVED}
    return StrategySettings(
        **same,
        min_available_sites=min_sites,
        min_train_sites=min(run.min_train_sites, min_sites),
        min_evaluate_sites=min(run.min_evaluate_sites, min_sites),
        best_metric=run.best_metric or best_metric,
        unseen_site=run.uses_demo and run.cross_site,
    )
