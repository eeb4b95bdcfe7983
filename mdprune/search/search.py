"""The search at one set of constraints: the program built from a space, solved, and read back as a plan.

One object holds what every solve of a run shares (space, calibrated latency model, absolute targets, options),
so the one call, :class:`~mdprune.train.PruneRun` and a user's own loop solve the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..latency import LatencyModel
from ..solve import InfeasibleBudget, Solution, solve
from ..space import Plan, PruningSpace
from .constraints import ConstraintRow
from .program import build_problem, plan_from_solution, smallest_usage


@dataclass
class Search:
    """Solve the MDP program for ``space`` under ``targets`` (absolute: ``latency`` in ms, ``params``, ``macs``).

    Args:
        latency: the calibrated latency model (``mode="linear"``: HALP's model, frozen at the current widths).
        blocks: allow removing whole blocks (``False``: channels only).
        min_blocks_kept: keep at least this many removable blocks.
        time_limit: seconds per solve, model building included (the best plan found and its gap are kept).
        threads: HiGHS threads (1: deterministic and polite on a shared machine).
    """

    space: PruningSpace
    latency: LatencyModel
    targets: dict[str, float] = field(default_factory=dict)
    blocks: bool = True
    min_blocks_kept: int = 0
    time_limit: float = 60.0
    threads: int = 1
    asked: dict[str, str] = field(default_factory=dict)  # the constraints as written, for tables and reports

    def options(self) -> dict[str, Any]:
        """The program's options besides the latency budget."""
        return {"blocks": self.blocks, "params": self.targets.get("params"), "macs": self.targets.get("macs"),
                "min_blocks_kept": self.min_blocks_kept}

    def model_at(self, current: Plan | None) -> LatencyModel:
        """The latency model the program uses from ``current`` (frozen there in linear mode)."""
        if self.latency.mode != "linear":
            return self.latency
        return self.latency.frozen_at(current.sizes(self.space) if current else self.space.dense_sizes())

    def solve(self, scores: Mapping[str, np.ndarray], budget_ms: float | None = None,
              current: Plan | None = None) -> tuple[Plan, Solution]:
        """The best plan at ``budget_ms`` (default: the latency target; without one, only parameter and MAC
        budgets bind), growing nothing ``current`` pruned."""
        budget = budget_ms if budget_ms is not None else self.targets.get("latency", 1e30)
        problem = build_problem(self.space, scores, self.model_at(current), budget, current=current,
                                **self.options())
        sol = solve(problem, time_limit=self.time_limit, threads=self.threads)
        return plan_from_solution(self.space, sol, scores, current), sol

    def smallest(self, resource: str = "latency", current: Plan | None = None) -> float:
        """The smallest predicted latency, parameter or MAC count any plan reaches from ``current``."""
        return smallest_usage(self.space, self.model_at(current), resource, current=current,
                              blocks=self.blocks, min_blocks_kept=self.min_blocks_kept)

    def table(self, dense: Mapping[str, float]) -> list[ConstraintRow]:
        """One row per target: dense value, smallest reachable, target (see :func:`format_table`)."""
        return [ConstraintRow(name, self.asked.get(name, f"{value:g}"), dense[name], self.smallest(name), value)
                for name, value in self.targets.items()]

    def check(self, rows: list[ConstraintRow]) -> None:
        """Raise :class:`InfeasibleBudget` for the first constraint no plan can meet, stating its floor."""
        for r in rows:
            if not r.satisfiable:
                raise InfeasibleBudget(r.name, r.target, r.smallest, (
                    f"the {r.name} target {r.asked} is {r.target:.6g} {r.unit}, {100 * r.target / r.dense:.1f}% of "
                    f"the dense {r.dense:.6g} {r.unit}; the smallest reachable is {r.smallest:.6g} {r.unit}, "
                    f"{100 * r.smallest / r.dense:.1f}% of dense: raise it to at least that"))
