"""Catch measurements taken while the machine was busy: a fixed reference op timed alongside every chunk.

The timer drops samples whose thread was descheduled, but some slow-downs leave the thread running: another
process on the sibling hyperthread, a shared cache thrashed, a lower clock. They inflate a whole chunk of
points at once, so neighbouring points cannot expose them. A reference op (the *canary*) measured inside
every chunk can: a chunk whose canary ran slower than its best time in this build is measured again later.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch

from .ops import op_module
from .timing import Measurement

CANARY_KEY = ("mdprune", "canary")
_CANARY = {"kernel": (3, 3), "stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1,
           "depthwise": False, "bias": False, "in_hw": (16, 16), "out_hw": (16, 16), "epilogue": ()}


class LoadWatch:
    """Times a canary (a 32-channel 3x3 convolution on 16x16) with every chunk and remembers each chunk's."""

    def __init__(self, backend: Any, batch: int, device: str, dtype: torch.dtype,
                 prepare: Callable[[Any, tuple[torch.Tensor, ...]], tuple[Any, tuple[torch.Tensor, ...]]] | None = None
                 ) -> None:
        """``prepare(module, inputs)``: deploys the canary as the measured ops are (layout, autocast)."""
        module, inputs = op_module("conv2d", _CANARY, {"in": 32, "out": 32}, batch, device, dtype)
        if prepare is not None:
            module, inputs = prepare(module, inputs)
        self.runner: Callable[[], Any] = backend.runner(module, inputs)
        self.best = float("inf")
        self.worst_slowdown = 0.0
        self._chunks: list[tuple[list[Any], float]] = []

    def add_to(self, runners: dict[Hashable, Callable[[], Any]]) -> None:
        runners[CANARY_KEY] = self.runner

    def record(self, points: list[Any], results: dict[Hashable, Measurement]) -> float:
        """Remember the canary time of a measured chunk; returns its slow-down against the best so far."""
        ms = results[CANARY_KEY].ms
        self.best = min(self.best, ms)
        self._chunks.append((points, ms))
        slowdown = ms / self.best - 1
        self.worst_slowdown = max(self.worst_slowdown, slowdown)
        return slowdown

    def take_slow(self, tolerance: float) -> list[Any]:
        """Points of chunks whose canary ran more than ``tolerance`` slower than the best; forgets them."""
        slow = [c for c in self._chunks if c[1] > (1 + tolerance) * self.best]
        self._chunks = [c for c in self._chunks if c[1] <= (1 + tolerance) * self.best]
        return [p for points, _ in slow for p in points]
