"""Build latency tables: measure every missing (op, widths) point a model needs, resumably, within a time budget.

Deployment settings (:class:`LatencySettings`: layout, precision as a cast or as autocast, cuDNN autotuning,
TF32) are applied identically to every op of a table, to the load canary and to end-to-end measurements
(:func:`prepare`, :func:`deployment`), and recorded in the table's fingerprint.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..apply import slim
from ..progress import progress_bar
from ..space import Op, Plan, PruningSpace
from .backends import Backend, backend_name, get_backend, require_cuda_provider
from .loadwatch import LoadWatch
from .model import LatencyModel, in_is_out
from .ops import ROLES, op_bytes, op_module
from .regimes import OFFDIAG, diagonal_points, regime_signature, without_flash
from .table import LatencyTable, default_cache_dir, fingerprint, signature
from .timing import Measurement, TimingSettings, cuda_flags, resolved_cuda_flags

PRECISIONS = ("float32", "float16", "bfloat16")


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
    # deployment (see the module docstring and README "GPU deployment settings"); all in the fingerprint
    channels_last: bool = False  # NHWC weights and 4-d inputs
    autocast: bool = False  # ``dtype`` through torch.autocast over float32 weights, instead of casting the model
    cudnn_benchmark: bool = True  # cuDNN autotunes each shape (CUDA)
    tf32: bool | None = None  # CUDA: True/False for matmuls and convolutions; None: PyTorch's defaults
    attention_regimes: bool | None = None  # measure attention off the q/k == v diagonal too (None: on)
    trend_recheck: bool | None = None  # re-measure points off their neighbours' trend (None: not on CUDA)
    memory_fraction: float = 0.5  # share of the free device memory a chunk of points may hold

    def __post_init__(self) -> None:
        self.timing.device = self.device
        self.timing.threads = self.threads
        if self.dtype not in PRECISIONS:
            raise ValueError(f"dtype {self.dtype!r}: choose one of {', '.join(PRECISIONS)}")
        if self.autocast and self.dtype == "float32":
            raise ValueError("autocast needs a half dtype to autocast to (dtype float16 or bfloat16)")
        if backend_name(self.backend) == "onnxruntime" and (self.autocast or self.channels_last):
            raise ValueError("the onnxruntime backend measures the exported graph as ONNX Runtime lays it out: "
                             "autocast and channels_last are eager PyTorch settings")
        if backend_name(self.backend) == "onnxruntime" and self.cuda:
            require_cuda_provider()  # never a "cuda" table timed on ONNX Runtime's CPU provider

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype weights and inputs are held in: ``dtype``, or float32 under autocast."""
        return torch.float32 if self.autocast else self.torch_dtype

    def deployment(self) -> dict[str, Any]:
        """The deployment settings as recorded in the fingerprint (cuDNN and TF32 switches resolved)."""
        d: dict[str, Any] = {"channels_last": self.channels_last, "autocast": self.autocast}
        if self.cuda:
            d.update(resolved_cuda_flags(self.cudnn_benchmark, self.tf32))
        return d

    def fingerprint(self) -> dict[str, Any]:
        return fingerprint(self.device, self.threads, self.torch_dtype, self.batch, backend_name(self.backend),
                           self.deployment())


class _Autocast(torch.nn.Module):
    """Runs a float32 module under ``torch.autocast`` to a half dtype (how AMP inference deploys)."""

    def __init__(self, module: torch.nn.Module, device_type: str, dtype: torch.dtype):
        super().__init__()
        self.module, self.device_type, self.dtype = module, device_type, dtype

    def forward(self, *args: Any) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.module(*args)


def prepare(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], settings: LatencySettings
            ) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """``module`` and ``inputs`` as deployed under ``settings``: on its device, cast (or wrapped in autocast),
    channels-last where asked. Changes ``module`` in place: pass a copy of anything the caller keeps."""
    module = module.to(settings.device, settings.weight_dtype).eval()
    inputs = tuple(x.to(settings.device, settings.weight_dtype) for x in inputs)
    if settings.channels_last:
        module = module.to(memory_format=torch.channels_last)
        inputs = tuple(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in inputs)
    if settings.autocast:
        module = _Autocast(module, torch.device(settings.device).type, settings.torch_dtype).eval()
    return module, inputs


