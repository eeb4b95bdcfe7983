"""Check the latency model against measurement: random plans, slimmed and timed end to end."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from ..apply import slim
from ..space import Plan, PruningSpace
from .build import LatencySettings, measure_models
from .model import LatencyModel
from .table import LatencyTable


@dataclass
class Validation:
    """Predicted against measured latency of random plans, for the table and the linear (HALP) model."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    dense_ms: float = 0.0
    scale: dict[str, float] = field(default_factory=dict)  # fitted table scale of each model
    noise_floor: float = 0.0  # median |A - A'| / A' over models measured twice in the same run

    def errors(self, model: str) -> list[float]:
        return [abs(r[model] - r["measured"]) / r["measured"] for r in self.rows]

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {"samples": len(self.rows), "dense_ms": self.dense_ms,
                                 "noise_floor_pct": 100 * self.noise_floor}
        for m in ("table", "linear"):
            e = self.errors(m)
            out[f"{m}_median_pct"] = 100 * statistics.median(e)
            out[f"{m}_mean_pct"] = 100 * statistics.fmean(e)
            out[f"{m}_max_pct"] = 100 * max(e)
        return out


def random_plans(space: PruningSpace, n: int, seed: int = 0, block_prob: float = 0.2) -> list[Plan]:
    """``n`` random plans: random widths per dimension, each removable block removed with ``block_prob``."""
    return [Plan.random(space, seed=seed + i, block_prob=block_prob) for i in range(n)]


def calibration_plans(space: PruningSpace, seed: int = 10_000, smallest: bool = False) -> list[Plan]:
    """Plans measured to calibrate a latency model: half width everywhere, and two random plans; with
    ``smallest``, the floor too (:meth:`Plan.smallest`), where budgets near it are asked for and a fit on the
    middle of the range would extrapolate to it (a detector, whose fixed part is a large share)."""
    return [Plan.uniform(space, 0.5), *random_plans(space, 2, seed=seed)] + ([Plan.smallest(space)] if smallest else [])


def validate(space: PruningSpace, table: LatencyTable, settings: LatencySettings, plans: list[Plan],
             progress: bool = True, calibrate_scale: bool = True) -> Validation:
    """Measure the dense model and every plan's slim model twice, interleaved, and compare with predictions.

    The table must already hold every point the model needs (see :func:`mdprune.latency.build`). Both latency
    models are calibrated on measurements of this same run: the dense model and the plans of
    :func:`calibration_plans` (seeds apart from the plans checked), never on the plans being checked.
    """
    references = calibration_plans(space)
    models = {("dense", 0): slim(space, Plan.identity())}
    models[("dense", 1)] = models[("dense", 0)]
    for i, p in enumerate(references):
        models[(f"ref{i}", 0)] = models[(f"ref{i}", 1)] = slim(space, p)
    for i, p in enumerate(plans):
        s = slim(space, p)
        models[(i, 0)] = s
        models[(i, 1)] = s
    measured = measure_models(models, space, settings, progress=progress)
    dense = min(measured[("dense", 0)].ms, measured[("dense", 1)].ms)
    table_model = LatencyModel(space, table, "table", settings.grid_points, settings.grid_points_3d)
    linear_model = LatencyModel(space, table, "linear", settings.grid_points, settings.grid_points_3d)
    refs = [(p, min(measured[(f"ref{i}", 0)].ms, measured[(f"ref{i}", 1)].ms)) for i, p in enumerate(references)]
    table_model.calibrate(dense, refs if calibrate_scale else None)
    linear_model.calibrate(dense, refs if calibrate_scale else None)
    pairs = []
    out = Validation(dense_ms=dense, scale={"table": table_model.scale, "linear": linear_model.scale})
    for key in ["dense", *[f"ref{i}" for i in range(len(references))], *range(len(plans))]:
        a, b = measured[(key, 0)].ms, measured[(key, 1)].ms
        pairs.append(abs(a - b) / min(a, b))
        if not isinstance(key, int):
            continue
        p = plans[key]
        out.rows.append({
            "plan": key, "removed_blocks": len(p.removed),
            "params": space.count_params(p.sizes(space), set(p.removed)),
            "measured": min(a, b), "table": table_model.predict_plan(p), "linear": linear_model.predict_plan(p),
            "noise": measured[(key, 0)].noise,
        })
    out.noise_floor = statistics.median(pairs)
    return out
