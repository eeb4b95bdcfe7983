"""Kelley's cutting-plane method for the Lagrangian dual: min over multipliers of the relaxation's bound.

The dual function is convex and piecewise linear, each relaxation giving a value and a subgradient; the
master LP (HiGHS) proposes the minimiser of the cutting-plane model inside a box that grows when the
method presses against it. Any multipliers give a valid bound, so stopping early only weakens the bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import highspy
import numpy as np

from .compiled import Compiled, is_feasible, usage_of
from .highs import new_highs
from .relax import Relaxation, Structure, relax


@dataclass
class DualResult:
    best: Relaxation  # the relaxation with the lowest bound
    iterations: int
    history: list[float] = field(default_factory=list)


def _master(points: np.ndarray, values: np.ndarray, grads: np.ndarray, upper: np.ndarray, threads: int = 1
            ) -> tuple[np.ndarray, float] | None:
    """argmin over 0 <= m <= upper of max_i values_i + grads_i . (m - points_i) (None if the LP fails)."""
    n_cuts, p = grads.shape
    h = new_highs(threads=threads)
    # columns: theta, m_1..m_p; rows: theta - g_i . m >= values_i - g_i . points_i
    dense = np.hstack([np.ones((n_cuts, 1)), -grads])
    rows = np.tile(np.arange(n_cuts), p + 1)
    vals = dense.T.ravel()
    starts = np.arange(0, n_cuts * (p + 1) + 1, n_cuts, dtype=np.int32)
    rhs = values - np.einsum("ij,ij->i", grads, points)
    h.passModel(
        p + 1, n_cuts, len(vals), 1, 1, 0.0, np.r_[1.0, np.zeros(p)], np.r_[-np.inf, np.zeros(p)],
        np.r_[np.inf, upper], rhs, np.full(n_cuts, np.inf), starts, rows.astype(np.int32), vals,
        np.zeros(p + 1, dtype=np.int32),
    )
    h.run()
    if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return None
    x = np.asarray(h.getSolution().col_value)
    return np.clip(x[1:], 0.0, upper), float(x[0])


def dual_search(
    cm: Compiled,
    st: Structure,
    deadline: float,
    on_solution: Callable[[Relaxation], float],
    max_iterations: int = 80,
    rtol: float = 1e-7,
    threads: int = 1,
) -> DualResult:
    """Minimise the Lagrangian bound. ``on_solution`` sees every relaxation and returns the best known value."""
    resources = [r for r in range(len(cm.limit)) if np.isfinite(cm.limit[r])]
    count = cm.min_kept > 0 and bool(np.any(cm.keep_fixed < 0))
    p = len(resources) + int(count)

    def split(m: np.ndarray) -> tuple[np.ndarray, float]:
        lam = np.zeros(len(cm.limit))
        lam[resources] = m[: len(resources)]
        return lam, float(m[-1]) if count else 0.0

    def grad(rx: Relaxation) -> np.ndarray:
        used = usage_of(cm, rx.choice, rx.keep)
        g = [cm.limit[r] - used[r] for r in resources]
        return np.array(g + ([float(rx.keep.sum()) - cm.min_kept] if count else []))

    m = np.zeros(p)
    rx = relax(cm, st, *split(m))
    best = rx
    lower = on_solution(rx)
    history = [rx.bound]
    if p == 0 or is_feasible(cm, usage_of(cm, rx.choice, rx.keep), rx.keep):
        return DualResult(best, 1, history)
    points, values, grads = [m], [rx.bound], [grad(rx)]
    upper = np.ones(p)
    iterations = 1
    while iterations < max_iterations and time.perf_counter() < deadline:
        proposal = _master(np.array(points), np.array(values), np.array(grads), upper, threads)
        if proposal is None:
            break
        m, model_value = proposal
        scale = max(abs(best.bound), 1e-12)
        if best.bound - model_value <= rtol * scale or best.bound - lower <= 1e-10 * scale:
            break
        rx = relax(cm, st, *split(m))
        iterations += 1
        history.append(rx.bound)
        if not np.isfinite(rx.bound):  # nothing is possible under the current reductions
            best = rx
            break
        lower = max(lower, on_solution(rx))
        g = grad(rx)
        points.append(m)
        values.append(rx.bound)
        grads.append(g)
        if rx.bound < best.bound:
            best = rx
        upper = np.where((m >= upper * (1 - 1e-9)) & (g < 0), upper * 8.0, upper)
    return DualResult(best, iterations, history)
