"""Entry points: ``solve`` and ``minimum_usage``."""

from __future__ import annotations

import time

import numpy as np

from .brute import brute_force
from .compiled import Compiled, compile_problem, objective_of
from .decompose import Outcome, closed, solve_decomposed
from .factor import TooLarge
from .milp import solve_milp
from .problem import InfeasibleBudget, Problem, Solution, evaluate, validate, within_budget

METHODS = ("auto", "decomposition", "milp", "brute")


def _optimise(cm: Compiled, method: str, deadline: float, seeds: list, verbose: bool, threads: int) -> Outcome:
    """Run an exact path on a compiled problem; "auto" takes the decomposition unless it would be too large."""
    if method in ("auto", "decomposition"):
        try:
            return solve_decomposed(cm, deadline, seeds, verbose, threads)
        except TooLarge as err:
            if method == "decomposition":
                raise ValueError(f"the decomposition does not suit this problem: {err}") from err
            if verbose:
                print(f"[solve] decomposition unsuited ({err}); using the monolithic MILP")
    # the seeds are feasible: the best is HiGHS's start (HiGHS keeps the better of it and its own)
    start = max(seeds, key=lambda s: objective_of(cm, *s), default=None)
    result = solve_milp(cm, deadline - time.perf_counter(), start=start, verbose=verbose, threads=threads)
    bound = min(result.bound, _trivial_bound(cm))
    return Outcome(result.status, result.choice, result.keep, result.objective, bound, "milp",
                   {"milp_columns": result.columns, "milp_rows": result.rows})


def _trivial_bound(cm: Compiled) -> float:
    """Every dim at its best allowed choice, every block of positive value kept, costs ignored (they only lower
    the objective): an upper bound for when HiGHS stops before its root relaxation."""
    best = sum(float(np.max(np.where(a, v, -np.inf))) for a, v in zip(cm.allowed, cm.values, strict=True))
    return best + float(np.maximum(cm.block_value, 0.0).sum())


def _configuration(problem: Problem, choice: np.ndarray, keep: np.ndarray) -> tuple[dict[str, int], list[str]]:
    removed = [b for b, k in zip(problem.blocks, keep, strict=True) if not k]
    gone = set(removed)
    return {d.name: (0 if d.block in gone else int(c)) for d, c in zip(problem.dims, choice, strict=True)}, removed


def _minimum(problem: Problem, resource: str, method: str, deadline: float, budgets: bool, verbose: bool,
             threads: int = 1):
    """Exact smallest use of a resource: (proven, value, configuration) or None when nothing is feasible."""
    if method == "brute":
        found = brute_force(problem, minimise=resource, budgets=budgets)
        return None if found is None else (True, -found[2], found[:2])
    cm = compile_problem(problem, minimise=resource, budgets=budgets)
    out = _optimise(cm, "auto", deadline, [], verbose, threads)
    if out.choice is None:
        return None if out.status == "infeasible" else (False, np.inf, None)
    choice, removed = _configuration(problem, out.choice, out.keep)
    return out.status == "optimal", evaluate(problem, choice, removed)[1][resource], (choice, removed)


def minimum_usage(problem: Problem, resource: str, *, threads: int = 1) -> float:
    """Smallest use of one resource over all configurations (budgets ignored, ``min_blocks_kept`` honoured);
    ``threads`` as in :func:`solve`."""
    validate(problem)
    _check_threads(threads)
    if resource not in [r.name for r in problem.resources]:
        raise ValueError(f"unknown resource {resource!r}")
    proven, value, _ = _minimum(problem, resource, "auto", time.perf_counter() + 3600.0, False, False, threads)
    if not proven:
        raise RuntimeError(f"could not prove the minimum use of {resource!r} within an hour")
    return float(value)


def _seeds(problem: Problem, cm: Compiled, configurations: list) -> list[tuple[np.ndarray, np.ndarray]]:
    seeds = []
    for choice, removed in configurations:
        _, usage = evaluate(problem, choice, removed)
        if all(within_budget(usage[r.name], r.budget) for r in problem.resources):
            seeds.append((np.array([choice[n] for n in cm.names], dtype=np.int64),
                          np.array([b not in removed for b in problem.blocks], dtype=bool)))
    return seeds


