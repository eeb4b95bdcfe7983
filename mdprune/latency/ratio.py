"""The latency of one model as a fraction of another's, measured interleaved in one run, with a confidence interval.

On a shared machine the absolute latency drifts 10-40% between runs and bursts slow a few dozen calls in a row,
so two models are compared by alternating them (A B, B A, A B, ...; the order flips each pair so a steady drift
favours neither) and taking, per pair, the log of the ratio of their round medians. A burst or a drift that
slows both halves of a pair cancels in its ratio; one that slows only one half makes that pair an outlier.

The statistic is the median of the pairs' log-ratios, with the distribution-free interval of a median (order
statistics of the sign test): it assumes only that pairs are independent with a common median, not that the
noise is normal or symmetric (bursts are one-sided). A mean with a t interval would be dragged and widened by
every burst; a Hodges-Lehmann estimate assumes symmetry; a ratio of medians with a bootstrap ignores the pairing
and so keeps the drift the pairing removes. Pairs are added until the interval is narrower than the tolerance
asked (relative width ``log(high / low)``), or a time cap passes, which the record reports (``converged``).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from ..space import PruningSpace
from .backends import Backend, TimedBackend, get_backend
from .build import LatencySettings, deployment, example_inputs, prepare
from .timing import Timer, TimingSettings, _device_scope


@dataclass
class RatioSettings:
    """When to stop adding pairs: once the interval at ``confidence`` is narrower than ``tolerance`` (relative:
    ``log(high / low)``), or after ``time_cap`` seconds (not before the fewest pairs an interval at that
    confidence needs: 6 at 95%), or ``max_pairs``."""

    tolerance: float = 0.03
    confidence: float = 0.95
    time_cap: float = 15.0
    min_pairs: int = 8
    max_pairs: int = 5000


@dataclass
class Ratio:
    """``a / b`` (the median over pairs) and its interval ``[low, high]`` at ``confidence``; ``a_ms``, ``b_ms``:
    the median of each side's rounds; ``rounds``: pairs measured; ``converged``: the interval reached the
    tolerance (False: the time cap or ``max_pairs`` stopped it first)."""

    ratio: float
    low: float
    high: float
    a_ms: float
    b_ms: float
    rounds: int
    seconds: float
    converged: bool
    confidence: float

    @property
    def width(self) -> float:
        """Relative width of the interval, ``log(high / low)`` (inf if none)."""
        return math.log(self.high / self.low) if self.low > 0 and math.isfinite(self.high) else math.inf

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sign_rank(n: int, confidence: float) -> int:
    """The rank ``k`` (1-based) such that the ``k``-th smallest and ``k``-th largest of ``n`` samples bound their
    median with probability at least ``confidence`` (0 if ``n`` is too small for that confidence)."""
    alpha = (1 - confidence) / 2
    if n <= 60:  # exact binomial tail: the largest k with P(Bin(n, 1/2) <= k - 1) <= alpha
        k, tail, c = 0, 0, 1
        while k < n and tail + c <= alpha * 2 ** n:
            tail += c
            c = c * (n - k) // (k + 1)
            k += 1
        return min(k, (n + 1) // 2)
    z = statistics.NormalDist().inv_cdf(1 - alpha)  # normal approximation of the same tail
    return max(0, min(int(math.floor((n - z * math.sqrt(n)) / 2)), (n + 1) // 2))


def median_interval(logs: list[float], confidence: float) -> tuple[float, float, float]:
    """Median of ``logs`` and its distribution-free interval (``-inf, inf`` when too few samples)."""
    s = sorted(logs)
    n = len(s)
    k = sign_rank(n, confidence)
    if k == 0:
        return statistics.median(s), -math.inf, math.inf
    return statistics.median(s), s[k - 1], s[n - k]


def measure_ratio(pair: Callable[[int], tuple[float, float]], settings: RatioSettings | None = None,
                  clock: Callable[[], float] = time.monotonic) -> Ratio:
    """Call ``pair(i)`` (the ``i``-th interleaved measurement of both sides, in ms) until the interval of
    ``a / b`` is narrower than the tolerance or the time cap passes (see :class:`RatioSettings`).

    Identical ratios in the first two pairs mean a deterministic backend (no clock gives the same float twice):
    the ratio is exact and the interval has zero width.
    """
    s = settings or RatioSettings()
    need = max(1, sign_rank_min(s.confidence))
    t0 = clock()
    a_ms: list[float] = []
    b_ms: list[float] = []
    logs: list[float] = []
    converged = False
    lo = hi = mid = math.nan
    while len(logs) < max(s.max_pairs, 2):
        a, b = pair(len(logs))
        a_ms.append(a)
        b_ms.append(b)
        logs.append(math.log(a / b))
        if len(logs) == 2 and logs[0] == logs[1]:
            mid = lo = hi = logs[0]
            converged = True
            break
        if len(logs) >= max(s.min_pairs, need):
            mid, lo, hi = median_interval(logs, s.confidence)
            if hi - lo < s.tolerance:
                converged = True
                break
        if len(logs) >= need and clock() - t0 >= s.time_cap:
            break
    if not converged:
        mid, lo, hi = median_interval(logs, s.confidence)
    return Ratio(math.exp(mid), math.exp(lo), math.exp(hi), float(statistics.median(a_ms)),
                 float(statistics.median(b_ms)), len(logs), clock() - t0, converged, s.confidence)


def sign_rank_min(confidence: float) -> int:
    """The fewest samples whose extremes bound the median at ``confidence`` (6 at 95%)."""
    n = 1
    while sign_rank(n, confidence) == 0:
        n += 1
    return n


def runner_pairs(backend: Backend, a: Callable[[], Any], b: Callable[[], Any], timing: TimingSettings
                 ) -> Callable[[int], tuple[float, float]]:
    """``pair(i)`` for two runners of ``backend``: one round of each (a round: the median of ``timing.reps``
    undisturbed samples), A then B for even ``i``, B then A for odd. Timed backends are warmed up once; others
    measure each pair with their own ``measure`` (one round)."""
    if isinstance(backend, TimedBackend):
        timer = Timer(timing)
        with _device_scope(timing):
            inner = (timer.calibrate(a), timer.calibrate(b))

        def timed(i: int) -> tuple[float, float]:
            with _device_scope(timing):
                if i % 2 == 0:
                    ta = timer.round(a, inner[0])[0]
                    tb = timer.round(b, inner[1])[0]
                else:
                    tb = timer.round(b, inner[1])[0]
                    ta = timer.round(a, inner[0])[0]
            return ta, tb
        return timed
    one = replace(timing, rounds=1)

    def other(i: int) -> tuple[float, float]:
        m = backend.measure({"a": a, "b": b} if i % 2 == 0 else {"b": b, "a": a}, one)
        return m["a"].ms, m["b"].ms
    return other


def measure_models_ratio(a: torch.nn.Module, b: torch.nn.Module, space: PruningSpace, settings: LatencySettings,
                         ratio: RatioSettings | None = None, clock: Callable[[], float] = time.monotonic) -> Ratio:
    """Latency of model ``a`` as a fraction of model ``b`` (both of ``space``), interleaved in one run with the
    backend and deployment of ``settings`` (see :func:`measure_ratio`). Measures copies of the models."""
    backend = get_backend(settings.backend, settings.threads, settings.device)
    inputs = example_inputs(space, settings)
    with deployment(settings):
        ra = backend.runner(prepare(copy.deepcopy(a), (), settings)[0], inputs)
        rb = backend.runner(prepare(copy.deepcopy(b), (), settings)[0], inputs)
        return measure_ratio(runner_pairs(backend, ra, rb, settings.timing), ratio, clock)
