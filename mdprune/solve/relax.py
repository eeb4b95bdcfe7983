"""Lagrangian relaxation of the budgets, solved exactly by variable elimination.

With multipliers lam >= 0 on the budgets and mu >= 0 on the kept-block count, the relaxed problem is
    max  objective(x) - lam . (usage(x) - limit) + mu * (kept(x) - min_kept)
over all configurations, an upper bound on the optimum for any (lam, mu). It is solved in two levels:
each block's internal dims are eliminated given the block's interface (the outside dims its terms use),
giving a table "best kept score", maxed with 0 for removal; then the outside dims are eliminated.
Blocks of identical shape (the same widths and terms, e.g. the repeated blocks of a ResNet stage or the
transformer blocks of a ViT) are eliminated together, stacked along an extra leading "batch" variable.
``marginals.bounds`` turns a relaxation into upper bounds on every single decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .compiled import Compiled
from .factor import Factor, eliminate, plan_order
from .factor import decode as decode_steps


@dataclass
class Group:
    """Blocks of identical shape, eliminated together; local variable 0 is the block, 1.. its dims."""

    blocks: list[int]
    dims: list[tuple[int, ...]]  # per block, its dims in local order (ascending index)
    interface: tuple[int, ...]  # local ids of outside dims
    internal: tuple[int, ...]  # local ids of the block's own dims
    scopes: list[tuple[int, ...]]  # local scope of each of the blocks' joints
    joints: list[list[int]]  # per block, its joint for each scope
    sizes: list[int]  # local variable sizes, the first being the number of blocks
    cost: list[np.ndarray]  # per scope, (blocks, R, *sizes) stacked costs


@dataclass
class Structure:
    """Which dims and joints belong to each block, each block's interface to the outside dims, block groups."""

    global_dims: list[int]
    global_joints: list[int]
    block_dims: list[list[int]]
    block_joints: list[list[int]]
    interface: list[tuple[int, ...]]
    groups: list[Group] = field(default_factory=list)


#: a batch of blocks eliminated together builds tables of at most this many entries
BATCH_TABLE = 1 << 22


