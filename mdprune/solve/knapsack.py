"""Final step over outside-dim assignments: enumerate them by bound and solve each knapsack by dynamic programming.

Once every block's surviving kept configurations are listed (options.py), fixing all outside dims (those
outside blocks) to an assignment g separates the problem into a multiple-choice knapsack: one option (or
removal) per block under the budgets. Assignments are visited in decreasing order of their Lagrangian bound,
stopping as soon as the bound falls below the best value found. Each knapsack is solved by a dynamic programme
over (cost, value) states that keeps only Pareto-optimal states and drops those whose completion bound cannot
reach the best value: the smaller of the Lagrangian bound and the LP relaxation of the remaining groups on the
primary budget (their options' upper concave envelopes filled greedily: a concave function of the capacity left,
tight at every capacity, where the Lagrangian bound is tight only near its multiplier's). Each programme first
aims just below its root bound, then lower: a high aim prunes nearly every state, and the first aim reached
gives the best solution. With one budget this is exact; with several, states are compared on the most binding
budget only (all budgets are enforced), which makes it a strong heuristic whose solution then tightens the
reduced MILP. Applies when min_blocks_kept cannot bind.
"""

from __future__ import annotations

import time

import numpy as np

from .compiled import Compiled
from .relax import weighted


def pareto_knapsack(groups: list[tuple[np.ndarray, np.ndarray]], capacity: np.ndarray, lam: np.ndarray,
                    target: float, primary: int = 0) -> tuple[float, list[int]] | None:
    """Best value choosing one option per group, each option a (costs (R, n), values (n,)) column.

    Totals must stay within ``capacity`` (R,). Only solutions worth at least ``target`` are looked for: states
    whose completion bound (the smaller of the Lagrangian bound at ``lam`` >= 0 and the LP bound on the primary
    cost) cannot reach it are dropped. States are Pareto-filtered on the ``primary`` cost, exact when R == 1
    (with several budgets, on the ``lam``-weighted cost: a heuristic). Options dominated within their group are
    dropped first. Returns (value, option index per group) or None.

    The programme is first run for a target just below the root bound, then for lower ones down to ``target``:
    a high target prunes nearly every state, and the first run that finds a solution has found the best one.
    """
    kept = [_frontier(c, v, c[primary] if len(capacity) == 1 else lam @ c) for c, v in groups]
    groups = [(c[:, k], v[k]) for (c, v), k in zip(groups, kept, strict=True)]
    best_rest = [float(np.max(v - lam @ c)) for c, v in groups]
    suffix = np.concatenate([np.cumsum(best_rest[::-1])[::-1], [0.0]])
    hulls = _suffix_hulls(groups, primary)
    root = min(float(lam @ capacity) + suffix[0], float(_hull_value(hulls[0], np.array(capacity[primary]))))
    if root < target:
        return None
    step = (root - target) / 64.0 if np.isfinite(target) else np.inf
    while True:
        aim = max(target, root - step)
        found = _programme(groups, capacity, lam, aim, primary, suffix, hulls)
        if found is not None or aim <= target:
            break
        step *= 4.0
    if found is None:
        return None
    return found[0], [int(k[p]) for k, p in zip(kept, found[1], strict=True)]


def _programme(groups: list[tuple[np.ndarray, np.ndarray]], capacity: np.ndarray, lam: np.ndarray, target: float,
               primary: int, suffix: np.ndarray, hulls: list[tuple[np.ndarray, np.ndarray]]
               ) -> tuple[float, list[int]] | None:
    """The dynamic programme of :func:`pareto_knapsack` for one target; picks index the given groups."""
    cost, value = np.zeros((len(capacity), 1)), np.zeros(1)
    trail: list[tuple[np.ndarray, np.ndarray]] = []
    for i, (c, v) in enumerate(groups):
        new_cost = (cost[:, :, None] + c[:, None, :]).reshape(len(capacity), -1)
        new_value = (value[:, None] + v[None, :]).ravel()
        parent = np.repeat(np.arange(len(value)), len(v))
        option = np.tile(np.arange(len(v)), len(value))
        ok = np.all(new_cost <= capacity[:, None], axis=0)
        ok &= new_value + lam @ (capacity[:, None] - new_cost) + suffix[i + 1] >= target
        ok &= new_value + _hull_value(hulls[i + 1], capacity[primary] - new_cost[primary]) >= target
        new_cost, new_value, parent, option = new_cost[:, ok], new_value[ok], parent[ok], option[ok]
        if len(new_value) == 0:
            return None
        order = np.lexsort((-new_value, new_cost[primary] if len(capacity) == 1 else lam @ new_cost))
        new_cost, new_value, parent, option = new_cost[:, order], new_value[order], parent[order], option[order]
        front = np.r_[True, new_value[1:] > np.maximum.accumulate(new_value)[:-1]]
        cost, value = new_cost[:, front], new_value[front]
        trail.append((parent[front], option[front]))
    state = int(np.argmax(value))
    if value[state] < target:
        return None
    best = float(value[state])
    picks = []
    for parent, option in reversed(trail):
        picks.append(int(option[state]))
        state = int(parent[state])
    return best, picks[::-1]


