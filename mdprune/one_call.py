"""One-shot latency-constrained pruning in one call: ``mdprune.prune(model, x, budget="50%", data=loader)``.

analyse -> measure latency tables (cached) and calibrate -> importance over N batches -> solve the MDP program
exactly -> slim -> measure. Fine-tuning is up to the caller (or ``mdprune prune`` on the command line).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .apply import slim
from .importance import estimate
from .latency import LatencySettings, LatencyTable, open_table
from .search import calibrated_model, check_budget, parse_budget, solve_plan, solve_within_measured_budget
from .space import Plan, PruningSpace, analyze


@dataclass
class PruneReport:
    """What was asked, what was predicted and what was measured."""

    target_ms: float
    predicted_ms: float
    dense_ms: float  # the dense model, measured with the calibration models (the budget's reference)
    measured_ms: float | None  # the slim model, measured interleaved with the dense one ...
    measured_dense_ms: float | None  # ... which measured this in that same run
    noise: float | None  # spread of the dense model's timing rounds (a noise figure)
    widths: dict[str, tuple[int, int]]  # dimension -> (kept, size)
    removed_blocks: list[str]
    solver: dict[str, Any]
    params: tuple[int, int]  # (dense, pruned)
    macs: tuple[int, int]
    latency_model: dict[str, Any]
    plan: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    checks: list[dict[str, float]] = field(default_factory=list)  # measured against the budget, per solve

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def measured_speedup(self) -> float | None:
        """Dense over pruned latency, both measured in the same run."""
        if self.measured_ms is None or self.measured_dense_ms is None:
            return None
        return self.measured_dense_ms / self.measured_ms

    def summary(self) -> str:
        m = (f"{self.measured_ms:.3f} ms measured (dense {self.measured_dense_ms:.3f} ms in the same run, "
             f"{self.measured_speedup:.2f}x)" if self.measured_ms is not None else "not measured")
        return (f"target {self.target_ms:.3f} ms (dense {self.dense_ms:.3f} ms), predicted "
                f"{self.predicted_ms:.3f} ms, {m}; params {self.params[1]:,} of {self.params[0]:,}; "
                f"{len(self.removed_blocks)} blocks removed; solver {self.solver['status']} "
                f"(gap {self.solver['gap']:.2e}, {self.solver['seconds']:.2f} s)")


def prune(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    budget: str | float = "50%",
    *,
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
    params: str | float | None = None,
    macs: str | float | None = None,
    min_blocks_kept: int = 0,
    time_limit: float = 60.0,
    calibrate_scale: bool = True,
    measure: bool = True,
    verify_rounds: int = 2,
    progress: bool = False,
) -> tuple[fx.GraphModule, PruneReport]:
    """Prune ``model`` to a latency ``budget`` on this device, in one shot.

    Args:
        model: the trained model (any torchvision/timm CNN or ViT, or your own traceable model).
        example_inputs: an input batch (sets spatial size / tokens; the latency batch is ``settings.batch``).
        budget: ``"50%"`` of the dense model's latency measured here, or milliseconds.
        data: ``(inputs, targets)`` batches for importance (``importance_batches`` of them); or give ``scores``.
        device: where importance is computed. Latency is measured on ``settings.device`` (default: ``device``).
        lut: latency table, table file or cache directory (default ``~/.cache/mdprune/lut``).
        ignored_layers, unsupported: modules to keep whole, and what to do with those mdprune cannot analyse
            (``"error"`` or ``"keep"``), as in :func:`mdprune.analyze`.
        mode: ``"table"`` (MDP's multi-dimensional tables) or ``"linear"`` (HALP's model; ablation).
        blocks: allow removing whole residual blocks (``False``: channels only; ablation).
        params, macs: optional extra budgets, ``"60%"`` of the dense count or an absolute count.
        time_limit: solver time limit in seconds (the best solution found and its gap are reported).
        measure: measure the slim model beside the dense one (needed for ``verify_rounds``).
        verify_rounds: re-solves allowed, with a tighter solver budget, while the slim model's measured
            latency misses the budget by more than 3% (see :mod:`mdprune.search.measured`).

    Returns:
        The slim model and a :class:`PruneReport`.

    Raises:
        InfeasibleBudget: the budget is below the smallest reachable latency (stated in the message).
    """
    check_budget(budget, "latency")  # before anything is measured
    for b, what in ((params, "parameters"), (macs, "MACs")):
        if b is not None:
            check_budget(b, what)
    t0 = time.monotonic()
    seconds: dict[str, float] = {}
    settings = settings or LatencySettings(device=str(torch.device(device)))
    if space is None:
        model.to(device)
        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        space = analyze(model, tuple(x.to(device) for x in inputs), steps=steps, ignored_layers=ignored_layers,
                        unsupported=unsupported)
    seconds["analyze"] = time.monotonic() - t0

    t = time.monotonic()
    table = open_table(settings, lut)
    lm, dense = calibrated_model(space, table, settings, mode, calibrate_scale, progress)
    seconds["latency"] = time.monotonic() - t

    t = time.monotonic()
    if scores is None:
        if data is None:
            raise ValueError("importance needs data=(inputs, targets) batches, or scores=")
        scores = estimate(space, space.module, data, loss_fn, importance_batches, device, progress=progress)
    seconds["importance"] = time.monotonic() - t

    t = time.monotonic()
    target = parse_budget(budget, dense["ms"])
    dense_params, dense_macs = space.count_params(), space.count_macs()

    params_budget = None if params is None else parse_budget(params, dense_params, "parameters")
    macs_budget = None if macs is None else parse_budget(macs, dense_macs, "MACs")

    def solve_at(ms: float) -> tuple[Plan, Any]:
        return solve_plan(space, scores, lm, ms, time_limit=time_limit, blocks=blocks,
                          min_blocks_kept=min_blocks_kept, params=params_budget, macs=macs_budget)

    measured = measured_dense = None
    checks: list[dict[str, float]] = []
    if measure:  # each plan's slim model measured interleaved with the dense one, in one run
        plan, solution, checks = solve_within_measured_budget(space, lm, settings, solve_at, target, dense["ms"],
                                                              rounds=verify_rounds)
        final = next(c for c in checks if c["kept"])
        measured, measured_dense = final["measured_ms"], final["measured_dense_ms"]
    else:
        plan, solution = solve_at(target)
    seconds["solve"] = time.monotonic() - t  # with the measurements of each solved plan
    pruned = slim(space, plan).to(device)
    sizes, removed = plan.sizes(space), set(plan.removed)
    report = PruneReport(
        target_ms=target, predicted_ms=lm.predict(sizes, removed), dense_ms=dense["ms"], measured_ms=measured,
        measured_dense_ms=measured_dense, noise=dense["noise"],
        widths={d.name: (sizes[d.name], d.size) for d in space.prunable_dims()},
        removed_blocks=sorted(removed),
        solver={"status": solution.status, "objective": solution.objective, "bound": solution.bound,
                "gap": solution.gap, "seconds": solution.seconds, "method": solution.method},
        params=(dense_params, space.count_params(sizes, removed)),
        macs=(dense_macs, space.count_macs(sizes, removed)),
        latency_model={"mode": mode, "scale": lm.scale, "constant": lm.constant, "blocks": blocks,
                       "fingerprint": table.fingerprint},
        plan=plan.to_dict(), seconds=seconds, checks=checks)
    return pruned, report
