"""Schedules, training and whole runs: the pruning step for any loop, one-shot and iterative pruning,
fine-tuning (with distillation from the dense model), data, DDP."""

from .bn import recalibrate_bn
from .config import RunConfig
from .data import builtin, image_folder, loader
from .distill import Distiller, distillation_loss
from .loop import NaNLoss, TrainConfig, evaluate, make_optimizer, make_scheduler, train_epoch
from .pruner import Pruner, plan_digest
from .result import PruneReport, RunResult
from .run import PruneRun
from .schedule import PruneSchedule, budget_path

__all__ = ["Distiller", "NaNLoss", "PruneReport", "PruneRun", "PruneSchedule", "Pruner", "RunConfig", "RunResult",
           "TrainConfig", "budget_path", "builtin", "distillation_loss", "evaluate", "image_folder", "loader",
           "make_optimizer", "make_scheduler", "plan_digest", "recalibrate_bn", "train_epoch"]