@contextlib.contextmanager
def deployment(settings: LatencySettings) -> Iterator[None]:
    """cuDNN autotuning and TF32 set explicitly for a measurement on CUDA (restored after); nothing elsewhere."""
    if settings.cuda:
        with cuda_flags(settings.cudnn_benchmark, settings.tf32):
            yield
    else:
        yield


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
    """Random inputs of the model at the latency batch, drawn on the device, as deployed (dtype, layout)."""
    return random_inputs(space.input_shapes, settings)


def random_inputs(shapes: Sequence[Sequence[int]], settings: LatencySettings) -> tuple[torch.Tensor, ...]:
    """Random tensors of ``shapes`` with the latency batch in place of each first size, drawn on the device, as
    deployed (dtype, layout)."""
    x = tuple(torch.randn(settings.batch, *s[1:], device=settings.device, dtype=settings.weight_dtype)
              for s in shapes)
    return tuple(t.contiguous(memory_format=torch.channels_last) if settings.channels_last and t.dim() == 4 else t
                 for t in x)


def attention_regimes(settings: LatencySettings) -> bool:
    """Whether attention is measured off the q/k == v diagonal too: ``settings.attention_regimes``, on by
    default (PyTorch's fast kernel needs equal widths on CUDA and on the CPU alike: measured here, 6 heads,
    197 tokens, batch 1 on the CPU: 1.07 ms on the diagonal, 1.68-2.18 ms off it)."""
    return True if settings.attention_regimes is None else settings.attention_regimes


def offdiag_missing(lm: LatencyModel, table: LatencyTable) -> list[tuple[Op, tuple[int, ...]]]:
    """Diagonal points of attention grids not yet measured in the off-diagonal regime (one per signature)."""
    seen, out = set(), []
    for g in lm.grids:
        if g.op.kind != "attention" or len(g.axes) != 3:
            continue
        key = regime_signature(g.sig, OFFDIAG)
        for p in diagonal_points(g.axes):
            if (key, p) not in seen and table.get(key, p) is None:
                seen.add((key, p))
                out.append((g.op, p))
    return out


def free_memory(device: str) -> int | None:
    """Free memory (bytes) on ``device``: the CUDA allocator's view of the GPU, or the host's available RAM;
    None if unknown."""
    dev = torch.device(device)
    try:
        if dev.type == "cuda":
            return int(torch.cuda.mem_get_info(dev)[0])
        if dev.type == "cpu":
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, RuntimeError, ValueError):
        pass
    return None


