"""Hold a solved plan to its budget on measured latency, deciding only on what the measurements can tell apart.

The latency model is calibrated on the dense model and a few reference plans; a plan far from those can still
be mispredicted by several percent. So after solving, the slim model is timed alternately with the dense model
in one run (:func:`mdprune.latency.measure_models_ratio`): its latency as a fraction of the dense latency
measured there, with a confidence interval, until the interval is narrower than the tolerance or a time cap
passes. Absolute milliseconds from different runs are never compared: a shared machine drifts 10-40% between
runs. Then, against the target fraction ``target_ms / dense_ms``:

- the interval lies wholly above the target (a significant miss): re-solve tighter;
- the interval lies wholly below ``target * (1 - tolerance)`` (room to loosen, significantly): re-solve looser;
- otherwise the plan is kept: the measurement cannot tell it from the target.

A correction scales the solver budget by the smallest model error (measured / predicted) the interval allows,
never by more than the model's error range seen on this model: the calibration's error (``error_range``; 10%
when unknown) or a larger error that a check of this call showed significantly (its interval's bound nearest the
target, so noise never enlarges it). So the solver budget stays within that range of the target, and a noisy
measurement cannot push the plan far from it; a model whose error grows as plans shrink is followed, one
significant check at a time. A re-solve that returns a plan measured already (the plan does not change over that
range of solver budgets) is not measured again: its measurement stands at the new budget, narrows the bracket,
and the solver is asked again, without using a round. The plan
kept is, among the plans whose interval is not wholly above the target (not significantly over), the one whose
measured fraction is nearest the target; if every plan is significantly over, the one measured smallest.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import nn

from ..apply import slim
from ..latency import LatencyModel, LatencySettings, Measurement
from ..latency.ratio import Ratio, RatioSettings, measure_models_ratio, measure_ratio
from ..solve import InfeasibleBudget
from ..space import Plan, PruningSpace

#: the model error range assumed when neither the caller nor the model gives one: the table model's error on
#: pruned end-to-end models measured on shared CPUs (median 4-8%, noise floor 6-9%; docs: latency notes)
DEFAULT_ERROR_RANGE = 0.10

#: re-solves in a row that may return a plan measured already (a plateau of the plan against the solver budget)
#: before the check gives up; they are not measured again and use no round
SAME_PLAN_SOLVES = 4

#: one line for reports: what the fractions of a measured check are
COMPARED = ("Measured / dense: each plan's slim model and the dense model timed alternately in the same run; the "
            "trimmed mean of the per-pair ratios with its 95% interval, not absolute ms from different runs.")


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
    *,
    ratio: RatioSettings | None = None,
    error_range: float | None = None,
    timed: Callable[[nn.Module], nn.Module] | None = None,
) -> tuple[Plan, Any, list[dict[str, Any]]]:
    """Solve at ``target_ms``, then re-solve at a corrected budget while the measured fraction of the dense
    latency misses ``target_ms / dense_ms`` significantly (see the module docstring).

    Args:
        solve_at: solves the problem at a budget (ms), returning the plan and whatever the caller keeps.
        target_ms: the budget, in the time base of ``dense_ms`` (the calibration's dense measurement).
        rounds: re-solves allowed (0: solve once and only measure).
        tolerance: relative miss accepted; the interval is narrowed to this width, and a plan is loosened only
            when its interval lies wholly below ``target * (1 - tolerance)``.
        measure: one interleaved measurement of ``{"dense": ..., "pruned": ...}`` per call (called repeatedly,
            one pair of the ratio each; default: :func:`~mdprune.latency.measure_models_ratio` with ``settings``).
        ratio: when to stop measuring a plan (default: :class:`~mdprune.latency.RatioSettings` at ``tolerance``).
        error_range: the model's relative error range on this model (the calibration's); default: the model's
            ``calibration_error`` if it has one, else :data:`DEFAULT_ERROR_RANGE`.
        timed: turns a slim model of ``space`` into what is timed (for a detector: the whole detector running
            it); the dense model goes through it too. Default: the slim model itself.

    Returns:
        The plan kept, its ``solve_at`` result, and one record per check: ``budget_ms`` (solver budget),
        ``predicted_ms``, ``measured_ms`` and ``measured_dense_ms`` (each side's own figure in the same run, see
        :class:`~mdprune.latency.Ratio`), ``fraction`` with ``fraction_low``/``fraction_high`` (its interval),
        ``target_fraction``, ``rounds`` (pairs), ``seconds``, ``converged``, ``significant`` (the interval
        excludes the target: over it, or wholly under ``target * (1 - tolerance)``), ``correction`` (next
        solver budget / this one; 1.0 when none followed), ``capped`` and ``kept``.
    """
    goal = target_ms / dense_ms
    rs = ratio or RatioSettings(tolerance=tolerance)
    limit = _error_range(lm, error_range)
    dense = slim(space, Plan())
    budget = target_ms
    plan, extra = solve_at(budget)
    found: list[tuple[Plan, Any]] = []
    checks: list[dict[str, Any]] = []
    over: dict[str, Any] | None = None  # the check at the tightest solver budget significantly over
    under: dict[str, Any] | None = None  # the check at the loosest solver budget significantly under
    for r in range(max(rounds, 0) + 1):
        m = _measure(space, settings, dense, plan, rs, measure, timed)
        predicted = lm.predict_plan(plan)
        side = _side(m.low, m.high, goal, tolerance)
        c = {"budget_ms": budget, "predicted_ms": predicted, "measured_ms": m.a_ms, "measured_dense_ms": m.b_ms,
             "fraction": m.ratio, "fraction_low": m.low, "fraction_high": m.high, "target_fraction": goal,
             "rounds": m.rounds, "seconds": m.seconds, "converged": m.converged, "significant": bool(side),
             "correction": 1.0, "capped": False}
        checks.append(c)
        found.append((plan, extra))
        _say(log, c, rs)
        if not side or r == max(rounds, 0):
            break
        solved = None
        for _ in range(SAME_PLAN_SOLVES + 1):  # re-solves that land on a plan measured already use no round
            if side == "over" and (over is None or budget < over["budget_ms"]):
                over = c
            if side == "under" and (under is None or budget > under["budget_ms"]):
                under = c
            cap = max([limit] + [_shown(x, dense_ms) for x in checks if x["significant"]])  # seen so far
            nxt, c["capped"] = _corrected(c, side, target_ms, dense_ms, budget, (under, over), cap)
            capped = f" (capped at the model's error range seen, ±{100 * cap:.1f}% of the target)" \
                if c["capped"] else ""
            if abs(nxt - budget) <= 0.005 * budget:
                if log is not None:
                    log(f"no correction beyond 0.5% of the solver budget{capped or ' (the model predicted it well)'}"
                        ": stopping")
                break
            if log is not None:
                log(f"re-solving at {nxt:.3f} ms (was {budget:.3f}){capped}")
            try:
                new_plan, new_extra = solve_at(nxt)
            except InfeasibleBudget as e:
                if log is not None:
                    log(f"cannot tighten further ({e})" + ("" if _admissible(checks) else "; keeping the last plan"))
                break
            c["correction"] = nxt / budget
            budget = nxt
            same = next((i for i, (p, _) in enumerate(found) if p == new_plan), None)
            if same is None:
                solved = new_plan, new_extra
                break
            # a plateau: the solver gave a plan measured already, whose measurement holds at this budget too
            c = {**checks[same], "budget_ms": budget}
            side = _side(c["fraction_low"], c["fraction_high"], goal, tolerance)
            if log is not None:
                log(f"the plan solved at {budget:.3f} ms is check {same + 1}'s ({100 * c['fraction']:.1f}% of dense): "
                    "not measured again")
            if not side:
                break
        if solved is None:
            break
        plan, extra = solved
    chosen = _choose(checks)
    for i, c in enumerate(checks):
        c["kept"] = float(i == chosen)
    return found[chosen][0], found[chosen][1], checks


def _side(low: float, high: float, goal: float, tolerance: float) -> str:
    """"over" when the interval lies wholly above the target fraction, "under" when wholly below
    ``goal * (1 - tolerance)``, else "" (not significant)."""
    return "over" if low > goal else "under" if high < goal * (1 - tolerance) else ""


def _measure(space: PruningSpace, settings: LatencySettings, dense: nn.Module, plan: Plan, rs: RatioSettings,
             measure: Callable[[dict[str, nn.Module]], dict[str, Measurement]] | None,
             timed: Callable[[nn.Module], nn.Module] | None = None) -> Ratio:
    pruned = slim(space, plan)
    if measure is None:
        wrap = timed or (lambda m: m)
        return measure_models_ratio(wrap(pruned), wrap(dense), space, settings, rs)
    models = {"dense": dense, "pruned": pruned}

    def pair(i: int) -> tuple[float, float]:
        m = measure(models)
        return m["pruned"].ms, m["dense"].ms
    return measure_ratio(pair, rs)


def _error_range(lm: LatencyModel, given: float | None) -> float:
    if given is not None:
        return float(given)
    seen = getattr(lm, "calibration_error", None)
    return DEFAULT_ERROR_RANGE if seen is None else max(float(seen), 0.01)


def _shown(c: dict[str, Any], dense_ms: float) -> float:
    """The smallest model error (relative, either way) that check ``c``'s interval shows."""
    near = c["fraction_low"] if c["fraction_low"] * dense_ms > c["predicted_ms"] else \
        min(c["fraction_high"], c["predicted_ms"] / dense_ms)
    e = near * dense_ms / c["predicted_ms"]
    return max(e, 1 / e) - 1


