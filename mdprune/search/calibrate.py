"""A latency model calibrated on this run's end-to-end measurements (the dense model and a few reference plans)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..apply import slim
from ..latency import (
    LatencyModel,
    LatencySettings,
    LatencyTable,
    RatioSettings,
    build,
    calibration_plans,
    measure_models,
    measure_models_ratio,
)
from ..space import Plan, PruningSpace

#: how each reference plan is timed against the dense model (a paired ratio: see :func:`reference_fractions`)
REFERENCE_RATIO = RatioSettings(tolerance=0.03, min_seconds=5.0, time_cap=10.0)


def reference_fractions(space: PruningSpace, settings: LatencySettings, plans: list[Plan],
                        timed: Callable[[nn.Module], nn.Module] | None = None) -> list[float]:
    """Each plan's latency as a fraction of the dense model's, timed alternately with it (a paired ratio).

    Measured separately, on a loaded machine a reference can come out as slow as the dense model: the fitted
    scale then collapses and the constant takes the latency (measured here, ``small_vit`` with one core busy: a
    plan predicted at 55% of dense measured 19.7%). ``timed`` turns a slim model into what is timed (for a
    detector: the whole detector running it)."""
    wrap = timed or (lambda m: m)
    dense = wrap(slim(space, Plan.identity()))
    return [measure_models_ratio(wrap(slim(space, p)), dense, space, settings, REFERENCE_RATIO).ratio for p in plans]


def calibrated_model(space: PruningSpace, table: LatencyTable, settings: LatencySettings, mode: str = "table",
                     references: bool = True, progress: bool = False) -> tuple[LatencyModel, dict[str, float]]:
    """Measure what ``table`` lacks, then calibrate the model's scale and constant on end-to-end measurements:
    the dense model's latency, and each reference plan's as a fraction of it (:func:`reference_fractions`).

    Returns the model and ``{"ms": dense latency, "noise": its spread}``, the reference every percentage budget
    of the run is taken of.
    """
    build(space, table, settings, progress=progress, calibrate=False)
    refs = calibration_plans(space) if references else []
    measured = measure_models({"dense": slim(space, Plan.identity())}, space, settings, progress=progress)
    dense_ms = measured["dense"].ms
    fractions = reference_fractions(space, settings, refs)
    lm = LatencyModel(space, table, mode, settings.grid_points, settings.grid_points_3d)
    lm.calibrate(dense_ms, [(p, f * dense_ms) for p, f in zip(refs, fractions, strict=True)])
    return lm, {"ms": dense_ms, "noise": measured["dense"].noise}
