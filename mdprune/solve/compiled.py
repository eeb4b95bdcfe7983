"""Index-based, normalised form of a Problem shared by the solver paths.

Cost terms over the same (block, dims) are merged into one ``Joint`` holding a table per resource, so each
product of choices is linearised once however many resources use it. Values and costs are scaled to O(1)
so that solver tolerances mean the same thing whatever the units. A compiled problem may carry reductions
(choices, table cells or block decisions proven not to be in any optimal solution); every path honours them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .problem import BUDGET_RTOL, Problem


@dataclass
class Joint:
    """All cost terms over one (block, dims) pair; ``cost`` has shape (resources, *sizes of dims)."""

    block: int  # -1 when outside every block
    dims: tuple[int, ...]  # ascending dim indices
    cost: np.ndarray


@dataclass
class Options:
    """The surviving kept configurations of one block, each a row of choices for ``dims``."""

    dims: tuple[int, ...]  # the block's interface dims and internal dims, ascending
    cells: np.ndarray  # (n, len(dims)) choice indices
    value: np.ndarray  # (n,) value kept (dims' values and the block value), without cost_weight terms
    cost: np.ndarray  # (R, n) normalised use of each resource by the block's terms


@dataclass
class Compiled:
    """Maximise sum(values) + block values + cost_weight . usage  s.t.  usage <= limit, kept blocks >= min_kept."""

    names: list[str]
    sizes: list[int]
    dim_block: np.ndarray  # block index per dim, -1 outside blocks
    values: list[np.ndarray]  # objective contribution of each choice (normalised)
    block_names: list[str]
    block_value: np.ndarray  # objective contribution of keeping each block (normalised)
    joints: list[Joint]
    cost_weight: np.ndarray  # (R,) objective weight on each normalised usage
    limit: np.ndarray  # (R,) normalised budget minus constant, inf when unconstrained
    tol: np.ndarray  # (R,) normalised feasibility tolerance
    min_kept: int
    obj_scale: float  # internal objective * obj_scale = objective in problem units
    cost_scale: np.ndarray  # (R,) internal usage * cost_scale = usage in problem units (without constant)
    constant: np.ndarray  # (R,) in problem units, including block-free scalar terms
    allowed: list[np.ndarray]  # per dim, which choices are still possible
    cell_ok: list[np.ndarray | None]  # per joint, which table cells are still possible (None: all)
    keep_fixed: np.ndarray  # per block: -1 free, 0 removed, 1 kept
    options: list[Options | None] = dataclasses.field(default_factory=list)  # per block (empty: none)

    @property
    def n_dims(self) -> int:
        return len(self.sizes)

    @property
    def n_blocks(self) -> int:
        return len(self.block_names)

    def reduced(self, allowed: list[np.ndarray], cell_ok: list[np.ndarray | None], keep_fixed: np.ndarray) -> Compiled:
        """A copy restricted to the given choices, cells and block decisions."""
        return dataclasses.replace(self, allowed=allowed, cell_ok=cell_ok, keep_fixed=keep_fixed)

    def block_options(self, b: int) -> Options | None:
        """The enumerated kept configurations of block b, if the problem carries them."""
        return self.options[b] if self.options else None


def compile_problem(problem: Problem, minimise: str | None = None, budgets: bool = True) -> Compiled:
    """Compile a validated problem.

    By default the objective is the kept value under every budget. With ``minimise`` set to a resource name the
    objective is minus that resource's use, and the other budgets apply only if ``budgets`` is true.
    """
    names = [d.name for d in problem.dims]
    dim_index = {n: i for i, n in enumerate(names)}
    block_index = {b: i for i, b in enumerate(problem.blocks)}
    sizes = [len(d.widths) for d in problem.dims]
    dim_block = np.array([block_index[d.block] if d.block is not None else -1 for d in problem.dims], dtype=np.int64)
    n_res = len(problem.resources)
    constant = np.array([float(r.constant) for r in problem.resources])

    merged: dict[tuple[int, tuple[int, ...]], np.ndarray] = {}
    for ri, r in enumerate(problem.resources):
        for t in r.terms:
            table = np.asarray(t.table, dtype=np.float64)
            b = block_index[t.block] if t.block is not None else -1
            idx = [dim_index[n] for n in t.dims]
            if not idx and b < 0:
                constant[ri] += float(table)
                continue
            order = np.argsort(idx)
            key = (b, tuple(int(idx[o]) for o in order))
            if key not in merged:
                merged[key] = np.zeros((n_res, *(sizes[i] for i in key[1])))
            merged[key][ri] += np.transpose(table, order) if len(idx) > 1 else table
    joints = [Joint(b, dims, cost) for (b, dims), cost in merged.items()]

    cost_scale = np.ones(n_res)
    for ri in range(n_res):
        total = sum(float(j.cost[ri].max()) for j in joints)
        if total > 0:
            cost_scale[ri] = total
    for j in joints:
        j.cost = j.cost / cost_scale.reshape((n_res,) + (1,) * len(j.dims))

    block_value = np.array([float(problem.block_value.get(b, 0.0)) for b in problem.blocks])
    raw_values = [np.asarray(d.value, dtype=np.float64) for d in problem.dims]
    cost_weight = np.zeros(n_res)
    limit = np.full(n_res, np.inf)
    if minimise is None:
        scale = sum(float(v[-1]) for v in raw_values) + float(np.abs(block_value).sum())
        obj_scale = scale if scale > 0 else 1.0
        values = [v / obj_scale for v in raw_values]
        block_value = block_value / obj_scale
    else:
        target = [r.name for r in problem.resources].index(minimise)
        obj_scale = float(cost_scale[target])
        values = [np.zeros_like(v) for v in raw_values]
        block_value = np.zeros_like(block_value)
        cost_weight[target] = -1.0
    tol = np.zeros(n_res)
    for ri, r in enumerate(problem.resources):
        if (minimise is None or (budgets and r.name != minimise)):
            limit[ri] = (float(r.budget) - constant[ri]) / cost_scale[ri]
            tol[ri] = BUDGET_RTOL * abs(float(r.budget)) / cost_scale[ri]
    return Compiled(
        names=names,
        sizes=sizes,
        dim_block=dim_block,
        values=values,
        block_names=list(problem.blocks),
        block_value=block_value,
        joints=joints,
        cost_weight=cost_weight,
        limit=limit,
        tol=tol,
        min_kept=int(problem.min_blocks_kept),
        obj_scale=obj_scale,
        cost_scale=cost_scale,
        constant=constant,
        allowed=[np.ones(s, dtype=bool) for s in sizes],
        cell_ok=[None] * len(joints),
        keep_fixed=np.full(len(problem.blocks), -1, dtype=np.int64),
    )


def usage_of(cm: Compiled, choice: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Normalised use of each resource (without constants) by a configuration."""
    used = np.zeros(len(cm.limit))
    for j in cm.joints:
        if j.block < 0 or keep[j.block]:
            used += j.cost[(slice(None), *(int(choice[d]) for d in j.dims))]
    return used