def _corrected(c: dict[str, Any], side: str, target_ms: float, dense_ms: float, budget: float,
               bracket: tuple[dict[str, Any] | None, dict[str, Any] | None], limit: float) -> tuple[float, bool]:
    """The next solver budget: the target divided by the smallest model error the interval allows (the interval
    bound nearest the target); once budgets both significantly under and over are known, the secant between
    them (measured fraction against solver budget) instead. Kept within ``limit`` of the target and inside the
    middle 80% of that bracket. Returns it and whether the limit capped it."""
    near = c["fraction_low"] if side == "over" else c["fraction_high"]
    error = near * dense_ms / c["predicted_ms"]  # measured / predicted
    wanted = target_ms / error
    if side == "under" and wanted <= 1.005 * budget:  # the model is not pessimistic: the widths step coarsely
        return budget, False
    wanted = min(wanted, 0.99 * budget) if side == "over" else max(wanted, 1.01 * budget)
    lo, hi = target_ms / (1 + limit), target_ms * (1 + limit)
    goal = c["target_fraction"]
    under, over = bracket
    if under is not None and over is not None and under["budget_ms"] < over["budget_ms"]:
        (bu, fu), (bo, fo) = ((x["budget_ms"], x["fraction"]) for x in (under, over))
        span = bo - bu
        wanted = bu + span * (goal - fu) / (fo - fu) if fo > fu else bu + span / 2
        wanted = min(max(wanted, bu + 0.1 * span), bo - 0.1 * span)
    nxt = min(max(wanted, lo), hi)
    return nxt, nxt != wanted and nxt in (lo, hi)


