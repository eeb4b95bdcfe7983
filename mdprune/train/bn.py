"""BatchNorm recalibration: re-estimate running statistics after slimming (pruned models are at chance before)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[Any], max_batches: int = 50,
                   device: str | torch.device | None = None) -> int:
    """Reset every BatchNorm's statistics and re-estimate them (cumulative average) on up to ``max_batches``.

    Returns the number of batches used (0 if the model has no BatchNorm).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    device = device or next(model.parameters()).device
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches seen
    was_training = model.training
    model.train()
    n = 0
    try:
        for batch in batches:
            if n >= max_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(device))
            n += 1
    finally:
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
        model.train(was_training)
    return n
