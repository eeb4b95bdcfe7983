"""Build latency tables: measure every missing (op, widths) point a model needs, resumably, within a time budget."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..apply import Plan, slim
from ..progress import progress_bar
from ..space import PruningSpace
from .backends import get_backend
from .model import LatencyModel
from .ops import ROLES, op_module
from .table import LatencyTable, default_cache_dir, fingerprint
from .timing import Measurement, TimingSettings, measure_many


@dataclass
class LatencySettings:
    """Where and how latency is measured. Everything here except the timing knobs is in the fingerprint."""

    device: str = "cpu"
    batch: int = 1
    threads: int = 1
    dtype: str = "float32"
    backend: str = "eager"
    grid_points: int = 16  # per role, ops with two roles (convolutions, linear layers): every width by default
    grid_points_3d: int = 5  # per role, attention (heads x q/k x v)
    chunk: int = 32  # points measured together (interleaved), then saved
    timing: TimingSettings = field(default_factory=TimingSettings)

    def __post_init__(self) -> None:
        self.timing.device = self.device
        self.timing.threads = self.threads

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def fingerprint(self) -> dict[str, Any]:
        return fingerprint(self.device, self.threads, self.torch_dtype, self.batch, self.backend)


@dataclass
class BuildReport:
    measured: int
    skipped: int  # already in the table
    remaining: int  # not measured (time budget)
    seconds: float
    path: Path | None


def open_table(settings: LatencySettings, cache_dir: str | Path | None = None) -> LatencyTable:
    """The cached table for ``settings``' fingerprint (created empty if absent)."""
    table = LatencyTable.open(cache_dir or default_cache_dir(), settings.fingerprint())
    table.timing = settings.timing.to_dict()
    return table


def model_key(space: PruningSpace) -> str:
    """Identifies a dense model for calibration: its name and the signature of its ops and input."""
    h = hashlib.sha1(json.dumps([space.input_shapes[0][1:], [(o.name, o.kind, str(o.fixed), o.widths(
        space.dense_sizes())) for o in space.ops]], default=str).encode()).hexdigest()[:12]
    name = (space.source or {}).get("name") or type(space.module).__name__
    return f"{name}@{h}"


def example_inputs(space: PruningSpace, settings: LatencySettings) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(settings.batch, *s[1:], device=settings.device, dtype=settings.torch_dtype)
                 for s in space.input_shapes)


def build(space: PruningSpace, table: LatencyTable, settings: LatencySettings, *, time_budget: float | None = None,
          progress: bool = True, calibrate: bool = True,
          on_point: Callable[[str, tuple[int, ...]], None] | None = None) -> BuildReport:
    """Measure what ``table`` lacks for ``space``: op points on the model's grids, and the dense model.

    Saves after every chunk, so an interrupted build resumes where it stopped and never re-measures a saved
    point. Stops starting new chunks once ``time_budget`` seconds have passed.
    """
    t0 = time.monotonic()
    lm = LatencyModel(space, table, grid_points=settings.grid_points, grid_points_3d=settings.grid_points_3d)
    needed = lm.needed()
    todo = lm.missing()
    skipped = len(needed) - len(todo)
    backend = get_backend(settings.backend, settings.threads)
    measured = 0
    with progress_bar(progress, len(todo), "measuring ops") as bar:
        for start in range(0, len(todo), settings.chunk):
            if time_budget is not None and time.monotonic() - t0 > time_budget:
                break
            chunk = todo[start:start + settings.chunk]
            runners = {}
            for op, p in chunk:
                module, inputs = op_module(op.kind, op.fixed, dict(zip(ROLES[op.kind], p, strict=True)),
                                           settings.batch, settings.device, settings.torch_dtype)
                runners[(id(op), p)] = backend.runner(module, inputs)
            results = measure_many(runners, settings.timing)
            for op, p in chunk:
                m = results[(id(op), p)]
                table.put(op, p, m.ms, m.noise)
            table.save()  # every completed measurement is on disk before anything else can stop us
            measured += len(chunk)
            bar(len(chunk))
            if on_point is not None:
                for op, p in chunk:
                    on_point(op.name, p)
    key = model_key(space)
    if calibrate and key not in table.models and measured == len(todo):
        m = measure_models({"dense": slim(space, Plan.identity())}, space, settings)["dense"]
        table.models[key] = {"ms": m.ms, "noise": m.noise}
        table.save()
    return BuildReport(measured, skipped, len(todo) - measured, time.monotonic() - t0, table.path)


def measure_models(models: dict[str, torch.nn.Module], space: PruningSpace, settings: LatencySettings,
                   progress: bool = False) -> dict[str, Measurement]:
    """End-to-end latency of several models of ``space``, measured interleaved in one run."""
    backend = get_backend(settings.backend, settings.threads)
    inputs = example_inputs(space, settings)
    runners = {k: backend.runner(m.to(settings.device, settings.torch_dtype).eval(), inputs)
               for k, m in models.items()}
    with progress_bar(progress, settings.timing.rounds, "measuring models") as bar:
        return measure_many(runners, settings.timing, on_round=lambda r: bar(1))


def latency_model(space: PruningSpace, table: LatencyTable, settings: LatencySettings, mode: str = "table"
                  ) -> LatencyModel:
    """A calibrated latency model of ``space`` (the table must hold the model's points and dense latency)."""
    lm = LatencyModel(space, table, mode, settings.grid_points, settings.grid_points_3d)
    dense = table.models.get(model_key(space))
    if dense is not None:
        lm.calibrate(dense["ms"])
    return lm