def _envelope(cost: np.ndarray, value: np.ndarray) -> tuple[float, float, np.ndarray, np.ndarray]:
    """The cheapest option (cost, best value at that cost) and the increments (cost, value) of the upper concave
    envelope of one group's options from there to its most valuable option, in decreasing slope."""
    order = np.lexsort((-value, cost))
    c, v = cost[order], value[order]
    hull = [0]
    for k in range(1, len(c)):
        if c[k] <= c[hull[-1]] or v[k] <= v[hull[-1]]:
            continue  # not cheaper-and-better than the last envelope point
        while len(hull) >= 2 and (v[k] - v[hull[-1]]) * (c[hull[-1]] - c[hull[-2]]) >= \
                (v[hull[-1]] - v[hull[-2]]) * (c[k] - c[hull[-1]]):
            hull.pop()
        hull.append(k)
    h = np.asarray(hull)
    return float(c[0]), float(v[0]), np.diff(c[h]), np.diff(v[h])


def _suffix_hulls(groups: list[tuple[np.ndarray, np.ndarray]], primary: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per suffix of groups (and the empty one), the breakpoints (capacity, value) of its LP relaxation on the
    ``primary`` cost: every group at its cheapest option, then envelope increments by decreasing slope."""
    parts = [_envelope(c[primary], v) for c, v in groups]
    out = [(np.zeros(1), np.zeros(1))]
    base_c = base_v = 0.0
    dc, dv = np.zeros(0), np.zeros(0)
    for c0, v0, gc, gv in reversed(parts):
        base_c, base_v = base_c + c0, base_v + v0
        dc, dv = np.r_[dc, gc], np.r_[dv, gv]
        order = np.argsort(-(dv / dc), kind="stable")
        out.append((base_c + np.r_[0.0, np.cumsum(dc[order])], base_v + np.r_[0.0, np.cumsum(dv[order])]))
    return out[::-1]


def _hull_value(hull: tuple[np.ndarray, np.ndarray], room: np.ndarray) -> np.ndarray:
    """LP bound of a suffix at each capacity left (-inf below its cheapest completion)."""
    xs, ys = hull
    slack = 1e-12 * max(1.0, abs(float(xs[-1])))
    return np.where(room >= xs[0] - slack, np.interp(room, xs, ys), -np.inf)


def _frontier(cost: np.ndarray, value: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Indices of the options not dominated by a cheaper (by ``key``) and at least as valuable one."""
    order = np.lexsort((-value, key))
    ordered = value[order]
    return order[np.r_[True, ordered[1:] > np.maximum.accumulate(ordered)[:-1]]]


def _threshold(lower: float) -> float:
    return lower - (1e-10 + 1e-9 * abs(lower))


def solve_by_enumeration(cm: Compiled, lam: np.ndarray, lower: float, deadline: float, max_grid: int = 1 << 20,
                         max_assignments: int | None = None):
    """Search above ``lower``; returns (status, value, choice, keep, bound) or None if the step does not apply.

    ``status`` is "optimal" or "time_limit" with one budget, "heuristic" with several (``bound`` then means
    nothing); choice and keep are None when nothing beats ``lower``.
    """
    finite = np.flatnonzero(np.isfinite(cm.limit))
    free = cm.keep_fixed < 0
    blocks = [b for b in range(cm.n_blocks) if cm.keep_fixed[b] != 0]
    if len(finite) == 0 or int((cm.keep_fixed == 1).sum()) < cm.min_kept:
        return None
    if any(cm.block_options(b) is None for b in blocks):
        return None
    exact = len(finite) == 1
    outside = [d for d in range(cm.n_dims) if cm.dim_block[d] < 0]
    idx = [np.flatnonzero(cm.allowed[d]) for d in outside]
    if np.prod([len(i) for i in idx], dtype=np.float64) > max_grid:
        return None
    pos = {d: i for i, d in enumerate(outside)}
    weight = cm.cost_weight - lam

    def place(table: np.ndarray, dims: tuple[int, ...], local: bool = False) -> np.ndarray:
        """A table over some outside dims as a broadcastable table over the grid of allowed choices."""
        if not local and dims:
            table = table[np.ix_(*(idx[pos[d]] for d in dims))]
        shape = [1] * len(outside)
        for d in dims:
            shape[pos[d]] = len(idx[pos[d]])
        return np.asarray(table).reshape(shape)

    bound = np.full(tuple(len(i) for i in idx), float(lam[finite] @ cm.limit[finite]))
    for d in outside:
        bound = bound + place(cm.values[d], (d,))
    outside_joints = [j for j in cm.joints if j.block < 0]
    for j in outside_joints:
        bound = bound + place(weighted(weight, j.cost), j.dims)
    columns = {}
    for b in blocks:
        opts = cm.block_options(b)
        inter = [i for i, d in enumerate(opts.dims) if cm.dim_block[d] < 0]
        value = opts.value + cm.cost_weight @ opts.cost
        score = value - lam @ opts.cost
        dims = tuple(opts.dims[i] for i in inter)
        where = [np.searchsorted(idx[pos[d]], opts.cells[:, i]) for d, i in zip(dims, inter, strict=True)]
        valid = np.ones(len(score), dtype=bool)
        for d, i, k in zip(dims, inter, where, strict=True):
            valid &= idx[pos[d]][np.minimum(k, len(idx[pos[d]]) - 1)] == opts.cells[:, i]
        best = np.full(tuple(len(idx[pos[d]]) for d in dims), 0.0 if free[b] else -np.inf)
        if dims:
            np.maximum.at(best, tuple(k[valid] for k in where), score[valid])
        elif len(score):
            best = np.maximum(best, score.max())
        bound = bound + place(best, dims, local=True)
        columns[b] = (inter, opts.cost[finite], value)
    primary = int(np.argmax(lam[finite]))
    flat = bound.ravel()
    order = np.argsort(-flat)
    if max_assignments is not None and not exact:
        order = order[:max_assignments]
    found = None
    status = "optimal" if exact else "heuristic"
    for at in order:
        if flat[at] < _threshold(lower):
            break
        if time.perf_counter() > deadline:
            status = "time_limit" if exact else status
            return status, lower, *(found or (None, None)), max(lower, float(flat[at]))
        choice = np.zeros(cm.n_dims, dtype=np.int64)
        for d, k in zip(outside, np.unravel_index(at, bound.shape), strict=True):
            choice[d] = idx[pos[d]][k]
        base_cost = np.zeros(len(cm.limit))
        for j in outside_joints:
            base_cost += j.cost[(slice(None), *(int(choice[d]) for d in j.dims))]
        base_value = sum(float(cm.values[d][choice[d]]) for d in outside) + float(cm.cost_weight @ base_cost)
        groups, rows = [], []
        for b in blocks:
            inter, cost, value = columns[b]
            opts = cm.block_options(b)
            match = np.flatnonzero(np.all(opts.cells[:, inter] == choice[[opts.dims[i] for i in inter]], axis=1))
            c, v = cost[:, match], value[match]
            if free[b]:
                c, v = np.hstack([c, np.zeros((len(finite), 1))]), np.r_[v, 0.0]
            groups.append((c, v))
            rows.append(match)
        capacity = cm.limit[finite] + cm.tol[finite] - base_cost[finite]
        if any(len(v) == 0 for _, v in groups) or np.any(capacity < 0):
            continue
        result = pareto_knapsack(groups, capacity, lam[finite], _threshold(lower) - base_value, primary)
        if result is None or base_value + result[0] <= lower:
            continue
        lower = base_value + result[0]
        keep = np.zeros(cm.n_blocks, dtype=bool)
        for b, match, pick in zip(blocks, rows, result[1], strict=True):
            if pick < len(match):
                keep[b] = True
                opts = cm.block_options(b)
                choice[list(opts.dims)] = opts.cells[match[pick]]
        found = (choice, keep)
    return status, lower, *(found or (None, None)), lower
