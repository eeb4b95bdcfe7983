"""Knowledge distillation from the dense model while the pruned one trains (soft targets with a temperature).

The loss is ``(1 - weight) * CE(student, labels) + weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))``
(Hinton et al.'s soft targets; the ``T^2`` keeps the soft term's gradient scale independent of ``T``). The teacher
runs in eval mode without gradients, on the same inputs as the student.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch."""
    if temperature <= 0:
        raise ValueError(f"the distillation temperature must be positive, got {temperature}")
    t = float(temperature)
    log_p = F.log_softmax(student.float() / t, dim=-1)
    log_q = F.log_softmax(teacher.float() / t, dim=-1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * t * t


@dataclass
class Distiller:
    """A loss for :func:`~mdprune.train.loop.train_epoch`: labels and the teacher's soft targets, mixed.

    Args:
        teacher: the dense model (put in eval mode, its parameters frozen).
        weight: share of the soft-target term, in [0, 1] (0: labels only).
        temperature: softmax temperature of both distributions.
        label_smoothing: of the hard-label term.
    """

    teacher: nn.Module
    weight: float = 0.5
    temperature: float = 4.0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"the distillation weight is a share in [0, 1], got {self.weight}")
        if self.temperature <= 0:
            raise ValueError(f"the distillation temperature must be positive, got {self.temperature}")
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def __call__(self, x: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        hard = F.cross_entropy(out, y, label_smoothing=self.label_smoothing)
        if self.weight == 0.0:
            return hard
        with torch.no_grad():
            soft_targets = self.teacher(x)
        return (1 - self.weight) * hard + self.weight * distillation_loss(out, soft_targets, self.temperature)
