"""The latency of one model as a fraction of another's, measured interleaved in one run, with a confidence interval.

The two models are timed alternately (A B, B A, A B, ...; the order flips each pair so a steady drift favours
neither) for at least ``min_seconds``, and the ratio is the 10%-trimmed mean of the per-pair log ratios
``log(a / b)`` (``statistic="pairs"``): the two halves of a pair run milliseconds apart, in the same state of
the host, so a state shared by both cancels in the pair and the mean over pairs averages the states met.

The statistic has moved twice, each time on measured traces (``bench/drift.py --save-trace``: one plan and its
dense model timed alternately for 4 minutes in one process, then cut into windows):

- First the median of per-pair ratios. On one 2-minute trace (small_resnet18, batch 1, 1 thread) it moved
  with the host's slowness (0.535 when the host ran fast, 0.59 when 50% slower; sd 2.5% between 10-s
  windows) while the ratio of the two sides' 10% quantiles moved 0.75%. So the ratio of 10% quantiles
  (``statistic="quantile"``: each model in the machine's fast state) replaced it.
- On five 4-minute traces of 2026-12-07 (ViT and ResNet plans, quiet and with one core busy) the ratio of 10%
  quantiles wandered 0.7-4.5% (sd) between 10-s windows and 0.4-3.9% between 40-s windows: when the fast
  state comes and goes, each window's quantile picks a different state. The trimmed mean of per-pair log
  ratios wandered 1.3-2.3% and 0.9-1.2%, and one 10-20 s check's estimate spread 1.1-1.9% around the
  4-minute value against 0.8-4.1% for the quantiles (root mean square over the five: 1.7% against 2.8%).
  Where the host was steady the quantiles were tighter (0.8 and 1.2% against 1.1 and 1.7%); where it was
  not they were 2-3 times looser. The pairs' statistic is never far off; it is the default.

The interval is by batch means: the pairs are cut into consecutive blocks and the statistic's spread between
blocks gives a t interval. Blocks keep the correlation between neighbouring pairs (a slow spell spans many),
which an interval over independent pairs would ignore (a block bootstrap with so few blocks covered the truth
in about 85-90% of simulated runs at 95%; batch means with blocks of 16 pairs or more, 92-95%). Pairs are added
until the interval is narrower than the tolerance asked (relative width ``log(high / low)``) and ``min_seconds``
have passed (over shorter windows every statistic moved about 10%: a window can fall wholly in a slow spell),
or a time cap passes, which the record reports (``converged``).

What the interval does not cover: a wander of the host slower than the measurement itself. Replayed as
10-20 s checks on those traces (:func:`measure_ratio` from a start every 5 s), the 95% interval held the
4-minute ratio in 34-73% of the replays with the pairs' statistic (20-75% with the quantiles). Blocks of 5 s
or more (8 at least) instead of 16 pairs were tried and lost coverage under stationary noise when stopping at
the tolerance, so the blocks stay short; a decision taken on one interval can only be trusted for misses
larger than that wander.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from statistics import NormalDist
from typing import Any

import numpy as np
import torch

from ..space import PruningSpace
from .backends import Backend, TimedBackend, get_backend
from .build import LatencySettings, deployment, example_inputs, prepare
from .timing import Timer, TimingSettings, _device_scope


@dataclass
class RatioSettings:
    """When to stop adding pairs: once the interval at ``confidence`` is narrower than ``tolerance`` (relative:
    ``log(high / low)``) and ``min_seconds`` have passed, or after ``time_cap`` seconds (not before
    ``min_pairs``), or at ``max_pairs``; and which statistic (see the module docstring)."""

    tolerance: float = 0.03
    confidence: float = 0.95
    time_cap: float = 20.0
    min_pairs: int = 8
    max_pairs: int = 20000
    min_seconds: float = 10.0  #: measure at least this long, so slow and fast spells of the host both show
    #: the statistic (see the module docstring): "pairs", the trimmed mean of per-pair log ratios, or
    #: "quantile", the ratio of the two sides' ``quantile``-quantiles of their round times
    statistic: str = "pairs"
    trim: float = 0.1  #: for "pairs": the share of pairs cut from each tail before the mean (bursts on one side)
    quantile: float = 0.1  #: for "quantile": which quantile (0.5: the ratio of medians)

    def __post_init__(self) -> None:
        if self.statistic not in STATISTICS:
            raise ValueError(f"unknown ratio statistic {self.statistic!r}; known: {sorted(STATISTICS)}")
        if not 0 <= self.trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {self.trim}")


@dataclass
class Ratio:
    """``a / b`` and its interval ``[low, high]`` at ``confidence``; ``a_ms``, ``b_ms``: each side's own
    statistic of its round times (for "pairs" its trimmed geometric mean, for "quantile" its quantile; with
    "pairs" their ratio is close to, not exactly, ``ratio``); ``rounds``: pairs measured;
    ``converged``: the interval reached the tolerance (False: the time cap or ``max_pairs`` stopped it first)."""

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


def measure_ratio(pair: Callable[[int], tuple[float, float]], settings: RatioSettings | None = None,
                  clock: Callable[[], float] = time.monotonic) -> Ratio:
    """Call ``pair(i)`` (the ``i``-th interleaved measurement of both sides, in ms) until the interval of
    ``a / b`` is narrower than the tolerance and ``min_seconds`` have passed, or the time cap passes (see
    :class:`RatioSettings` and the module docstring).

    Identical ratios in the first two pairs mean a deterministic backend (no clock gives the same float twice):
    the ratio is exact and the interval has zero width.
    """
    s = settings or RatioSettings()
    t0 = clock()
    la: list[float] = []
    lb: list[float] = []
    next_check = max(s.min_pairs, 2)
    est: tuple[float, float, float] | None = None
    while True:
        a, b = pair(len(la))
        la.append(math.log(a))
        lb.append(math.log(b))
        n = len(la)
        if n == 2 and la[0] - lb[0] == la[1] - lb[1]:
            d = la[0] - lb[0]
            return Ratio(math.exp(d), math.exp(d), math.exp(d), math.exp(la[0]), math.exp(lb[0]), 2,
                         clock() - t0, True, s.confidence)
        elapsed = clock() - t0
        capped = n >= max(s.min_pairs, 2) and (elapsed >= s.time_cap or n >= s.max_pairs)
        if n >= next_check or capped:
            next_check = max(n + 4, int(n * 1.1))  # the interval costs a pass over the pairs: every 10% more
            est = ratio_interval(la, lb, s)
            if est[2] - est[1] < s.tolerance and elapsed >= s.min_seconds:
                break
        if capped:
            break
    assert est is not None
    mid, lo, hi = est
    return Ratio(math.exp(mid), math.exp(lo), math.exp(hi), side_ms(la, s), side_ms(lb, s), len(la), clock() - t0,
                 hi - lo < s.tolerance, s.confidence)


def trimmed_mean(x: np.ndarray, trim: float) -> float:
    """The mean of ``x`` without its ``floor(trim * n)`` smallest and largest values."""
    x = np.sort(np.asarray(x, dtype=float))
    cut = int(trim * len(x))
    return float(x[cut:len(x) - cut].mean())


def _pairs(log_a: np.ndarray, log_b: np.ndarray, s: RatioSettings) -> float:
    return trimmed_mean(log_a - log_b, s.trim)


def _pairs_side(log_x: np.ndarray, s: RatioSettings) -> float:
    return trimmed_mean(log_x, s.trim)


def _quantiles(log_a: np.ndarray, log_b: np.ndarray, s: RatioSettings) -> float:
    return _quantile_side(log_a, s) - _quantile_side(log_b, s)


def _quantile_side(log_x: np.ndarray, s: RatioSettings) -> float:
    return float(np.quantile(log_x, s.quantile))


#: the ratio statistics by name: ``(ratio, side)``, where ``ratio(logs of a's round times, logs of b's,
#: settings)`` gives ``log(a / b)`` and ``side(logs of one side's, settings)`` that side's own figure (log ms)
STATISTICS: dict[str, tuple[Callable[[np.ndarray, np.ndarray, RatioSettings], float],
                            Callable[[np.ndarray, RatioSettings], float]]] = {
    "pairs": (_pairs, _pairs_side), "quantile": (_quantiles, _quantile_side)}


def log_ratio(log_a: np.ndarray, log_b: np.ndarray, settings: RatioSettings) -> float:
    """The statistic of ``settings`` (see the module docstring) on the logs of the paired round times, as
    ``log(a / b)``."""
    return STATISTICS[settings.statistic][0](np.asarray(log_a), np.asarray(log_b), settings)


def side_ms(log_x: np.ndarray, settings: RatioSettings) -> float:
    """One side's own figure in ms: its trimmed geometric mean ("pairs") or its quantile ("quantile")."""
    return math.exp(STATISTICS[settings.statistic][1](np.asarray(log_x), settings))


