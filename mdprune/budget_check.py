"""Hold a solved plan to its budget on measured latency, not only on predicted latency.

The latency model is calibrated on the dense model and a few reference plans; a plan far from those (many
blocks removed, say) can still be mispredicted by several percent, and the solver, which seeks the plan with
the most importance the model says fits, leans towards plans the model is optimistic about. So after solving,
the slim model is measured beside the dense one. If it misses the target's fraction of the dense latency by
more than the tolerance, the solver budget is tightened by the model's error on that plan and the problem is
solved again, a few rounds at most.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .apply import Plan, slim
from .latency import LatencyModel, LatencySettings, measure_models
from .solve import InfeasibleBudget
from .space import PruningSpace


def solve_within_measured_budget(
    space: PruningSpace,
    lm: LatencyModel,
    settings: LatencySettings,
    solve_at: Callable[[float], tuple[Plan, Any]],
    target_ms: float,
    dense_ms: float,
    rounds: int = 2,
    tolerance: float = 0.03,
    log: Callable[[str], None] | None = None,
) -> tuple[Plan, Any, list[dict[str, float]]]:
    """Solve at ``target_ms``, then re-solve with tighter budgets while the measured latency misses it.

    Args:
        solve_at: solves the problem at a budget (ms), returning the plan and whatever the caller keeps.
        target_ms: the budget, in the time base of ``dense_ms`` (the calibration's dense measurement).
        rounds: re-solves allowed (0: solve once and only measure).
        tolerance: relative miss accepted (the timing noise of two end-to-end measurements).

    Returns:
        The last plan, its ``solve_at`` result, and one record per measurement: the solver budget, the
        predicted latency, the measured latencies of the plan and of the dense model, and the measured
        fraction against the target fraction.
    """
    goal = target_ms / dense_ms
    budget = target_ms
    plan, extra = solve_at(budget)
    checks: list[dict[str, float]] = []
    rounds = max(rounds, 0)
    for r in range(rounds + 1):
        m = measure_models({"dense": slim(space, Plan()), "pruned": slim(space, plan)}, space, settings)
        fraction = m["pruned"].ms / m["dense"].ms
        predicted = lm.predict_plan(plan)
        checks.append({"budget_ms": budget, "predicted_ms": predicted, "measured_ms": m["pruned"].ms,
                       "measured_dense_ms": m["dense"].ms, "fraction": fraction, "target_fraction": goal})
        if fraction <= goal * (1 + tolerance) or r == rounds:
            break
        # the model predicted `predicted` for what measures like fraction * dense_ms: ask for that much less
        tighter = min(0.99 * budget, target_ms * predicted / (fraction * dense_ms))
        if log is not None:
            log(f"measured {100 * fraction:.1f}% of the dense latency, target {100 * goal:.1f}%: "
                f"re-solving at {tighter:.3f} ms (was {budget:.3f})")
        try:
            plan, extra = solve_at(tighter)
        except InfeasibleBudget as e:
            if log is not None:
                log(f"cannot tighten further ({e}); keeping the last plan")
            break
        budget = tighter
    return plan, extra, checks
