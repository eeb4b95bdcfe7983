"""Training and evaluation: optimizers and schedules users expect, masks held, AMP on CUDA, NaN detection."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class NaNLoss(RuntimeError):
    """The loss became NaN or infinite; training stops and the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Optimisation recipe (shared by the pruning phase and fine-tuning)."""

    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"  # "sgd" (with momentum, nesterov) or "adamw"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    amp: bool = False  # mixed precision on CUDA (ignored on CPU)
    max_iterations: int | None = None  # per epoch, for quick runs
    seed: int = 0


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 or name.endswith(("cls_token", "pos_embed")) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise ValueError("optimizer is 'sgd' or 'adamw'")


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, iterations_per_epoch: int
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to zero over all iterations."""
    total = max(1, cfg.epochs * iterations_per_epoch)
    warm = int(cfg.warmup_epochs * iterations_per_epoch)

    def factor(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (i - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_epoch(model: nn.Module, loader: Iterable[Any], optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, cfg: TrainConfig, device: torch.device,
                scaler: torch.amp.GradScaler | None = None,
                after_backward: Callable[[], None] | None = None,
                after_step: Callable[[int], bool] | None = None, progress: Callable[[int], None] | None = None
                ) -> dict[str, float]:
    """One epoch. ``after_backward()`` runs before each optimizer step (importance, gradient masks);
    ``after_step(i)`` after it (mask holding, pruning steps) and may return True to end the epoch early."""
    model.train()
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    amp = cfg.amp and device.type == "cuda"
    total, correct, loss_sum = 0, 0, 0.0
    for i, (x, y) in enumerate(loader):
        if cfg.max_iterations is not None and i >= cfg.max_iterations:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=amp):
            out = model(x)
            loss = criterion(out, y)
        if not torch.isfinite(loss):
            raise NaNLoss(f"loss is {loss.item()} at iteration {i}")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and amp:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if after_backward is not None:
            after_backward()
        if scaler is not None and amp:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        n = y.shape[0]
        total += n
        loss_sum += loss.item() * n
        correct += (out.argmax(1) == y).sum().item()
        if progress is not None:
            progress(1)
        if after_step is not None and after_step(i):
            break
    return {"loss": loss_sum / max(total, 1), "accuracy": correct / max(total, 1)}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Any], device: torch.device, max_batches: int | None = None
             ) -> dict[str, float]:
    """Top-1 accuracy and mean loss."""
    was = model.training
    model.eval()
    total, correct, loss_sum = 0, 0, 0.0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss_sum += nn.functional.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        total += y.shape[0]
    model.train(was)
    return {"accuracy": correct / max(total, 1), "loss": loss_sum / max(total, 1), "samples": total}
