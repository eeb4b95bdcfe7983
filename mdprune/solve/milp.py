"""The monolithic MILP in marginal-equality form, solved by HiGHS.

Variables: keep_b (binary) per block; x[d,k] (binary) one-hot per dim, summing to keep_b for a dim inside
block b and to 1 outside; for a term of block b using an outside dim d, a gated copy y[d,b,k] = x[d,k]*keep_b
written exactly as y <= x, sum_k y = keep_b; for every joint over 2-3 dims a nonnegative z over its table cells
whose marginal sums along each dim equal that dim's (gated) one-hot vector. For integral x, y and keep this
forces z to the indicator of the selected cell, so every product of choices is linear and exact. Only choices
and cells that the compiled problem still allows get columns.

A reduced problem may instead list a block's surviving kept configurations ("options", see options.py): that
block then gets one binary per option, summing to keep_b, each option forcing the outside dims it reads
(sum of options reading choice k of d <= x[d,k]): a multiple-choice knapsack whose LP relaxation is as tight
as the Lagrangian bound.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import highspy
import numpy as np

from .compiled import Compiled, is_feasible, objective_of, usage_of
from .highs import new_highs

#: matrix entries above which HiGHS's symmetry detection is skipped: on a DeiT-B-sized monolithic MILP (2.5M
#: entries) it takes seconds to tens of seconds, past any time limit
LARGE_MODEL = 200_000


@dataclass
class MilpResult:
    status: str  # "optimal", "time_limit" or "infeasible"
    choice: np.ndarray | None
    keep: np.ndarray | None
    objective: float  # internal units, -inf without a solution
    bound: float  # internal units
    columns: int
    rows: int


class _Model:
    """Columns, rows and coordinate-format entries of a maximisation MILP."""

    def __init__(self) -> None:
        self.cost: list[np.ndarray] = []
        self.upper: list[np.ndarray] = []
        self.integer: list[np.ndarray] = []
        self.row_lo: list[np.ndarray] = []
        self.row_hi: list[np.ndarray] = []
        self.entries: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.n_cols = 0
        self.n_rows = 0

    def cols(self, cost: np.ndarray, integer: bool) -> np.ndarray:
        n = len(cost)
        self.cost.append(np.asarray(cost, dtype=np.float64))
        self.upper.append(np.ones(n))
        self.integer.append(np.full(n, int(integer), dtype=np.int32))
        self.n_cols += n
        return np.arange(self.n_cols - n, self.n_cols)

    def rows(self, n: int, lo: float, hi: float) -> np.ndarray:
        self.row_lo.append(np.full(n, lo))
        self.row_hi.append(np.full(n, hi))
        self.n_rows += n
        return np.arange(self.n_rows - n, self.n_rows)

    def add(self, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray | float) -> None:
        rows, cols = np.broadcast_arrays(np.asarray(rows), np.asarray(cols))
        self.entries.append((rows.ravel(), cols.ravel(), np.broadcast_to(vals, rows.shape).ravel().astype(float)))


def _cell_mask(cm: Compiled, i: int) -> np.ndarray:
    """Which cells of joint i get a column: all its dims' choices allowed and the cell itself allowed."""
    j = cm.joints[i]
    mask = np.ones(j.cost.shape[1:], dtype=bool)
    for axis, d in enumerate(j.dims):
        shape = [1] * len(j.dims)
        shape[axis] = cm.sizes[d]
        mask &= cm.allowed[d].reshape(shape)
    if cm.cell_ok[i] is not None:
        mask &= cm.cell_ok[i]
    return mask


@dataclass
class _Layout:
    """Where each decision lives among the MILP columns."""

    keep: np.ndarray  # per block
    x: list[np.ndarray]  # per dim, column per choice (-1: none)
    gated: dict[tuple[int, int], np.ndarray]  # (dim, block) -> column per choice
    joint_cols: list[np.ndarray | None]  # per joint of 2-3 dims, column per allowed cell
    option_cols: list[np.ndarray | None]  # per block with options, column per option


