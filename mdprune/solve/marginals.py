"""Max-marginals of a Lagrangian relaxation: an upper bound for every single decision.

For a choice of a dim, a cell of a joint, or keeping/removing a block, the best relaxed score among
configurations making that decision bounds their objective; anything bounded below a known solution's value
can be discarded. Outside dims come from the outside factor graph; for a block, the best of everything outside
it (given its interface) is the outside max-marginal minus the block's own contribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .compiled import Compiled
from .factor import Factor, eliminate
from .relax import Relaxation, Structure, joint_factor, unary_factor

#: build one dense table over all of a block's variables when it has at most this many entries
FULL_TABLE = 1 << 21


def _marginals(factors: list[Factor], sizes: list[int], queries: list[tuple[int, ...]]) -> dict:
    """Max-marginal table over each query tuple (ascending variables) of a factor graph."""
    variables = tuple(sorted({v for f in factors for v in f[0]} | {v for q in queries for v in q}))
    out = {}
    if np.prod([sizes[v] for v in variables], dtype=np.float64) <= FULL_TABLE:
        full = np.zeros(tuple(sizes[v] for v in variables))
        for scope, table in factors:
            shape = [1] * len(variables)
            for v, n in zip(scope, table.shape, strict=True):
                shape[variables.index(v)] = n
            full = full + table.reshape(shape)
        for q in queries:
            axes = tuple(i for i, v in enumerate(variables) if v not in q)
            out[q] = np.max(full, axis=axes) if axes else full
        return out
    for q in queries:
        if q not in out:
            out[q] = eliminate(factors, sizes, q)[0][1]
    return out


@dataclass
class Bounds:
    """Upper bounds (problem objective, internal units) on configurations making each decision."""

    dim: list[np.ndarray]  # per dim and choice (for a dim in a block: with the block kept)
    cell: list[np.ndarray]  # per joint and table cell (with the joint's block kept)
    kept: np.ndarray  # per block
    removed: np.ndarray  # per block
    outside: list[np.ndarray]  # per block, over its interface: the best of everything outside the block


def bounds(cm: Compiled, st: Structure, rx: Relaxation) -> Bounds:
    """Max-marginals of the relaxation at rx's multipliers."""
    global_queries = [(d,) for d in st.global_dims] + [cm.joints[i].dims for i in st.global_joints]
    global_queries += list(st.interface)
    phi = _marginals(rx.global_factors, cm.sizes, list(dict.fromkeys(global_queries)))
    dim = [np.full(n, -np.inf) for n in cm.sizes]
    cell = [np.full(j.cost.shape[1:], -np.inf) for j in cm.joints]
    for d in st.global_dims:
        dim[d] = phi[(d,)] + rx.offset
    for i in st.global_joints:
        cell[i] = phi[cm.joints[i].dims] + rx.offset
    kept = np.full(cm.n_blocks, -np.inf)
    removed = np.full(cm.n_blocks, -np.inf)
    outsides = []
    for b in range(cm.n_blocks):
        inter = st.interface[b]
        through = phi[inter]
        with np.errstate(invalid="ignore"):
            outside = np.where(np.isfinite(rx.summary[b]), through - rx.summary[b], -np.inf)
        outsides.append(outside)
        if cm.keep_fixed[b] != 1:
            removed[b] = float(np.max(outside)) + rx.offset
        if cm.keep_fixed[b] == 0:
            continue
        constant = cm.block_value[b] + rx.mu + rx.offset
        weight = cm.cost_weight - rx.lam
        factors = [unary_factor(cm, d) for d in st.block_dims[b]]
        factors += [joint_factor(cm, i, weight) for i in st.block_joints[b]] + [(inter, outside)]
        queries = [(d,) for d in st.block_dims[b]] + [cm.joints[i].dims for i in st.block_joints[b]] + [()]
        marg = _marginals(factors, cm.sizes, list(dict.fromkeys(queries)))
        for d in st.block_dims[b]:
            dim[d] = marg[(d,)] + constant
        for i in st.block_joints[b]:
            cell[i] = marg[cm.joints[i].dims] + constant
        kept[b] = float(marg[()]) + constant
    return Bounds(dim, cell, kept, removed, outsides)