def _check_threads(threads: int) -> None:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")


def solve(problem: Problem, *, time_limit: float = 60.0, method: str = "auto", verbose: bool = False,
          threads: int = 1) -> Solution:
    """Maximise the kept value within every budget; see the package docstring for the paths and guarantees.

    ``time_limit`` (seconds) covers everything: validation, the smallest reachable use of each resource, building
    every model and every solver phase. The deadline is checked between phases (and HiGHS gets what is left), so a
    run ends within about the limit plus the phase under way, with the best configuration found so far: status
    "time_limit", ``bound`` and ``gap`` saying how far from optimal it may be at most.

    ``threads``: threads of every HiGHS instance (the master LPs and MILPs). The default 1 keeps the solver
    deterministic (the same answer and path on every run) and polite on shared machines; more threads rarely help
    here, as the exact paths leave HiGHS small problems.

    Raises InfeasibleBudget when a budget is below the smallest reachable use of its resource, and TimeoutError
    when the time limit passes before any configuration within the budgets is found.
    """
    t0 = time.perf_counter()
    validate(problem)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    _check_threads(threads)
    if not time_limit >= 0:
        raise ValueError(f"time_limit must be a number of seconds >= 0, got {time_limit!r}")
    deadline = t0 + float(time_limit)
    found = []
    for r in problem.resources:
        minimum = _minimum(problem, r.name, method, deadline, False, False, threads)
        if verbose and minimum is not None:
            print(f"[solve] smallest reachable {r.name}: {minimum[1]:.6g} (budget {r.budget:.6g})")
        if minimum is None:
            raise InfeasibleBudget(r.name, r.budget, np.inf, "no configuration satisfies min_blocks_kept")
        proven, value, configuration = minimum
        if proven and not within_budget(value, r.budget):
            raise InfeasibleBudget(r.name, r.budget, value)
        if configuration is not None:
            found.append(configuration)
    if method == "brute":
        best = brute_force(problem)
        if best is None:
            _raise_joint(problem, method, deadline, verbose, threads)
        choice, removed, _ = best
        return _solution(problem, choice, removed, None, "optimal", t0, "brute")
    cm = compile_problem(problem)
    out = _optimise(cm, method, deadline, _seeds(problem, cm, found), verbose, threads)
    if out.status == "infeasible":
        _raise_joint(problem, method, deadline, verbose, threads)
    if out.choice is None:
        raise TimeoutError(f"no configuration within the budgets was found in {time_limit} s")
    choice, removed = _configuration(problem, out.choice, out.keep)
    status = "optimal" if out.status == "optimal" or closed(out.bound, out.objective) else out.status
    return _solution(problem, choice, removed, out.bound * cm.obj_scale, status, t0, out.method)


def _raise_joint(problem: Problem, method: str, deadline: float, verbose: bool, threads: int) -> None:
    """The budgets are each reachable but not together: report the latency reachable within the others."""
    first = problem.resources[0]
    minimum = _minimum(problem, first.name, method if method == "brute" else "auto", deadline, True, verbose,
                       threads)
    value = np.inf if minimum is None else minimum[1]
    raise InfeasibleBudget(first.name, first.budget, value, "within the other budgets")


def _solution(problem: Problem, choice: dict[str, int], removed: list[str], bound: float | None, status: str,
              t0: float, method: str) -> Solution:
    objective, usage = evaluate(problem, choice, removed)
    for r in problem.resources:
        if not within_budget(usage[r.name], r.budget):
            raise RuntimeError(f"internal error: solution uses {usage[r.name]!r} of {r.name!r} > {r.budget!r}")
    if status == "optimal" or bound is None:
        bound = objective
    bound = max(float(bound), objective)
    gap = 0.0 if status == "optimal" else (bound - objective) / max(abs(objective), 1e-12)
    widths = {d.name: d.widths[choice[d.name]] for d in problem.dims}
    return Solution(choice=choice, widths=widths, removed=removed, objective=objective, bound=bound, gap=gap,
                    status=status, usage=usage, seconds=time.perf_counter() - t0, method=method)
