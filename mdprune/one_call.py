"""One-shot pruning in one call: ``mdprune.prune(model, x, constraints={"latency": "50%"}, data=loader)``.

analyse -> measure latency tables (cached) and calibrate -> importance over N batches -> solve the MDP program
exactly -> slim -> measure. Fine-tuning is up to the caller (or ``mdprune prune`` on the command line).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .latency import LatencySettings, LatencyTable
from .search import Budget, read_constraints
from .space import PruningSpace
from .train.pruner import Pruner
from .train.result import PruneReport
from .train.schedule import PruneSchedule

__all__ = ["PruneReport", "prune"]


def prune(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    budget: Budget | None = None,
    *,
    constraints: Mapping[str, Budget] | None = None,
    data: Iterable[Any] | None = None,
    scores: Mapping[str, np.ndarray] | None = None,
    device: str | torch.device = "cpu",
    lut: str | Path | LatencyTable | None = None,
    settings: LatencySettings | None = None,
    space: PruningSpace | None = None,
    steps: Mapping[str, int] | None = None,
    ignored_layers: Iterable[str] = (),
    unsupported: str = "error",
    importance_batches: int = 32,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    mode: str = "table",
    blocks: bool = True,
    params: Budget | None = None,
    macs: Budget | None = None,
    importance: Any = None,
    min_blocks_kept: int = 0,
    time_limit: float = 60.0,
    calibrate_scale: bool = True,
    measure: bool = True,
    verify_rounds: int = 3,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
) -> tuple[fx.GraphModule, PruneReport]:
    """Prune ``model`` to constraints (a latency ``budget`` on this device, say), in one shot: one use of
    :class:`~mdprune.train.Pruner` (importance over ``importance_batches`` batches, one solve, the measured
    check, slim, report).

    Args:
        model: the trained model (any torchvision/timm CNN or ViT, or your own traceable model).
        example_inputs: an input batch (sets spatial size / tokens; the latency batch is ``settings.batch``).
        budget: the latency budget, ``"50%"`` of the dense model's latency measured here, or milliseconds
            (default ``"50%"`` unless ``constraints`` is given).
        constraints: ``{"latency": "50%", "params": "60%", "macs": "2G"}``, any subset (see ``Pruner``);
            ``budget``, ``params`` and ``macs`` join it.
        data: ``(inputs, targets)`` batches for importance (``importance_batches`` of them); or give ``scores``.
        device: where importance is computed. Latency is measured on ``settings.device`` (default: ``device``).
        lut: latency table, table file or cache directory (default ``~/.cache/mdprune/lut``).
        ignored_layers, unsupported: modules to keep whole, and what to do with those mdprune cannot analyse
            (``"error"`` or ``"keep"``), as in :func:`mdprune.analyze`.
        mode: ``"table"`` (MDP's multi-dimensional tables) or ``"linear"`` (HALP's model; ablation).
        blocks: allow removing whole residual blocks (``False``: channels only; ablation).
        params, macs: optional extra budgets, ``"60%"`` of the dense count or an absolute count (``"2G"``).
        importance: the importance criterion (see :class:`~mdprune.importance.ImportanceAccumulator`).
        time_limit: solver time limit in seconds (the best solution found and its gap are reported).
        measure: measure the slim model beside the dense one (needed for ``verify_rounds``).
        verify_rounds: re-solves allowed at a corrected solver budget while the slim model's measured
            fraction of the dense latency misses the budget significantly (see :mod:`mdprune.search.measured`).
        log: where the constraint table and the steps are written (default: printed).

    Returns:
        The slim model and a :class:`PruneReport`.

    Raises:
        InfeasibleBudget: a constraint is below the smallest value any plan reaches (stated in the message).
    """
    if constraints is None and budget is None:
        budget = "50%"  # the default latency budget, unless constraints say otherwise
    asked = read_constraints(constraints, budget=budget, params=params, macs=macs)  # before anything is measured
    if scores is None and data is None:
        raise ValueError("importance needs data=(inputs, targets) batches, or scores=")
    model.to(device)
    settings = settings or LatencySettings(device=str(torch.device(device)))
    pruner = Pruner(model, example_inputs, asked, settings=settings,
                    schedule=PruneSchedule("oneshot", importance_batches=importance_batches), importance=importance,
                    lut=lut, space=space, steps=steps, ignored_layers=ignored_layers, unsupported=unsupported,
                    mode=mode, blocks=blocks, min_blocks_kept=min_blocks_kept, time_limit=time_limit,
                    verify_rounds=verify_rounds, measure=measure, calibrate_scale=calibrate_scale,
                    log=log, progress=progress)
    t = time.monotonic()
    if scores is None:
        pruner.accumulate(data, loss_fn, importance_batches)
    pruner.seconds["importance"] = time.monotonic() - t
    return pruner.finish(scores=scores)

