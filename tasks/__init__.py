"""Tasks: model, transforms, local training and evaluation. Never imports Flower."""

from __future__ import annotations

from tasks.base import LocalTrainingOptions, Task, TaskSettings, TrainResult, device
from tasks.data import SiteDataCache
from tasks.training import make_optimizer

TASK_NAMES = ("segmentation", "classification")
CLASSIFIERS = ("densenet121", "resnet10", "resnet18", "resnet34", "shape-descriptors")  # tasks.classification builds them
# "group": the network DP-SGD trains (Opacus' fix, BatchNorm -> GroupNorm), also without DP, so that a study
# without DP can be compared with a DP study on the same network
CLASSIFIER_NORMS = ("batch", "group")
# "layer": each case's pooled features standardised across its features before the linear head
# (tasks.classification.FeatureStandardisation), which DP-SGD on a fixed encoder needs
CLASSIFIER_FEATURE_NORMS = ("none", "layer")


def get_task(name: str, settings: TaskSettings) -> Task:
    """The task named by run config ``task``."""
    if name == "segmentation":
        from tasks.segmentation import SegmentationTask

        return SegmentationTask(settings)
    if name == "classification":
        from tasks.classification import ClassificationTask

        return ClassificationTask(settings)
    raise ValueError(f"task must be one of {TASK_NAMES}, got {name!r}")


# What the ClientApp uses: the task registry, its settings and options, the site data cache,
# the training device and the optimizer a DP session is built with.
__all__ = ["CLASSIFIER_FEATURE_NORMS", "CLASSIFIER_NORMS", "CLASSIFIERS", "LocalTrainingOptions", "SiteDataCache", "Task", "TaskSettings", "TrainResult", "TASK_NAMES",
           "device", "get_task", "make_optimizer"]