def plan_chunks(points: list[tuple[Op, tuple[int, ...]]], settings: LatencySettings,
                free: int | None = None) -> list[list[tuple[Op, tuple[int, ...]]]]:
    """Split ``points`` into chunks measured together: at most ``settings.chunk`` each, and, where the free
    memory is known, no more than ``settings.memory_fraction`` of it held at once (every point's weights and
    inputs stay allocated through its chunk; one point's outputs exist at a time). A point whose size cannot be
    estimated, or that alone exceeds the share, is measured in a chunk of its own."""
    if free is None:
        free = free_memory(settings.device)
    if free is None:
        return [points[i:i + settings.chunk] for i in range(0, len(points), settings.chunk)]
    budget = settings.memory_fraction * free
    chunks: list[list[tuple[Op, tuple[int, ...]]]] = []
    cur: list[tuple[Op, tuple[int, ...]]] = []
    held = running = 0
    for op, p in points:
        h, r = op_bytes(op.kind, op.fixed, dict(zip(ROLES[op.kind], p, strict=True)), settings.batch,
                        settings.weight_dtype)
        alone = h < 0 or h + r > budget
        if cur and (alone or len(cur) >= settings.chunk or held + h + max(running, r) > budget):
            chunks.append(cur)
            cur, held, running = [], 0, 0
        cur.append((op, p))
        held, running = held + max(h, 0), max(running, r)
        if alone:
            chunks.append(cur)
            cur, held, running = [], 0, 0
    if cur:
        chunks.append(cur)
    return chunks


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
    backend = get_backend(settings.backend, settings.threads, settings.device)

    def out_of_time() -> bool:
        return time_budget is not None and time.monotonic() - t0 > time_budget

    watch = LoadWatch(backend, settings.batch, settings.device, settings.weight_dtype,
                      prepare=lambda m, x: prepare(m, x, settings))
    offdiag = offdiag_missing(lm, table) if attention_regimes(settings) else []
    todo_all = len(todo) + len(offdiag)
    with progress_bar(progress, todo_all, "measuring ops") as bar:
        measured = _measure_points(todo, table, settings, backend, watch, bar, out_of_time, on_point)
        if measured == len(todo) and offdiag:
            measured += _measure_points(offdiag, table, settings, backend, watch, bar, out_of_time, on_point,
                                        regime=OFFDIAG)
    todo = todo + offdiag
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
                    on_point: Callable[[str, tuple[int, ...]], None] | None = None, regime: str | None = None) -> int:
    """Measure ``points`` chunk by chunk (interleaved within a chunk, with the load canary; chunks sized to the
    free memory, see :func:`plan_chunks`), saving after each; returns how many. ``regime`` (``OFFDIAG``):
    attention measured with the fast kernel excluded, stored under its own key."""
    done = 0
    for chunk in plan_chunks(points, settings):
        if out_of_time():
            break
        runners: dict[Any, Any] = {}
        with deployment(settings), (without_flash() if regime == OFFDIAG else contextlib.nullcontext()):
            for op, p in chunk:
                module, inputs = op_module(op.kind, op.fixed, dict(zip(ROLES[op.kind], p, strict=True)),
                                           settings.batch, settings.device, settings.weight_dtype)
                runners[(id(op), p)] = backend.runner(*prepare(module, inputs, settings))
            watch.add_to(runners)
            results = backend.measure(runners, settings.timing)
        del runners  # free the chunk's weights and inputs before the next one is built
        for op, p in chunk:
            m = results[(id(op), p)]
            table.put(op, p, m.ms, m.noise, regime)
        if regime is None:  # off-diagonal chunks are not re-checked by canary (see suspects for their noise)
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

    On CUDA the trend check is off by default (``settings.trend_recheck``): CUDA events are not disturbed by
    descheduling, and a GPU's latency really does step with its tiles (a wider point faster than a narrower
    one), so re-measuring such points finds the same values again.
    """
    trend = not settings.cuda if settings.trend_recheck is None else settings.trend_recheck
    out, seen = [], set()
    for g in lm.grids:  # ops sharing a signature may have different grids: check each, each point once
        depthwise = in_is_out(g.op)
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
            if e[1] > settings.max_noise or trend and _breaks_trend(e[0], idx, axes, value, settings.spike,
                                                                   power=2 if depthwise else 1):
                seen.add((g.sig, p))
                out.append((g.op, p))
    return out


def measure_models(models: dict[str, torch.nn.Module], space: PruningSpace, settings: LatencySettings,
                   progress: bool = False) -> dict[str, Measurement]:
    """End-to-end latency of several models of ``space``, measured interleaved in one run, deployed as the
    table's ops are (see :func:`prepare`). Measures copies: the callers' models keep their device, dtype,
    layout and mode. A model given under several keys is copied once."""
    backend = get_backend(settings.backend, settings.threads, settings.device)
    inputs = example_inputs(space, settings)
    copies: dict[int, Any] = {}
    with deployment(settings):
        runners = {}
        for k, m in models.items():
            if id(m) not in copies:
                copies[id(m)] = backend.runner(prepare(copy.deepcopy(m), (), settings)[0], inputs)
            runners[k] = copies[id(m)]
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
