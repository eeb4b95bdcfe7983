"""Hold a solved plan to its budget on measured latency, not only on predicted latency.

The latency model is calibrated on the dense model and a few reference plans; a plan far from those (many
blocks removed, say) can still be mispredicted by several percent, and the solver, which seeks the plan with
the most importance the model says fits, leans towards plans the model is optimistic about. So after solving,
the slim model is measured beside the dense one. If it misses the budget's fraction of the dense latency by
more than the tolerance, the solver budget is corrected by the model's error on that plan and the problem is
solved again; if it leaves more than twice the tolerance unused because the model over-predicted it, the
budget is loosened the same way (more importance fits). A few rounds at most; the plan kept is the one with
the largest solver budget among those measured within the budget.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..apply import slim
from ..latency import LatencyModel, LatencySettings, Measurement, measure_models
from ..solve import InfeasibleBudget
from ..space import Plan, PruningSpace


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
    measure: Callable[[dict[str, nn.Module]], dict[str, Measurement]] | None = None,
) -> tuple[Plan, Any, list[dict[str, float]]]:
    """Solve at ``target_ms``, then re-solve at corrected budgets while the measured latency misses the target.

    Args:
        solve_at: solves the problem at a budget (ms), returning the plan and whatever the caller keeps.
        target_ms: the budget, in the time base of ``dense_ms`` (the calibration's dense measurement).
        rounds: re-solves allowed (0: solve once and only measure).
        tolerance: relative miss accepted (the timing noise of two end-to-end measurements). A plan measured
            more than ``2 * tolerance`` under the target, which the model over-predicted, is re-solved at a
            looser budget.
        measure: measures ``{"dense": ..., "pruned": ...}`` interleaved in one run (default:
            :func:`~mdprune.latency.measure_models` with ``settings``, whose backend may be a deterministic one).

    Returns:
        The plan kept, its ``solve_at`` result, and one record per measurement: the solver budget, the
        predicted latency, the measured latencies of the plan and of the dense model, the measured fraction
        against the target fraction, and ``kept`` (1.0 for the plan returned).
    """
    goal = target_ms / dense_ms
    aim = target_ms * (1 - tolerance)  # re-solves aim under the target by the tolerance: the next timing is noisy
    budget = target_ms
    plan, extra = solve_at(budget)
    checks: list[dict[str, float]] = []
    kept: tuple[float, Plan, Any, int] | None = None  # solver budget, plan, extra, check: the loosest that met
    over = float("inf")  # the tightest solver budget whose plan measured over
    rounds = max(rounds, 0)
    dense = slim(space, Plan())
    if measure is None:
        def measure(models: dict[str, nn.Module]) -> dict[str, Measurement]:
            return measure_models(models, space, settings)
    for r in range(rounds + 1):
        m = measure({"dense": dense, "pruned": slim(space, plan)})
        fraction = m["pruned"].ms / m["dense"].ms
        predicted = lm.predict_plan(plan)
        checks.append({"budget_ms": budget, "predicted_ms": predicted, "measured_ms": m["pruned"].ms,
                       "measured_dense_ms": m["dense"].ms, "fraction": fraction, "target_fraction": goal})
        met = fraction <= goal * (1 + tolerance)
        if met and (kept is None or budget > kept[0]):
            kept = (budget, plan, extra, len(checks) - 1)
        if not met:
            over = min(over, budget)
        # the model predicted `predicted` for what measures like fraction * dense_ms: scale the budget by that
        corrected = aim * predicted / (fraction * dense_ms)
        if r == rounds or (met and (fraction >= goal * (1 - 2 * tolerance) or corrected <= 1.005 * budget)):
            break  # within the budget, and either close to it or all the model's pessimism is used
        if met:  # looser, but below any budget already measured over
            nxt = min(max(corrected, 1.01 * budget), over if over == float("inf") else (budget + over) / 2)
        else:  # tighter, but above the loosest budget already measured within
            nxt = max(min(corrected, 0.99 * budget), (budget + kept[0]) / 2 if kept and kept[0] < budget else 0.0)
        if abs(nxt - budget) <= 0.005 * budget:
            break
        if log is not None:
            log(f"measured {100 * fraction:.1f}% of the dense latency, target {100 * goal:.1f}%: "
                f"re-solving at {nxt:.3f} ms (was {budget:.3f})")
        try:
            plan, extra = solve_at(nxt)
        except InfeasibleBudget as e:
            if log is not None:
                log(f"cannot tighten further ({e})" + ("" if kept else "; keeping the last plan"))
            break
        budget = nxt
    chosen = kept[3] if kept is not None else len(checks) - 1
    for i, c in enumerate(checks):
        c["kept"] = float(i == chosen)
    if kept is not None:
        return kept[1], kept[2], checks
    return plan, extra, checks
