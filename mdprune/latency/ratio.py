"""The latency of one model as a fraction of another's, measured interleaved in one run, with a confidence interval.

The two models are timed alternately (A B, B A, A B, ...; the order flips each pair so a steady drift favours
neither) for at least ``min_seconds``, and the ratio is that of a low quantile (``quantile``, 10% by default) of
each side's round times: the latency of each model in the machine's fast state.

Why not the median of per-pair ratios (what this module did first): on a shared machine the ratio itself moves
with the host's state, not only the absolute times. Measured here (small_resnet18, batch 1, 1 thread, one plan,
two minutes of alternating pairs): when the host ran 50% slower, the plan's ratio to the dense model rose from
0.535 to 0.59, so the median of per-pair ratios over consecutive 10-s windows spread over 8.3% (sd 2.5%) while
each window's own sign-test interval was about +-1% wide: the interval was honest about the pairs and blind to
the state. The ratio of the two sides' 10% quantiles over the same windows spread over 2.1% (sd 0.75%); over 5-s
windows every statistic spread about 10%, because a window can fall wholly in a slow state, hence the minimum
duration. A check and a later re-measurement in a fresh process then compare the same quantity.

The interval is by batch means: the pairs are cut into consecutive blocks and the statistic's spread between
blocks gives a t interval. Blocks keep the correlation between neighbouring pairs (a slow spell spans many),
which an interval over independent pairs would ignore (a block bootstrap with so few blocks covered the truth
in about 85-90% of simulated runs at 95%; batch means with blocks of 16 pairs or more, 92-95%). Pairs are added
until the interval is narrower than the tolerance asked (relative width ``log(high / low)``) and ``min_seconds``
have passed, or a time cap passes, which the record reports (``converged``).

What the interval does not cover: a wander of the host slower than the measurement itself. Measured here
(``bench/drift.py``: one plan and its dense model timed for 4 minutes in one process, replayed through
:func:`measure_ratio` as 10-20 s checks), the ratio's sd between 10-s windows was 0.5-2.9%, and the 95% interval
held the 4-minute ratio in 27-73% of the replays. Blocks of 5 s or more (8 at least) instead of 16 pairs
helped the ViT's traces by 5-17 points and lost coverage under stationary noise when stopping at the
tolerance, so the blocks stay short; a decision taken on one interval can only be trusted for misses larger
than that wander.
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
    quantile: float = 0.1  #: the statistic: ratio of the two sides' ``quantile``-quantiles (0.5: of medians)


@dataclass
class Ratio:
    """``a / b`` (``a_ms / b_ms``) and its interval ``[low, high]`` at ``confidence``; ``a_ms``, ``b_ms``: each
    side's quantile of its round times (:attr:`RatioSettings.quantile`); ``rounds``: pairs measured;
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
            est = quantile_ratio_interval(la, lb, s)
            if est[2] - est[1] < s.tolerance and elapsed >= s.min_seconds:
                break
        if capped:
            break
    assert est is not None
    mid, lo, hi = est
    qa, qb = np.quantile(la, s.quantile), np.quantile(lb, s.quantile)
    return Ratio(math.exp(mid), math.exp(lo), math.exp(hi), math.exp(qa), math.exp(qb), len(la), clock() - t0,
                 hi - lo < s.tolerance, s.confidence)


def quantile_ratio_interval(log_a: list[float], log_b: list[float], settings: RatioSettings
                            ) -> tuple[float, float, float]:
    """The log of the ratio of the two sides' quantiles, and its batch-means interval (logs, in time order).

    The pairs are cut into ``k = min(20, max(4, n // 16))`` consecutive blocks; the statistic of each block
    spreads as the host's state moves between blocks, so ``t(k - 1) * sd(block statistics) / sqrt(k)`` around
    the statistic of all pairs bounds it at ``confidence`` without assuming that neighbouring pairs are
    independent (batch means; blocks of one pair under 8 pairs)."""
    a, b = np.asarray(log_a), np.asarray(log_b)
    n, q = len(a), settings.quantile
    mid = float(np.quantile(a, q) - np.quantile(b, q))
    k = n if n < 8 else min(20, max(4, n // 16))
    if k < 2:
        return mid, -math.inf, math.inf
    edges = np.linspace(0, n, k + 1).round().astype(int)
    per = np.array([np.quantile(a[i:j], q) - np.quantile(b[i:j], q) for i, j in zip(edges, edges[1:], strict=False)])
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
