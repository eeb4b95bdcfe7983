"""Build latency tables: measure every missing (op, widths) point a model needs, resumably, within a time budget."""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..apply import slim
from ..progress import progress_bar
from ..space import Op, Plan, PruningSpace
from .backends import Backend, backend_name, get_backend
from .loadwatch import LoadWatch
from .model import LatencyModel
from .ops import ROLES, op_module
from .table import LatencyTable, default_cache_dir, fingerprint, signature
from .timing import Measurement, TimingSettings


@dataclass
class LatencySettings:
    """Where and how latency is measured. Everything here except the timing knobs is in the fingerprint."""

    device: str = "cpu"
    batch: int = 1
    threads: int = 1
    dtype: str = "float32"
    backend: str | Backend = "eager"  # a name, or a Backend object (see mdprune.latency.backends)
    grid_points: int = 16  # per role, ops with two roles (convolutions, linear layers): every width by default
    grid_points_3d: int = 5  # per role, attention (heads x q/k x v)
    chunk: int = 32  # points measured together (interleaved), then saved
    recheck: int = 2  # times a suspect point may be measured again (0: never)
    max_noise: float = 0.25  # a point whose round medians spread more than this is suspect
    spike: float = 0.15  # tolerance of the trend check on grid neighbours (see :func:`suspects`)
    max_slowdown: float = 0.1  # a chunk whose load canary ran this much slower than its best is measured again
    timing: TimingSettings = field(default_factory=TimingSettings)

    def __post_init__(self) -> None:
        self.timing.device = self.device
        self.timing.threads = self.threads

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def fingerprint(self) -> dict[str, Any]:
        return fingerprint(self.device, self.threads, self.torch_dtype, self.batch, backend_name(self.backend))


@dataclass
class BuildReport:
    measured: int
    skipped: int  # already in the table
    remaining: int  # not measured (time budget)
    seconds: float
    path: Path | None
    rechecked: int = 0  # suspect points measured again (see :func:`suspects` and :class:`LoadWatch`)
    worst_slowdown: float = 0.0  # the load canary's largest slow-down against its best time in this build


