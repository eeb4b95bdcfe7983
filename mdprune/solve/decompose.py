"""Exact decomposition: Lagrangian bounds, exact fixing, then an exact final step on what is left.

1. Kelley's method finds multipliers whose relaxation (solved exactly per block, see relax.py) gives a tight
   upper bound; relaxed solutions that happen to be feasible, locally improved, give a lower bound LB.
2. Max-marginals of the relaxation bound every choice, table cell, block decision and complete block
   configuration (marginals.py, options.py). Whatever is bounded below LB cannot be optimal and is removed;
   the incumbent always survives, so the optimum of what is left is the optimum of the problem.
3. With one budget, the outside-dim assignments are enumerated by bound and each leaves a multiple-choice
   knapsack solved exactly by dynamic programming (knapsack.py). Otherwise (several budgets, a binding
   min_blocks_kept, or too many assignments) the reduced problem goes to the MILP (milp.py), after the same
   dynamic programme has been used as a heuristic to raise LB and cut the problem further.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np

from .compiled import Compiled, is_feasible, objective_of, respects_reductions, usage_of
from .dual import dual_search
from .factor import TooLarge
from .heuristic import improve
from .knapsack import solve_by_enumeration
from .marginals import Bounds, bounds
from .milp import solve_milp
from .options import enumerate_options
from .relax import structure_of


@dataclass
class Outcome:
    """Result of an exact path in internal units."""

    status: str  # "optimal", "time_limit" or "infeasible"
    choice: np.ndarray | None
    keep: np.ndarray | None
    objective: float
    bound: float
    method: str
    info: dict = field(default_factory=dict)


def closed(bound: float, value: float) -> bool:
    """Whether a bound proves a value optimal (relative 1e-9, absolute 1e-12 in internal units)."""
    return bound - value <= 1e-9 * abs(value) + 1e-12


class Incumbent:
    """The best feasible configuration seen; ``polish`` improves it by local search."""

    def __init__(self, cm: Compiled) -> None:
        self.cm = cm
        self.value = -np.inf
        self.choice: np.ndarray | None = None
        self.keep: np.ndarray | None = None
        self._polished = False

    def offer(self, choice: np.ndarray, keep: np.ndarray) -> float:
        used = usage_of(self.cm, choice, keep)
        if is_feasible(self.cm, used, keep):
            value = objective_of(self.cm, choice, keep, used)
            if value > self.value:
                self.value, self.choice, self.keep, self._polished = value, choice.copy(), keep.copy(), False
        return self.value

    def polish(self) -> None:
        if self.choice is not None and not self._polished:
            self.choice, self.keep, self.value = improve(self.cm, self.choice, self.keep)
            self._polished = True


def milp_size(cm: Compiled) -> int:
    """Number of choice, cell and option columns the MILP of a compiled problem would have."""
    enumerated = [cm.block_options(b) is not None for b in range(cm.n_blocks)]
    size = sum(len(cm.block_options(b).cells) for b in range(cm.n_blocks) if enumerated[b])
    for d, a in enumerate(cm.allowed):
        if cm.dim_block[d] < 0 or not enumerated[cm.dim_block[d]]:
            size += int(a.sum())
    for i, j in enumerate(cm.joints):
        if len(j.dims) >= 2 and (j.block < 0 or not enumerated[j.block]):
            mask = np.ones(j.cost.shape[1:], dtype=bool) if cm.cell_ok[i] is None else cm.cell_ok[i]
            for axis, d in enumerate(j.dims):
                shape = [1] * len(j.dims)
                shape[axis] = cm.sizes[d]
                mask = mask & cm.allowed[d].reshape(shape)
            size += int(mask.sum())
    return size


def threshold_below(lower: float) -> float:
    """Bounds below this are below ``lower`` beyond rounding error."""
    return lower - (1e-10 + 1e-9 * abs(lower))


def fix(cm: Compiled, b: Bounds, lower: float) -> Compiled:
    """Remove every choice, cell and block decision whose bound is below the known value ``lower``."""
    threshold = threshold_below(lower)
    allowed = [a & (bd >= threshold) for a, bd in zip(cm.allowed, b.dim, strict=True)]
    cell_ok = [(c >= threshold) & (True if ok is None else ok) for ok, c in zip(cm.cell_ok, b.cell, strict=True)]
    keep_fixed = cm.keep_fixed.copy()
    free = keep_fixed < 0
    keep_fixed[free & (b.kept < threshold)] = 0
    keep_fixed[free & (b.removed < threshold)] = 1
    return cm.reduced(allowed, cell_ok, keep_fixed)


def solve_decomposed(
    cm: Compiled,
    deadline: float,
    seeds: list[tuple[np.ndarray, np.ndarray]] = (),
    verbose: bool = False,
    threads: int = 1,
) -> Outcome:
    """Solve a compiled problem exactly by bounds, fixing and a final exact step (raises TooLarge if unsuited)."""
    start = time.perf_counter()

    def say(message: str) -> None:
        if verbose:
            print(f"[decomposition] {message}, {time.perf_counter() - start:.2f} s")

    st = structure_of(cm)
    incumbent = Incumbent(cm)
    for choice, keep in seeds:
        incumbent.offer(choice, keep)
    info: dict = {"columns_full": milp_size(cm)}
    dual = dual_search(cm, st, start + 0.5 * max(deadline - start, 0.0), lambda r: incumbent.offer(r.choice, r.keep),
                       threads=threads)
    upper = dual.best.bound
    incumbent.polish()
    info["relaxations"] = dual.iterations
    say(f"bound {upper:.12g}, incumbent {incumbent.value:.12g} after {dual.iterations} relaxations")
    if incumbent.choice is None and not np.isfinite(upper):
        return Outcome("infeasible", None, None, -np.inf, -np.inf, "decomposition", info)
    if incumbent.choice is not None and closed(upper, incumbent.value):
        info["final"] = "bound"
        return _finish(incumbent, "optimal", incumbent.value, info)
    if incumbent.choice is not None and time.perf_counter() > deadline:
        info["final"] = "none (time limit)"
        return _finish(incumbent, "time_limit", upper, info)
    current = cm
    if incumbent.choice is not None:
        try:
            bd = bounds(cm, st, dual.best)
        except TooLarge:
            bd = None
        if bd is not None:
            current = _reduce(cm, st, dual.best, bd, incumbent.value)
            say(f"fixing: {info['columns_full']} -> {milp_size(current)} columns")
            if time.perf_counter() > deadline:
                info["final"] = "none (time limit)"
                return _finish(incumbent, "time_limit", upper, info)
            one_budget = int(np.isfinite(cm.limit).sum()) == 1
            until = deadline if one_budget else time.perf_counter() + 0.25 * (deadline - time.perf_counter())
            found = solve_by_enumeration(current, dual.best.lam, incumbent.value, until, max_assignments=64)
            if found is not None:
                status, _, choice, keep, bound = found
                if choice is not None:
                    incumbent.offer(choice, keep)
                if status != "heuristic":
                    info["final"] = "knapsack"
                    return _finish(incumbent, status, min(upper, bound), info)
                if choice is not None:  # a better solution: discard more before the MILP
                    current = _reduce(current, st, dual.best, bd, incumbent.value)
                say(f"knapsack heuristic: incumbent {incumbent.value:.12g}, {milp_size(current)} columns")
    info["final"] = "milp"
    current = _compact(current)
    info["columns_reduced"] = milp_size(current)
    warm = None
    if incumbent.choice is not None and respects_reductions(current, incumbent.choice, incumbent.keep):
        warm = (incumbent.choice, incumbent.keep)
    result = solve_milp(current, deadline - time.perf_counter(), start=warm, verbose=verbose, threads=threads)
    info["milp_columns"], info["milp_rows"] = result.columns, result.rows
    if result.choice is not None:
        incumbent.offer(result.choice, result.keep)
    if incumbent.choice is None:
        status = "infeasible" if result.status == "infeasible" else "time_limit"
        return Outcome(status, None, None, -np.inf, min(upper, result.bound), "decomposition", info)
    milp_bound = upper if result.status == "infeasible" else result.bound
    bound = min(upper, max(milp_bound, incumbent.value))
    status = "optimal" if result.status == "optimal" or closed(bound, incumbent.value) else "time_limit"
    return _finish(incumbent, status, bound, info)


def _reduce(cm: Compiled, st, rx, bd: Bounds, lower: float) -> Compiled:
    """Fix by the bounds and list each block's surviving options."""
    reduced = fix(cm, bd, lower)
    reduced.options = enumerate_options(reduced, st, rx, bd, threshold_below(lower))
    return reduced


def _compact(cm: Compiled) -> Compiled:
    """Drop the option lists of blocks whose options outnumber their choice and cell columns."""
    if not cm.options:
        return cm
    options = list(cm.options)
    for b, opts in enumerate(options):
        if opts is None:
            continue
        size = sum(int(cm.allowed[d].sum()) for d in range(cm.n_dims) if cm.dim_block[d] == b)
        for i, j in enumerate(cm.joints):
            if j.block == b and len(j.dims) >= 2:
                ok = np.ones(j.cost.shape[1:], dtype=bool) if cm.cell_ok[i] is None else cm.cell_ok[i]
                size += int(np.count_nonzero(ok))
        if len(opts.cells) > size:
            options[b] = None
    return dataclasses.replace(cm, options=options)


def _finish(incumbent: Incumbent, status: str, bound: float, info: dict) -> Outcome:
    value = objective_of(incumbent.cm, incumbent.choice, incumbent.keep)
    return Outcome(status, incumbent.choice, incumbent.keep, value, max(bound, value), "decomposition", info)
