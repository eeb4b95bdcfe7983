"""A latency model calibrated on this run's end-to-end measurements (the dense model and a few reference plans)."""

from __future__ import annotations

from ..apply import slim
from ..latency import LatencyModel, LatencySettings, LatencyTable, build, calibration_plans, measure_models
from ..space import Plan, PruningSpace


def calibrated_model(space: PruningSpace, table: LatencyTable, settings: LatencySettings, mode: str = "table",
                     references: bool = True, progress: bool = False) -> tuple[LatencyModel, dict[str, float]]:
    """Measure what ``table`` lacks, then calibrate the model's scale and constant on end-to-end measurements.

    Returns the model and ``{"ms": dense latency, "noise": its spread}``, the reference every percentage budget
    of the run is taken of.
    """
    build(space, table, settings, progress=progress, calibrate=False)
    refs = calibration_plans(space) if references else []
    models = {"dense": slim(space, Plan.identity())} | {f"ref{i}": slim(space, p) for i, p in enumerate(refs)}
    measured = measure_models(models, space, settings, progress=progress)
    lm = LatencyModel(space, table, mode, settings.grid_points, settings.grid_points_3d)
    lm.calibrate(measured["dense"].ms, [(p, measured[f"ref{i}"].ms) for i, p in enumerate(refs)])
    return lm, {"ms": measured["dense"].ms, "noise": measured["dense"].noise}