def _build(cm: Compiled) -> tuple[_Model, np.ndarray, np.ndarray, np.ndarray, _Layout]:
    m = _Model()
    enumerated = [cm.block_options(b) is not None for b in range(cm.n_blocks)]
    keep_col = m.cols(np.where(enumerated, 0.0, cm.block_value), integer=True)
    x_col = []
    for d in range(cm.n_dims):
        b = cm.dim_block[d]
        cols = np.full(cm.sizes[d], -1)
        x_col.append(cols)
        if b >= 0 and enumerated[b]:
            continue  # represented by the block's options
        ks = np.flatnonzero(cm.allowed[d])
        cols[ks] = m.cols(cm.values[d][ks], integer=True)
        row = m.rows(1, 0.0 if b >= 0 else 1.0, 0.0 if b >= 0 else 1.0)
        m.add(row, cols[ks], 1.0)
        if b >= 0:
            m.add(row, keep_col[b], -1.0)
    gated: dict[tuple[int, int], np.ndarray] = {}

    def one_hot(d: int, b: int) -> np.ndarray:
        """Columns of dim d's one-hot vector as seen by a joint of block b."""
        if b < 0 or cm.dim_block[d] == b:
            return x_col[d]
        if (d, b) not in gated:
            ks = np.flatnonzero(cm.allowed[d])
            cols = np.full(cm.sizes[d], -1)
            cols[ks] = m.cols(np.zeros(len(ks)), integer=False)
            link = m.rows(len(ks), -np.inf, 0.0)
            m.add(link, cols[ks], 1.0)
            m.add(link, x_col[d][ks], -1.0)
            total = m.rows(1, 0.0, 0.0)
            m.add(total, cols[ks], 1.0)
            m.add(total, keep_col[b], -1.0)
            gated[(d, b)] = cols
        return gated[(d, b)]

    usage: list[tuple[np.ndarray, np.ndarray]] = []  # (columns, (R, n) coefficients)
    joint_cols: list[np.ndarray | None] = [None] * len(cm.joints)
    for i, j in enumerate(cm.joints):
        if j.block >= 0 and enumerated[j.block]:
            continue
        if not j.dims:
            cols, vals = np.array([keep_col[j.block]]), j.cost.reshape(-1, 1)
        elif len(j.dims) == 1:
            u = one_hot(j.dims[0], j.block)
            ks = np.flatnonzero(u >= 0)
            cols, vals = u[ks], j.cost[:, ks]
        else:
            cells = np.nonzero(_cell_mask(cm, i))
            cols = joint_cols[i] = m.cols(np.zeros(len(cells[0])), integer=False)
            vals = j.cost[(slice(None), *cells)]
            for axis, d in enumerate(j.dims):
                u = one_hot(d, j.block)
                ks = np.flatnonzero(u >= 0)
                rank = np.cumsum(u >= 0) - 1
                rows = m.rows(len(ks), 0.0, 0.0)
                m.add(rows[rank[cells[axis]]], cols, 1.0)
                m.add(rows, u[ks], -1.0)
        usage.append((cols, vals))
    option_cols: list[np.ndarray | None] = [None] * cm.n_blocks
    for b in range(cm.n_blocks):
        opts = cm.block_options(b)
        if opts is None:
            continue
        cols = option_cols[b] = m.cols(opts.value, integer=True)
        m.add(m.rows(1, 0.0, 0.0), np.r_[cols, keep_col[b]], np.r_[np.ones(len(cols)), -1.0])
        for axis, d in enumerate(opts.dims):
            if cm.dim_block[d] < 0:  # the chosen option must agree with the outside dim's choice
                ks = np.flatnonzero(cm.allowed[d])
                rank = np.cumsum(cm.allowed[d]) - 1
                rows = m.rows(len(ks), -np.inf, 0.0)
                m.add(rows[rank[opts.cells[:, axis]]], cols, 1.0)
                m.add(rows, x_col[d][ks], -1.0)
        usage.append((cols, opts.cost))
    for r in range(len(cm.limit)):
        if np.isfinite(cm.limit[r]):
            row = m.rows(1, -np.inf, float(cm.limit[r]))
            for cols, vals in usage:
                m.add(row, cols, vals[r])
    if cm.min_kept > 0:
        m.add(m.rows(1, float(cm.min_kept), np.inf), keep_col, 1.0)
    cost = np.concatenate(m.cost)
    if np.any(cm.cost_weight):
        for cols, vals in usage:
            np.add.at(cost, cols, cm.cost_weight @ vals)
    upper = np.concatenate(m.upper)
    lower = np.zeros(m.n_cols)
    lower[keep_col] = np.where(cm.keep_fixed == 1, 1.0, 0.0)
    upper[keep_col] = np.where(cm.keep_fixed == 0, 0.0, 1.0)
    return m, cost, lower, upper, _Layout(keep_col, x_col, gated, joint_cols, option_cols)