def open_table(settings: LatencySettings, where: str | Path | LatencyTable | None = None) -> LatencyTable:
    """The latency table for ``settings``: ``where`` is a table object (used as is), a table file (``.json``;
    created empty if absent, refused if measured under another fingerprint), or a cache directory (default
    ``~/.cache/mdprune/lut``) holding one table per fingerprint."""
    if isinstance(where, LatencyTable):
        return where
    if where is not None and Path(where).suffix == ".json":
        path = Path(where)
        return LatencyTable.load(path, expect=settings.fingerprint()) if path.exists() else \
            LatencyTable(settings.fingerprint(), path)
    table = LatencyTable.open(where or default_cache_dir(), settings.fingerprint())
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
    point. Stops starting new chunks once ``time_budget`` seconds have passed. Once every point is in, suspect
    points are measured again, up to ``settings.recheck`` passes: chunks measured while the machine was busy
    (see :class:`LoadWatch`), noisy points and points off their neighbours' trend (see :func:`suspects`).
    """
    t0 = time.monotonic()
    lm = LatencyModel(space, table, grid_points=settings.grid_points, grid_points_3d=settings.grid_points_3d)
    needed = lm.needed()
    todo = lm.missing()
    skipped = len(needed) - len(todo)
    backend = get_backend(settings.backend, settings.threads)

    def out_of_time() -> bool:
        return time_budget is not None and time.monotonic() - t0 > time_budget

    watch = LoadWatch(backend, settings.batch, settings.device, settings.torch_dtype)
    with progress_bar(progress, len(todo), "measuring ops") as bar:
        measured = _measure_points(todo, table, settings, backend, watch, bar, out_of_time, on_point)
    rechecked = 0
    if measured == len(todo):
        for _ in range(settings.recheck):
            again = list({(signature(op), p): (op, p) for op, p in
                          watch.take_slow(settings.max_slowdown) + suspects(lm, table, settings)}.values())
            if not again or out_of_time():
                break
            with progress_bar(progress, len(again), "re-checking suspect points") as bar:
                rechecked += _measure_points(again, table, settings, backend, watch, bar, out_of_time)
    key = model_key(space)
    if calibrate and key not in table.models and measured == len(todo):
        m = measure_models({"dense": slim(space, Plan.identity())}, space, settings)["dense"]
        table.models[key] = {"ms": m.ms, "noise": m.noise}
        table.save()
    return BuildReport(measured, skipped, len(todo) - measured, time.monotonic() - t0, table.path, rechecked,
                       watch.worst_slowdown)


def _measure_points(points: list[tuple[Op, tuple[int, ...]]], table: LatencyTable, settings: LatencySettings,
                    backend: Backend, watch: LoadWatch, bar: Callable[[int], None], out_of_time: Callable[[], bool],
                    on_point: Callable[[str, tuple[int, ...]], None] | None = None) -> int:
    """Measure ``points`` chunk by chunk (interleaved within a chunk, with the load canary), saving after each;
    returns how many."""
    done = 0
    for start in range(0, len(points), settings.chunk):
        if out_of_time():
            break
        chunk = points[start:start + settings.chunk]
        runners = {}
        for op, p in chunk:
            module, inputs = op_module(op.kind, op.fixed, dict(zip(ROLES[op.kind], p, strict=True)),
                                       settings.batch, settings.device, settings.torch_dtype)
            runners[(id(op), p)] = backend.runner(module, inputs)
        watch.add_to(runners)
        results = backend.measure(runners, settings.timing)
        for op, p in chunk:
            m = results[(id(op), p)]
            table.put(op, p, m.ms, m.noise)
        watch.record(chunk, results)
        table.save()  # every completed measurement is on disk before anything else can stop us
        done += len(chunk)
        bar(len(chunk))
        if on_point is not None:
            for op, p in chunk:
                on_point(op.name, p)
    return done


def _breaks_trend(v: float, idx: tuple[int, ...], axes: list[list[int]],
                  value: Callable[[tuple[int, ...]], float | None], tol: float, power: int = 1) -> bool:
    """Slower than a wider neighbour, or slower than a narrower one scaled up in proportion to the width
    (more than ``tol`` either way): along each axis, latency should neither fall nor grow faster than width
    (to the ``power``: an axis that moves two roles at once, such as a depthwise convolution's, may grow as
    its square)."""
    for k, ax in enumerate(axes):
        w = ax[idx[k]]
        for j in (idx[k] - 1, idx[k] + 1):
            if not 0 <= j < len(ax):
                continue
            u = value(idx[:k] + (j,) + idx[k + 1:])
            if u is None:
                continue
            limit = u if ax[j] > w else u * (w / max(ax[j], 1)) ** power
            if v > (1 + tol) * limit:
                return True
    return False


def suspects(lm: LatencyModel, table: LatencyTable, settings: LatencySettings) -> list[tuple[Op, tuple[int, ...]]]:
    """Points worth measuring again: a noisy measurement, or one that breaks the trend of its grid neighbours.

    A slow-down the timer cannot see (a busy sibling hyperthread, a frequency drop) makes a point slower than
    its neighbours warrant; the solver would then steer around it. Re-measured points keep their fastest value, so a
    real step in the latency surface survives its re-check. Each point is re-checked ``settings.recheck``
    times at most, so a resumed build never repeats finished re-checks.
    """
    out, seen = [], set()
    for g in lm.grids:  # ops sharing a signature may have different grids: check each, each point once
        depthwise = g.op.kind == "conv2d" and g.op.fixed["depthwise"]
        axes = [[int(w) for w in a] for a in (g.axes[1:] if depthwise else g.axes)]

        def point(idx: tuple[int, ...], axes: list[list[int]] = axes, dw: bool = depthwise) -> tuple[int, ...]:
            p = tuple(axes[k][i] for k, i in enumerate(idx))
            return (p[0], p[0]) if dw else p

        for idx in itertools.product(*[range(len(a)) for a in axes]):
            p = point(idx)
            e = table.entry(g.sig, p)
            if (g.sig, p) in seen or e is None or e[2] > settings.recheck:
                continue
            value = lambda j, sig=g.sig, point=point: table.get(sig, point(j))  # noqa: E731
            if e[1] > settings.max_noise or _breaks_trend(e[0], idx, axes, value, settings.spike,
                                                         power=2 if depthwise else 1):
                seen.add((g.sig, p))
                out.append((g.op, p))
    return out


def measure_models(models: dict[str, torch.nn.Module], space: PruningSpace, settings: LatencySettings,
                   progress: bool = False) -> dict[str, Measurement]:
    """End-to-end latency of several models of ``space``, measured interleaved in one run."""
    backend = get_backend(settings.backend, settings.threads)
    inputs = example_inputs(space, settings)
    runners = {k: backend.runner(m.to(settings.device, settings.torch_dtype).eval(), inputs)
               for k, m in models.items()}
    with progress_bar(progress, settings.timing.rounds, "measuring models") as bar:
        return backend.measure(runners, settings.timing, on_round=lambda r: bar(1))


def latency_model(space: PruningSpace, table: LatencyTable, settings: LatencySettings, mode: str = "table"
                  ) -> LatencyModel:
    """A calibrated latency model of ``space`` (the table must hold the model's points and dense latency)."""
    lm = LatencyModel(space, table, mode, settings.grid_points, settings.grid_points_3d)
    dense = table.models.get(model_key(space))
    if dense is not None:
        lm.calibrate(dense["ms"])
    return lm