def objective_of(cm: Compiled, choice: np.ndarray, keep: np.ndarray, used: np.ndarray | None = None) -> float:
    """Internal objective of a configuration."""
    total = float(cm.block_value[keep].sum())
    for d in range(cm.n_dims):
        b = cm.dim_block[d]
        if b < 0 or keep[b]:
            total += float(cm.values[d][choice[d]])
    if np.any(cm.cost_weight):
        total += float(cm.cost_weight @ (usage_of(cm, choice, keep) if used is None else used))
    return total


def is_feasible(cm: Compiled, used: np.ndarray, keep: np.ndarray) -> bool:
    """Whether a configuration's use and kept blocks satisfy every constraint."""
    return bool(np.all(used <= cm.limit + cm.tol)) and int(keep.sum()) >= cm.min_kept


def respects_reductions(cm: Compiled, choice: np.ndarray, keep: np.ndarray) -> bool:
    """Whether a configuration avoids every eliminated choice, cell and block decision."""
    for b in range(cm.n_blocks):
        if cm.keep_fixed[b] >= 0 and bool(keep[b]) != bool(cm.keep_fixed[b]):
            return False
    for d in range(cm.n_dims):
        b = cm.dim_block[d]
        if (b < 0 or keep[b]) and not cm.allowed[d][choice[d]]:
            return False
    for j, ok in zip(cm.joints, cm.cell_ok, strict=True):
        if ok is not None and (j.block < 0 or keep[j.block]) and not ok[tuple(int(choice[d]) for d in j.dims)]:
            return False
    for b in range(cm.n_blocks):
        opts = cm.block_options(b)
        if keep[b] and opts is not None and not np.any(np.all(opts.cells == choice[list(opts.dims)], axis=1)):
            return False
    return True
