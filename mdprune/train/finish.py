"""The end of a run: the final model measured beside the dense one, the result written (rank 0)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..apply import slim
from ..apply.io import save
from ..latency import measure_models_ratio
from ..space import Plan
from .loop import evaluate
from .result import RunResult

if TYPE_CHECKING:
    from .run import PruneRun

__all__ = ["finish"]


def finish(run: PruneRun, state: dict[str, Any]) -> RunResult | None:
    """Evaluate and measure the final model, save ``model.pt`` and ``result.json``; the result (rank 0 only)."""
    if not run.d.main:
        return None
    model, space, pruner = run.final_model, run.space, run.pruner
    plan = pruner.plan
    sizes, removed = plan.sizes(space), set(plan.removed)
    acc = evaluate(model, run.val_loader, run.d.device)
    # timed in alternating pairs with the dense model: the fraction and its interval, as the measured check does
    m = measure_models_ratio(model, slim(space, Plan()), space, run.settings)
    report = pruner.report()
    result = RunResult.from_report(
        report, model=run.cfg.model, schedule=run.cfg.schedule.kind,
        measured_dense_ms=m.b_ms, measured_ms=m.a_ms, measured_noise=(m.high - m.low) / (2 * m.ratio),
        speedup=1.0 / m.ratio, measured_fraction=m.ratio, measured_fraction_interval=[m.low, m.high],
        dense_accuracy=state["dense_accuracy"], pruned_accuracy=state.get("pruned_accuracy"),
        accuracy=acc["accuracy"],
        widths={d.name: [sizes[d.name], d.size, d.kind, d.block] for d in space.prunable_dims()},
        blocks={b.name: b.name not in removed for b in space.removable_blocks()},
        curve=state.get("curve", []), coverage=space.coverage(), budgets=pruner.budgets,
        latency_model={"mode": run.cfg.mode, "scale": report.latency_model["scale"],
                       "constant": report.latency_model["constant"]},
        fingerprint=run.settings.fingerprint(), finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    save(model.cpu(), run.dir.path / "model.pt")
    run.dir.write_json("result.json", result.to_dict())
    dense = f"{100 * result.dense_accuracy:.2f}%" if result.dense_accuracy is not None else "n/a"
    target = f"target {result.target_ms:.3f} ms" if result.target_ms is not None else "no latency target"
    run.log(f"done: {100 * result.accuracy:.2f}% accuracy (dense {dense}), {result.measured_ms:.3f} ms vs dense "
            f"{result.measured_dense_ms:.3f} ms measured ({100 * m.ratio:.1f}% of dense, 95% interval "
            f"{100 * m.low:.1f}-{100 * m.high:.1f}%; {result.speedup:.2f}x), {target}")
    return result
