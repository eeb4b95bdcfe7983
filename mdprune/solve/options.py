"""Enumerate each block's surviving kept configurations (its options) for the reduced MILP.

Given a relaxation and the best value of everything outside each block (from ``bounds``), the bound of one
complete configuration of a block (interface and internal choices) is its relaxed score plus that outside
value. Configurations bounded below the incumbent cannot be optimal; the rest become the block's options,
so that the reduced MILP is a multiple-choice knapsack over blocks linked through the outside dims.
"""

from __future__ import annotations

import numpy as np

from .compiled import Compiled, Options
from .marginals import FULL_TABLE, Bounds
from .relax import Relaxation, Structure, weighted


def _place(table: np.ndarray, positions: list[int], ndim: int) -> np.ndarray:
    """Reshape a table whose axes sit at ``positions`` (ascending) of an ``ndim``-axis grid for broadcasting."""
    shape = [1] * ndim
    for p, n in zip(positions, table.shape, strict=True):
        shape[p] = n
    return table.reshape(shape)


def enumerate_options(cm: Compiled, st: Structure, rx: Relaxation, bd: Bounds, threshold: float,
                      limit: int = FULL_TABLE) -> list[Options | None]:
    """Options of every block whose grid of allowed choices has at most ``limit`` cells (None for the others)."""
    weight = cm.cost_weight - rx.lam
    n_res = len(cm.limit)
    result: list[Options | None] = []
    for b in range(cm.n_blocks):
        dims = tuple(sorted(set(st.interface[b]) | set(st.block_dims[b])))
        where = {d: i for i, d in enumerate(dims)}
        idx = [np.flatnonzero(cm.allowed[d]) for d in dims]
        if cm.keep_fixed[b] == 0 or any(len(i) == 0 for i in idx):
            result.append(Options(dims, np.zeros((0, len(dims)), dtype=np.int64), np.zeros(0), np.zeros((n_res, 0))))
            continue
        if np.prod([len(i) for i in idx], dtype=np.float64) > limit:
            result.append(None)
            continue
        total = np.zeros(tuple(len(i) for i in idx))
        for d in st.block_dims[b]:
            total = total + _place(cm.values[d][idx[where[d]]], [where[d]], len(dims))
        for i in st.block_joints[b]:
            j = cm.joints[i]
            grid = np.ix_(*(idx[where[d]] for d in j.dims)) if j.dims else ()
            table = weighted(weight, j.cost)[grid]
            if cm.cell_ok[i] is not None:
                table = np.where(cm.cell_ok[i][grid], table, -np.inf)
            total = total + _place(np.asarray(table), [where[d] for d in j.dims], len(dims))
        inter = st.interface[b]
        outside = bd.outside[b][np.ix_(*(idx[where[d]] for d in inter))] if inter else bd.outside[b]
        total = total + _place(np.asarray(outside), [where[d] for d in inter], len(dims))
        total = total + cm.block_value[b] + rx.mu + rx.offset
        if dims:
            local = np.nonzero(total >= threshold)
            cells = np.stack([idx[a][local[a]] for a in range(len(dims))], axis=1)
        else:
            cells = np.zeros((int(total >= threshold), 0), dtype=np.int64)
        n = len(cells)
        value = np.full(n, float(cm.block_value[b]))
        for d in st.block_dims[b]:
            value += cm.values[d][cells[:, where[d]]]
        cost = np.zeros((n_res, n))
        for i in st.block_joints[b]:
            j = cm.joints[i]
            cost += j.cost[(slice(None), *(cells[:, where[d]] for d in j.dims))] if j.dims else j.cost[:, None]
        result.append(Options(dims, cells.astype(np.int64), value, cost))
    return result