def structure_of(cm: Compiled) -> Structure:
    block_dims: list[list[int]] = [[] for _ in range(cm.n_blocks)]
    block_joints: list[list[int]] = [[] for _ in range(cm.n_blocks)]
    global_dims = [d for d in range(cm.n_dims) if cm.dim_block[d] < 0]
    for d in range(cm.n_dims):
        if cm.dim_block[d] >= 0:
            block_dims[cm.dim_block[d]].append(d)
    global_joints = []
    for i, j in enumerate(cm.joints):
        (block_joints[j.block] if j.block >= 0 else global_joints).append(i)
    interface = [
        tuple(sorted({d for i in js for d in cm.joints[i].dims if cm.dim_block[d] < 0})) for js in block_joints
    ]
    st = Structure(global_dims, global_joints, block_dims, block_joints, interface)
    by_shape: dict[tuple, list[tuple[int, tuple[int, ...], list[int]]]] = {}
    for b in range(cm.n_blocks):
        dims = tuple(sorted(set(interface[b]) | set(block_dims[b])))
        local = {d: k + 1 for k, d in enumerate(dims)}
        joints = sorted(block_joints[b], key=lambda i: tuple(local[d] for d in cm.joints[i].dims))
        scopes = tuple(tuple(local[d] for d in cm.joints[i].dims) for i in joints)
        shape = (tuple(cm.sizes[d] for d in dims), tuple(cm.dim_block[d] < 0 for d in dims), scopes)
        by_shape.setdefault(shape, []).append((b, dims, joints))
    for (sizes, outside, scopes), members in by_shape.items():
        unary = [(0, k + 1) for k, o in enumerate(outside) if not o]
        iface = tuple(k + 1 for k, o in enumerate(outside) if o)
        largest = plan_order([*unary, *((0, *s) for s in scopes)], [1, *sizes], {0, *iface})[1]
        chunk = max(1, BATCH_TABLE // max(largest, 1))
        for start in range(0, len(members), chunk):
            part = members[start : start + chunk]
            st.groups.append(Group(
                blocks=[m[0] for m in part], dims=[m[1] for m in part], interface=iface,
                internal=tuple(u[1] for u in unary), scopes=list(scopes), joints=[m[2] for m in part],
                sizes=[len(part), *sizes],
                cost=[np.stack([cm.joints[m[2][q]].cost for m in part]) for q in range(len(scopes))],
            ))
    return st


@dataclass
class Relaxation:
    """The relaxed optimum at (lam, mu): its bound, a maximising configuration and what bounds() needs."""

    lam: np.ndarray
    mu: float
    bound: float
    choice: np.ndarray
    keep: np.ndarray
    offset: float  # lam . limit - mu * min_kept, added to every table value
    kept_score: list[np.ndarray]  # per block, best kept score over its interface (block value and mu included)
    summary: list[np.ndarray]  # per block, the factor the outside sees: max(kept, removed)
    global_factors: list[Factor]


def weighted(weight: np.ndarray, cost: np.ndarray, axis: int = 0) -> np.ndarray:
    """sum_r weight[r] * cost[r] (resources along ``axis``), skipping zero weights."""
    table = np.zeros(cost.shape[:axis] + cost.shape[axis + 1 :])
    for r in np.flatnonzero(weight):
        table = table + weight[r] * np.take(cost, r, axis=axis)
    return table


def unary_factor(cm: Compiled, d: int) -> Factor:
    return (d,), np.where(cm.allowed[d], cm.values[d], -np.inf)


def joint_factor(cm: Compiled, i: int, weight: np.ndarray) -> Factor:
    j = cm.joints[i]
    table = weighted(weight, j.cost)
    if cm.cell_ok[i] is not None:
        table = np.where(cm.cell_ok[i], table, -np.inf)
    return j.dims, table


def _group_factors(cm: Compiled, g: Group, weight: np.ndarray) -> list[Factor]:
    """The stacked factors of a group of blocks, over local variables."""
    factors = []
    for p in g.internal:
        dims = [dims[p - 1] for dims in g.dims]
        factors.append(((0, p), np.stack([np.where(cm.allowed[d], cm.values[d], -np.inf) for d in dims])))
    for q, scope in enumerate(g.scopes):
        table = weighted(weight, g.cost[q], axis=1)
        masks = [cm.cell_ok[js[q]] for js in g.joints]
        if any(m is not None for m in masks):
            ok = np.stack([np.ones(table.shape[1:], dtype=bool) if m is None else m for m in masks])
            table = np.where(ok, table, -np.inf)
        factors.append(((0, *scope), table))
    return factors


def relax(cm: Compiled, st: Structure, lam: np.ndarray, mu: float = 0.0) -> Relaxation:
    """Solve the Lagrangian relaxation exactly at multipliers (lam, mu)."""
    weight = cm.cost_weight - lam
    finite = np.isfinite(cm.limit)
    offset = float(lam[finite] @ cm.limit[finite]) - mu * cm.min_kept
    kept_score: list[np.ndarray] = [np.zeros(0)] * cm.n_blocks
    summary: list[np.ndarray] = [np.zeros(0)] * cm.n_blocks
    group_steps = []
    for g in st.groups:
        (_, kept), steps = eliminate(_group_factors(cm, g, weight), g.sizes, (0, *g.interface))
        group_steps.append(steps)
        for i, b in enumerate(g.blocks):
            score = kept[i] + cm.block_value[b] + mu
            fixed = cm.keep_fixed[b]
            kept_score[b] = score
            summary[b] = np.maximum(score, 0.0) if fixed < 0 else (score if fixed == 1 else np.zeros_like(score))
    global_factors = [unary_factor(cm, d) for d in st.global_dims]
    global_factors += [joint_factor(cm, i, weight) for i in st.global_joints]
    global_factors += [(st.interface[b], summary[b]) for b in range(cm.n_blocks)]
    (_, total), steps = eliminate(global_factors, cm.sizes, ())
    assignment = decode_steps(steps, {}, cm.sizes)
    choice = np.zeros(cm.n_dims, dtype=np.int64)
    for v, k in assignment.items():
        choice[v] = k
    keep = np.zeros(cm.n_blocks, dtype=bool)
    for g, steps in zip(st.groups, group_steps, strict=True):
        for i, (b, dims) in enumerate(zip(g.blocks, g.dims, strict=True)):
            known = {0: i, **{p: int(choice[dims[p - 1]]) for p in g.interface}}
            local = decode_steps(steps, known, g.sizes)
            for p in g.internal:
                choice[dims[p - 1]] = local[p]
            kept = kept_score[b][tuple(int(choice[d]) for d in st.interface[b])]
            keep[b] = cm.keep_fixed[b] == 1 or (cm.keep_fixed[b] < 0 and kept > 0)
    return Relaxation(
        lam=lam, mu=mu, bound=float(total) + offset, choice=choice, keep=keep, offset=offset,
        kept_score=kept_score, summary=summary, global_factors=global_factors,
    )
