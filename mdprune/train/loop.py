"""Training and evaluation: optimizers and schedules users expect, masks held, AMP on CUDA, NaN detection."""

from __future__ import annotations

import math
import weakref
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
    distill: float = 0.0  # share of the dense model's soft targets in the loss (0: labels only; see distill.py)
    distill_temperature: float = 4.0


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


_SCALERS: weakref.WeakKeyDictionary[torch.optim.Optimizer, torch.amp.GradScaler] = weakref.WeakKeyDictionary()
SYNC_EVERY = 16  # on a GPU, iterations between host reads of the loss (each read waits for the GPU)


def grad_scaler(optimizer: torch.optim.Optimizer, device: torch.device) -> torch.amp.GradScaler:
    """The loss scaler of ``optimizer``'s fp16 mixed-precision training (one per optimizer, kept across epochs:
    without it fp16 gradients underflow to zero, and the importance read from them with them)."""
    scaler = _SCALERS.get(optimizer)
    if scaler is None:
        scaler = _SCALERS[optimizer] = torch.amp.GradScaler(device.type)
    return scaler


def overflowed(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """Whether the gradients of the last ``scaler.unscale_(optimizer)`` held an inf or NaN (that step is
    skipped by ``scaler.step``); reads the flags ``unscale_`` found."""
    try:
        found = scaler._found_inf_per_device(optimizer)  # noqa: SLF001 - the flags unscale_ already computed
        return any(bool(v.item()) for v in found.values())
    except (AttributeError, KeyError, RuntimeError):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        return not all(bool(torch.isfinite(x).all()) for x in grads)


def train_epoch(model: nn.Module, loader: Iterable[Any], optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, cfg: TrainConfig, device: torch.device,
                scaler: torch.amp.GradScaler | None = None,
                after_backward: Callable[[], None] | None = None,
                after_step: Callable[[int], bool] | None = None, progress: Callable[[int], None] | None = None,
                loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                ) -> dict[str, float]:
    """One epoch. ``after_backward()`` runs before each optimizer step (importance, gradient masks);
    ``after_step(i)`` after it (mask holding, pruning steps) and may return True to end the epoch early.
    ``loss_fn(x, out, y)`` replaces the cross-entropy (e.g. a :class:`~mdprune.train.distill.Distiller`).

    With ``cfg.amp`` on CUDA the forward runs under fp16 autocast and the loss is scaled (``scaler``, else the
    optimizer's own :func:`grad_scaler`); a step whose scaled gradients overflowed is skipped, and so is its
    ``after_backward`` (importance from inf/NaN gradients would poison every later score). A given ``scaler``
    is used on any device. The loss is read on the host every :data:`SYNC_EVERY` iterations on a GPU (every
    iteration on the CPU, and where the scaler reads its overflow flags anyway).
    """
    model.train()
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    amp = cfg.amp and device.type == "cuda"
    if amp and scaler is None:
        scaler = grad_scaler(optimizer, device)
    every = 1 if device.type != "cuda" or scaler is not None else SYNC_EVERY
    total = 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    finite = torch.ones((), dtype=torch.bool, device=device)
    first = 0  # first iteration not yet checked for a finite loss
    for i, (x, y) in enumerate(loader):
        if cfg.max_iterations is not None and i >= cfg.max_iterations:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=amp):
            out = model(x)
            loss = criterion(out, y) if loss_fn is None else loss_fn(x, out, y)
        finite &= torch.isfinite(loss.detach())
        if (i + 1 - first) >= every:
            _check_finite(finite, first, i)
            first = i + 1
        optimizer.zero_grad(set_to_none=True)
        skip = False
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            skip = overflowed(scaler, optimizer)
        else:
            loss.backward()
        if after_backward is not None and not skip:
            after_backward()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        n = y.shape[0]
        total += n
        loss_sum += loss.detach().double() * n
        correct += (out.detach().argmax(1) == y).sum()
        if progress is not None:
            progress(1)
        if after_step is not None and after_step(i):
            break
    _check_finite(finite, first, None)
    return {"loss": loss_sum.item() / max(total, 1), "accuracy": correct.item() / max(total, 1)}


def _check_finite(finite: torch.Tensor, first: int, last: int | None) -> None:
    if not bool(finite):
        where = f"iteration {first}" if last == first else f"iterations {first}-{last if last is not None else 'end'}"
        raise NaNLoss(f"loss is nan or infinite at {where}")


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Any], device: torch.device, max_batches: int | None = None
             ) -> dict[str, float]:
    """Top-1 accuracy and mean loss."""
    was = model.training
    model.eval()
    total = 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per batch
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        loss_sum += nn.functional.cross_entropy(out, y, reduction="sum").double()
        correct += (out.argmax(1) == y).sum()
        total += y.shape[0]
    model.train(was)
    return {"accuracy": correct.item() / max(total, 1), "loss": loss_sum.item() / max(total, 1), "samples": total}
