"""Exhaustive enumeration of small problems, independent of the other paths; the reference in tests."""

from __future__ import annotations

import itertools

import numpy as np

from .problem import BUDGET_RTOL, Problem

#: refuse to enumerate more configurations than this
MAX_CONFIGURATIONS = 5_000_000


def brute_force(problem: Problem, minimise: str | None = None, budgets: bool = False) -> tuple[
    dict[str, int], list[str], float
] | None:
    """Best configuration as (choice, removed, objective), or None if none is feasible.

    The objective is the kept value under every budget; with ``minimise`` set to a resource name it is minus the
    use of that resource, under ``min_blocks_kept`` and, if ``budgets``, the other resources' budgets.
    """
    names = [d.name for d in problem.dims]
    position = {n: i for i, n in enumerate(names)}
    sizes = [len(d.widths) for d in problem.dims]
    count = int(np.prod(sizes, dtype=np.float64)) * 2 ** len(problem.blocks)
    if count > MAX_CONFIGURATIONS:
        raise ValueError(f"brute force would enumerate {count} configurations (limit {MAX_CONFIGURATIONS})")
    grid = np.indices(sizes).reshape(len(sizes), -1).T if sizes else np.zeros((1, 0), dtype=np.int64)
    best: tuple[dict[str, int], list[str], float] | None = None
    for mask in itertools.product((False, True), repeat=len(problem.blocks)):
        if sum(mask) < problem.min_blocks_kept:
            continue
        removed = {b for b, k in zip(problem.blocks, mask, strict=True) if not k}
        inactive = [i for i, d in enumerate(problem.dims) if d.block in removed]
        rows = grid[np.all(grid[:, inactive] == 0, axis=1)] if inactive else grid
        value = np.zeros(len(rows))
        for i, d in enumerate(problem.dims):
            if d.block not in removed:
                value += np.asarray(d.value, dtype=np.float64)[rows[:, i]]
        value += sum(v for b, v in problem.block_value.items() if b not in removed)
        feasible = np.ones(len(rows), dtype=bool)
        for r in problem.resources:
            used = np.full(len(rows), float(r.constant))
            for t in r.terms:
                if t.block not in removed:
                    used += np.asarray(t.table, dtype=np.float64)[tuple(rows[:, position[n]] for n in t.dims)]
            if r.name == minimise:
                value = -used
            elif minimise is None or budgets:
                feasible &= used <= r.budget + BUDGET_RTOL * abs(r.budget)
        if not feasible.any():
            continue
        k = int(np.argmax(np.where(feasible, value, -np.inf)))
        if best is None or value[k] > best[2]:
            choice = {n: (0 if problem.dims[i].block in removed else int(rows[k, i])) for i, n in enumerate(names)}
            best = (choice, sorted(removed, key=problem.blocks.index), float(value[k]))
    return best
