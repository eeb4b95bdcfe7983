"""Robust latency measurement on busy machines (CPU) and GPUs (CUDA events).

Measured on shared CPUs: a multi-threaded op slows 5-20x while another process takes a core, single calls
spread 5-19%, and load drifts over minutes. So every measurement here
- warms up (first calls are 1.5-7x slower),
- times samples of enough back-to-back calls to dwarf timer overhead,
- drops samples whose CPU time is well below their wall time (the thread was descheduled) and re-takes them,
- runs in rounds, interleaved in a fresh random order across everything measured together,
- reports the minimum over rounds of the per-round median, with the spread of round medians as its noise.

On a GPU, samples are timed by CUDA events on the measured device's current stream (``cuda:1`` is timed on
``cuda:1``, whichever device is current), synchronising that device only.
"""

from __future__ import annotations

import contextlib
import math
import random
import statistics
import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TimingSettings:
    """How to measure. ``threads`` applies to CPU measurement (recorded in the table's fingerprint)."""

    device: str = "cpu"
    threads: int = 1
    warmup: int = 3
    reps: int = 5  # timed samples per round
    rounds: int = 3  # rounds, interleaved across all callables measured together
    min_sample_ms: float = 1.0  # a sample repeats the call until it lasts about this long
    min_busy: float = 0.97  # keep a CPU sample if cpu_time / wall_time >= min_busy (x threads, at 0.9 each)
    max_retakes: int = 5  # extra samples allowed per round when samples are dropped
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Measurement:
    """Latency of one callable in milliseconds: min over rounds of the round medians."""

    ms: float
    noise: float  # (max - min) / min over round medians
    rounds: list[float] = field(default_factory=list)
    dropped: int = 0  # samples dropped as descheduled


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads, restoring the previous count after."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class Timer:
    """Times one callable: samples of ``inner`` back-to-back calls, descheduled samples dropped."""

    def __init__(self, settings: TimingSettings):
        self.s = settings
        self.device = torch.device(settings.device)
        self.cuda = self.device.type == "cuda"
        self._cpu_clock = time.thread_time_ns if settings.threads == 1 else time.process_time_ns
        self._busy = settings.min_busy if settings.threads == 1 else 0.9 * settings.threads

    def sample(self, fn: Callable[[], Any], inner: int) -> tuple[float, bool]:
        """One sample: milliseconds per call, and whether it ran undisturbed."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            stream = torch.cuda.current_stream(self.device)
            torch.cuda.synchronize(self.device)
            start.record(stream)
            for _ in range(inner):
                fn()
            end.record(stream)
            torch.cuda.synchronize(self.device)
            return start.elapsed_time(end) / inner, True
        c0, w0 = self._cpu_clock(), time.perf_counter_ns()
        for _ in range(inner):
            fn()
        w1, c1 = time.perf_counter_ns(), self._cpu_clock()
        wall = max(w1 - w0, 1)
        return wall / 1e6 / inner, (c1 - c0) / wall >= self._busy

    def calibrate(self, fn: Callable[[], Any]) -> int:
        """Warm up and choose how many calls make one sample."""
        for _ in range(self.s.warmup):
            fn()
        ms, _ = self.sample(fn, 1)
        return max(1, min(1000, math.ceil(self.s.min_sample_ms / max(ms, 1e-4))))

    def round(self, fn: Callable[[], Any], inner: int) -> tuple[float, int]:
        """Median of ``reps`` undisturbed samples (retaking dropped ones), and how many were dropped."""
        kept: list[float] = []
        seen: list[float] = []
        while len(kept) < self.s.reps and len(seen) < self.s.reps + self.s.max_retakes:
            ms, ok = self.sample(fn, inner)
            seen.append(ms)
            if ok:
                kept.append(ms)
        # never undisturbed: keep the best sample seen; the dropped count flags it
        return statistics.median(kept) if kept else min(seen), len(seen) - len(kept)


def measure_many(fns: Mapping[Hashable, Callable[[], Any]], settings: TimingSettings,
                 on_round: Callable[[int], None] | None = None) -> dict[Hashable, Measurement]:
    """Measure several callables together, rounds interleaved in random order (A B C, C A B, ...)."""
    timer = Timer(settings)
    rng = random.Random(settings.seed)
    keys = list(fns)
    with _device_scope(settings):
        inner = {k: timer.calibrate(fns[k]) for k in keys}
        rounds: dict[Hashable, list[float]] = {k: [] for k in keys}
        dropped = dict.fromkeys(keys, 0)
        for r in range(settings.rounds):
            order = keys[:]
            rng.shuffle(order)
            for k in order:
                ms, d = timer.round(fns[k], inner[k])
                rounds[k].append(ms)
                dropped[k] += d
            if on_round is not None:
                on_round(r)
    out = {}
    for k in keys:
        lo, hi = min(rounds[k]), max(rounds[k])
        out[k] = Measurement(lo, (hi - lo) / lo if lo > 0 else 0.0, rounds[k], dropped[k])
    return out


def measure(fn: Callable[[], Any], settings: TimingSettings) -> Measurement:
    """Measure one callable."""
    return measure_many({0: fn}, settings)[0]


@contextlib.contextmanager
def _device_scope(settings: TimingSettings) -> Iterator[None]:
    dev = torch.device(settings.device)
    with torch.inference_mode():
        if dev.type == "cpu":
            with cpu_threads(settings.threads):
                yield
        elif dev.type == "cuda":
            with torch.cuda.device(dev):  # the measured device is the current one while measuring
                yield
        else:
            yield


@contextlib.contextmanager
def cuda_flags(benchmark: bool, tf32: bool | None) -> Iterator[dict[str, Any]]:
    """Set cuDNN autotuning and TF32 explicitly while measuring, restoring them after.

    ``tf32``: True allows TF32 in matmuls and cuDNN convolutions, False forbids both, None takes PyTorch's
    defaults (matmuls in full fp32, cuDNN convolutions in TF32). Yields the flags in force (for the
    fingerprint). Python-level switches: harmless where there is no GPU.
    """
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    old = (cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32, torch.get_float32_matmul_precision())
    flags = resolved_cuda_flags(benchmark, tf32)
    try:
        cudnn.benchmark = flags["cudnn_benchmark"]
        cudnn.allow_tf32 = flags["tf32_cudnn"]
        torch.set_float32_matmul_precision(flags["float32_matmul_precision"])
        yield flags
    finally:
        cudnn.benchmark, cudnn.allow_tf32 = old[0], old[1]
        torch.set_float32_matmul_precision(old[3])
        matmul.allow_tf32 = old[2]


def resolved_cuda_flags(benchmark: bool, tf32: bool | None) -> dict[str, Any]:
    """The cuDNN and TF32 switches :func:`cuda_flags` sets for these settings."""
    return {"cudnn_benchmark": bool(benchmark), "tf32_cudnn": True if tf32 is None else bool(tf32),
            "float32_matmul_precision": "high" if tf32 else "highest"}