def _admissible(checks: list[dict[str, Any]]) -> list[int]:
    """Checks not significantly over the target (their interval reaches down to it)."""
    return [i for i, c in enumerate(checks) if c["fraction_low"] <= c["target_fraction"]]


def _choose(checks: list[dict[str, Any]]) -> int:
    ok = _admissible(checks)
    if not ok:
        return min(range(len(checks)), key=lambda i: checks[i]["fraction"])
    return min(ok, key=lambda i: (abs(math.log(checks[i]["fraction"] / checks[i]["target_fraction"])),
                                  checks[i]["fraction"]))


def _say(log: Callable[[str], None] | None, c: dict[str, Any], rs: RatioSettings) -> None:
    if log is None:
        return
    goal, f = c["target_fraction"], c["fraction"]
    verdict = ("significantly over the target" if c["fraction_low"] > goal else
               "significantly under the target" if c["significant"] else "not distinguishable from the target")
    log(f"measured {100 * f:.1f}% of the dense latency (same run; {100 * rs.confidence:.0f}% interval "
        f"{100 * c['fraction_low']:.1f}-{100 * c['fraction_high']:.1f}%, {c['rounds']} pairs in {c['seconds']:.1f} s"
        + ("" if c["converged"] else f"; time cap {rs.time_cap:.0f} s reached before the interval narrowed to "
           f"±{50 * rs.tolerance:.1f}%") + f"), target {100 * goal:.1f}%: {verdict}")