def ratio_interval(log_a: list[float], log_b: list[float], settings: RatioSettings) -> tuple[float, float, float]:
    """The statistic (as ``log(a / b)``) and its batch-means interval (logs, in time order).

    The pairs are cut into ``k = min(20, max(4, n // 16))`` consecutive blocks; the statistic of each block
    spreads as the host's state moves between blocks, so ``t(k - 1) * sd(block statistics) / sqrt(k)`` around
    the statistic of all pairs bounds it at ``confidence`` without assuming that neighbouring pairs are
    independent (batch means; blocks of one pair under 8 pairs)."""
    a, b = np.asarray(log_a), np.asarray(log_b)
    n = len(a)
    mid = log_ratio(a, b, settings)
    k = n if n < 8 else min(20, max(4, n // 16))
    if k < 2:
        return mid, -math.inf, math.inf
    edges = np.linspace(0, n, k + 1).round().astype(int)
    per = np.array([log_ratio(a[i:j], b[i:j], settings) for i, j in zip(edges, edges[1:], strict=False)])
    half = _t_quantile(1 - (1 - settings.confidence) / 2, k - 1) * float(per.std(ddof=1)) / math.sqrt(k)
    return mid, mid - half, mid + half


def _t_quantile(p: float, dof: int) -> float:
    """Student's t quantile (Cornish-Fisher expansion around the normal one; within 1% for dof >= 3)."""
    z = NormalDist().inv_cdf(p)
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    return z + g1 / dof + g2 / dof ** 2 + g3 / dof ** 3


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


@contextmanager
def model_pairs(a: torch.nn.Module, b: torch.nn.Module, space: PruningSpace | None, settings: LatencySettings,
                inputs: tuple[torch.Tensor, ...] | None = None) -> Iterator[Callable[[int], tuple[float, float]]]:
    """``pair(i)`` (see :func:`runner_pairs`) timing copies of models ``a`` and ``b`` (both of ``space``) with the
    backend and deployment of ``settings``, on ``inputs`` (default: random inputs of ``space`` at the latency
    batch); valid inside the ``with`` block, which holds the deployment."""
    backend = get_backend(settings.backend, settings.threads, settings.device)
    if inputs is None:
        if space is None:
            raise ValueError("timing two models needs their space or the inputs")
        inputs = example_inputs(space, settings)
    with deployment(settings):
        ra = backend.runner(prepare(copy.deepcopy(a), (), settings)[0], inputs)
        rb = backend.runner(prepare(copy.deepcopy(b), (), settings)[0], inputs)
        yield runner_pairs(backend, ra, rb, settings.timing)


def measure_models_ratio(a: torch.nn.Module, b: torch.nn.Module, space: PruningSpace | None,
                         settings: LatencySettings, ratio: RatioSettings | None = None,
                         clock: Callable[[], float] = time.monotonic,
                         inputs: tuple[torch.Tensor, ...] | None = None) -> Ratio:
    """Latency of model ``a`` as a fraction of model ``b`` (both of ``space``), interleaved in one run with the
    backend and deployment of ``settings`` (see :func:`measure_ratio`), on ``inputs`` (default: random inputs of
    ``space`` at the latency batch). Measures copies of the models."""
    with model_pairs(a, b, space, settings, inputs) as pair:
        return measure_ratio(pair, ratio, clock)
