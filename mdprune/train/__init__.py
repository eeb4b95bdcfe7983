"""Schedules, training and whole runs: one-shot and iterative pruning, fine-tuning, data, DDP."""

from .config import RunConfig
from .loop import NaNLoss, TrainConfig, evaluate, train_epoch
from .run import PruneRun
from .schedule import PruneSchedule, budget_path

__all__ = ["NaNLoss", "PruneRun", "PruneSchedule", "RunConfig", "TrainConfig", "budget_path", "evaluate",
           "train_epoch"]