def _start_vector(cm: Compiled, n_cols: int, lay: _Layout, choice: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The column values of a configuration (which must respect the reductions)."""
    start = np.zeros(n_cols)
    start[lay.keep] = keep.astype(float)
    for d in range(cm.n_dims):
        b = cm.dim_block[d]
        if (b < 0 or keep[b]) and lay.x[d][choice[d]] >= 0:
            start[lay.x[d][choice[d]]] = 1.0
    for (d, b), cols in lay.gated.items():
        if keep[b]:
            start[cols[choice[d]]] = 1.0
    for i, cols in enumerate(lay.joint_cols):
        j = cm.joints[i]
        if cols is not None and (j.block < 0 or keep[j.block]):
            mask = _cell_mask(cm, i)
            # the column of the selected cell is its rank among allowed cells in C order
            flat = np.ravel_multi_index(tuple(int(choice[d]) for d in j.dims), mask.shape)
            start[cols[int(np.count_nonzero(mask.ravel()[:flat]))]] = 1.0
    for b, cols in enumerate(lay.option_cols):
        if cols is not None and keep[b]:
            opts = cm.block_options(b)
            match = np.flatnonzero(np.all(opts.cells == choice[list(opts.dims)], axis=1))
            start[cols[match[0]]] = 1.0
    return start


def _decode(cm: Compiled, lay: _Layout, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = values[lay.keep] > 0.5
    choice = np.zeros(cm.n_dims, dtype=np.int64)
    for d in range(cm.n_dims):
        ks = np.flatnonzero(lay.x[d] >= 0)
        if len(ks):
            choice[d] = ks[int(np.argmax(values[lay.x[d][ks]]))]
    for b, cols in enumerate(lay.option_cols):
        if cols is not None and keep[b]:
            opts = cm.block_options(b)
            row = opts.cells[int(np.argmax(values[cols]))]
            for d, k in zip(opts.dims, row, strict=True):
                if cm.dim_block[d] == b:
                    choice[d] = k
    for d in range(cm.n_dims):
        if cm.dim_block[d] >= 0 and not keep[cm.dim_block[d]]:
            choice[d] = 0
    return choice, keep


def _run(model: tuple, n_cols: int, n_rows: int, time_limit: float, start_vector: np.ndarray | None,
         presolve: bool, verbose: bool, threads: int) -> highspy.Highs:
    h = new_highs(verbose, threads)
    h.setOptionValue("time_limit", max(float(time_limit), 0.01))
    h.setOptionValue("presolve", "on" if presolve else "off")
    # values and costs are normalised to O(1) (compiled.py), so these are relative to the objective's scale
    h.setOptionValue("mip_rel_gap", 1e-10)
    h.setOptionValue("mip_abs_gap", 1e-10)
    h.setOptionValue("mip_feasibility_tolerance", 1e-10)
    h.setOptionValue("primal_feasibility_tolerance", 1e-10)
    if model[2] > LARGE_MODEL:  # symmetry detection runs before the branch and bound without looking at the clock
        h.setOptionValue("mip_detect_symmetry", False)
    h.passModel(*model)
    if start_vector is not None:
        h.setSolution(n_cols, np.arange(n_cols, dtype=np.int32), start_vector)
    h.run()
    return h


def _assemble(cm: Compiled, deadline: float) -> tuple[tuple, _Model, _Layout] | None:
    """The HiGHS model (column-wise) and the layout, or None if the deadline passed while building it."""
    m, cost, lower, upper, lay = _build(cm)
    if time.perf_counter() > deadline:
        return None
    rows, cols, vals = (np.concatenate([e[k] for e in m.entries]) for k in range(3))
    order = np.argsort(cols, kind="stable")  # column-wise; HiGHS needs no order of the rows within a column
    rows, cols, vals = rows[order], cols[order], vals[order]
    starts = np.concatenate([[0], np.cumsum(np.bincount(cols, minlength=m.n_cols))]).astype(np.int32)
    model = (
        m.n_cols, m.n_rows, len(vals), 1, -1, 0.0, cost, lower, upper,
        np.concatenate(m.row_lo), np.concatenate(m.row_hi), starts, rows.astype(np.int32), vals,
        np.concatenate(m.integer),
    )
    return model, m, lay


def solve_milp(cm: Compiled, time_limit: float, start: tuple[np.ndarray, np.ndarray] | None = None,
               verbose: bool = False, threads: int = 1) -> MilpResult:
    """Solve the compiled problem (with its reductions) to proven optimality or the time limit.

    The time limit covers building the model: if it passes before HiGHS starts, the start (if any) comes back
    with status "time_limit" and no bound (+inf). HiGHS's answer is checked: the decoded configuration must be
    feasible and worth the objective HiGHS reports. If not (HiGHS 1.16 can return its start point after presolve
    improved on it), it is solved again without the start, then without presolve, while time is left.
    """
    deadline = time.perf_counter() + time_limit
    built = _assemble(cm, deadline) if time_limit > 0 else None
    if built is None or time.perf_counter() > deadline:
        return _unstarted(cm, start, *((built[1].n_cols, built[1].n_rows) if built else (0, 0)))
    model, m, lay = built
    vector = None if start is None else _start_vector(cm, m.n_cols, lay, *start)
    attempts = [(vector, True), (None, True), (None, False)] if vector is not None else [(None, True), (None, False)]
    for warm, presolve in attempts:
        h = _run(model, m.n_cols, m.n_rows, deadline - time.perf_counter(), warm, presolve, verbose, threads)
        status = h.getModelStatus()
        info = h.getInfo()
        if status == highspy.HighsModelStatus.kInfeasible:
            result = MilpResult("infeasible", None, None, -np.inf, -np.inf, m.n_cols, m.n_rows)
        elif info.primal_solution_status != 2:
            result = MilpResult("time_limit", None, None, -np.inf, float(info.mip_dual_bound), m.n_cols, m.n_rows)
        else:
            choice, keep = _decode(cm, lay, np.asarray(h.getSolution().col_value))
            label = "optimal" if status == highspy.HighsModelStatus.kOptimal else "time_limit"
            objective = float(info.objective_function_value)
            bound = float(info.mip_dual_bound) if label != "optimal" else max(objective, float(info.mip_dual_bound))
            result = MilpResult(label, choice, keep, objective, bound, m.n_cols, m.n_rows)
            value = objective_of(cm, choice, keep)
            feasible = is_feasible(cm, usage_of(cm, choice, keep), keep)
            if not (feasible and value >= objective - 1e-9 * (1 + abs(value))):
                if verbose:
                    print(f"[milp] HiGHS returned a solution worth {value!r}, not {objective!r}; solving again")
                result.status, result.objective = "time_limit", value
                if time.perf_counter() < deadline:
                    continue
                if not feasible:
                    return _unstarted(cm, start, m.n_cols, m.n_rows)
        if result.status != "infeasible" or not presolve or time.perf_counter() > deadline:
            return result
    return result


def _unstarted(cm: Compiled, start: tuple[np.ndarray, np.ndarray] | None, columns: int, rows: int) -> MilpResult:
    """The answer when the time limit passes before HiGHS runs: the start, unproven."""
    if start is None:
        return MilpResult("time_limit", None, None, -np.inf, np.inf, columns, rows)
    choice, keep = start
    return MilpResult("time_limit", choice, keep, objective_of(cm, choice, keep), np.inf, columns, rows)
