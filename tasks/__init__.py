"""Tasks: model, transforms, local training and evaluation. Never imports Flower."""

from __future__ import annotations

from tasks.base import LocalTrainingOptions, Task, TaskSettings, TrainResult

TASK_NAMES = ("segmentation", "classification")


def get_task(name: str, settings: TaskSettings) -> Task:
    """The task named by run config ``task``."""
    if name == "segmentation":
        from tasks.segmentation import SegmentationTask

        return SegmentationTask(settings)
    if name == "classification":
        from tasks.classification import ClassificationTask

        return ClassificationTask(settings)
    raise ValueError(f"task must be one of {TASK_NAMES}, got {name!r}")


__all__ = ["LocalTrainingOptions", "Task", "TaskSettings", "TrainResult", "get_task", "TASK_NAMES"]
