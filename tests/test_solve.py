"""The exact optimiser: every path against enumeration and against each other, errors, gating, time limits."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from mdprune.solve import (
    CostTerm,
    DimChoice,
    InfeasibleBudget,
    Problem,
    Resource,
    evaluate,
    minimum_usage,
    solve,
    within_budget,
)
from mdprune.solve.brute import brute_force
from mdprune.solve.compiled import compile_problem
from mdprune.solve.decompose import solve_decomposed
from mdprune.solve.factor import eliminate
from mdprune.solve.knapsack import pareto_knapsack
from mdprune.solve.synthetic import random_problem, resnet_problem, vit_problem

PATHS = ("decomposition", "milp", "auto")


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


def check_solution(problem: Problem, sol) -> None:
    """A solution is self-consistent: its figures are those of its configuration, within every budget."""
    objective, usage = evaluate(problem, sol.choice, sol.removed)
    assert close(objective, sol.objective)
    for r in problem.resources:
        assert close(usage[r.name], sol.usage[r.name])
        assert within_budget(sol.usage[r.name], r.budget)
    assert set(sol.removed) <= set(problem.blocks) and len(set(sol.removed)) == len(sol.removed)
    assert len(problem.blocks) - len(sol.removed) >= problem.min_blocks_kept
    for d in problem.dims:
        assert sol.widths[d.name] == d.widths[sol.choice[d.name]]
        if d.block in sol.removed:
            assert sol.choice[d.name] == 0
    assert sol.bound >= sol.objective
    assert sol.gap == pytest.approx((sol.bound - sol.objective) / max(abs(sol.objective), 1e-12))
    if sol.status == "optimal":
        assert sol.gap == 0.0


def check_against_brute(problem: Problem, methods=PATHS) -> None:
    reference = brute_force(problem)
    for method in methods:
        if reference is None:
            with pytest.raises(InfeasibleBudget):
                solve(problem, method=method)
            continue
        sol = solve(problem, method=method)
        assert sol.status == "optimal", method
        assert close(sol.objective, reference[2]), (method, sol.objective, reference[2])
        check_solution(problem, sol)


@pytest.mark.parametrize("seed", range(80))
def test_tiny_random_problems_match_brute_force(seed):
    check_against_brute(random_problem(seed))


@pytest.mark.parametrize("seed", range(25))
def test_larger_random_problems_match_brute_force(seed):
    problem = random_problem(1000 + seed, max_choices=4, max_blocks=4, max_dims=7, max_terms=9)
    check_against_brute(problem, methods=("decomposition", "milp"))


def between(problem: Problem, fractions: list[float]) -> Problem:
    """Set each budget a fraction of the way from its smallest reachable use to its dense use."""
    for r, f in zip(problem.resources, fractions, strict=True):
        low = minimum_usage(problem, r.name)
        dense = r.constant + sum(float(np.max(t.table)) for t in r.terms)
        r.budget = low + f * (dense - low)
    return problem


@pytest.mark.parametrize("seed", range(4))
def test_paths_agree_on_network_shaped_problems(seed):
    rng = np.random.default_rng(seed)
    problems = [
        between(resnet_problem((1, 2), seed, 1.0, max_choices=6), [float(rng.uniform(0.05, 0.6))]),
        between(resnet_problem((1, 2), seed, 1.0, max_choices=6, params_budget=1.0), list(rng.uniform(0.1, 0.6, 2))),
        between(vit_problem(2, seed, 1.0, embed=64, heads=4, head_dim=16, mlp=128, tokens=17, steps=(16, 1, 4, 32),
                            min_blocks_kept=seed % 3), [float(rng.uniform(0.05, 0.6))]),
    ]
    for problem in problems:
        a, b = solve(problem, method="decomposition"), solve(problem, method="milp")
        assert a.status == b.status == "optimal"
        assert close(a.objective, b.objective)
        check_solution(problem, a)
        check_solution(problem, b)


def test_decomposition_final_steps_are_all_exercised():
    """One budget ends in the knapsack enumeration, two budgets in the reduced MILP; both exact."""
    finals = set()
    for seed in (1, 3):
        for problem in (resnet_problem((1, 2), seed, 0.4, max_choices=6),
                        resnet_problem((1, 2), seed, 0.5, max_choices=6, params_budget=0.5)):
            out = solve_decomposed(compile_problem(problem), time.perf_counter() + 60)
            finals.add(out.info["final"])
            assert out.status == "optimal"
            assert close(out.objective * compile_problem(problem).obj_scale, solve(problem, method="milp").objective)
    assert {"knapsack", "milp"} <= finals


@pytest.mark.parametrize("scale", [1e-12, 1.0, 1e12])
def test_value_scale_does_not_change_the_answer(scale):
    base = resnet_problem((1, 1), 3, 0.45, max_choices=6)
    reference = solve(base)
    for d in base.dims:
        d.value = d.value * scale
    for method in ("decomposition", "milp"):
        sol = solve(base, method=method)
        assert sol.status == "optimal"
        assert sol.objective == pytest.approx(reference.objective * scale, rel=1e-9)


def _two_dims(budget_a: float, budget_b: float | None = None) -> Problem:
    dims = [DimChoice("a", [8, 16, 24], np.array([1.0, 2.0, 2.5])), DimChoice("b", [8, 16], np.array([1.0, 3.0]))]
    resources = [Resource("latency", [CostTerm("ab", ("a", "b"), np.array([[1.0, 4.0], [2.0, 5.0], [3.0, 9.0]]))],
                          constant=0.5, budget=budget_a)]
    if budget_b is not None:
        resources.append(Resource("params", [CostTerm("a", ("a",), np.array([6.0, 3.0, 1.0]))], 0.0, budget_b))
    return Problem(dims, [], resources)


@pytest.mark.parametrize("method", PATHS + ("brute",))
def test_infeasible_budget_states_smallest_reachable_use(method):
    with pytest.raises(InfeasibleBudget, match="smallest reachable use 1.5") as err:
        solve(_two_dims(1.2), method=method)
    assert err.value.resource == "latency"
    assert err.value.budget == 1.2
    assert err.value.minimum == pytest.approx(1.5)
    assert solve(_two_dims(1.5), method=method).usage["latency"] == pytest.approx(1.5)


@pytest.mark.parametrize("method", PATHS + ("brute",))
def test_budgets_reachable_alone_but_not_together(method):
    # latency wants a small, params wants a large: each budget alone is reachable, both together are not
    with pytest.raises(InfeasibleBudget, match="within the other budgets") as err:
        solve(_two_dims(2.4, 2.0), method=method)
    assert err.value.minimum == pytest.approx(3.5)  # a=2 (params 1 <= 2) with b=0: 3 + 0.5


@pytest.mark.parametrize("seed", range(20))
def test_minimum_usage_matches_brute_force(seed):
    problem = random_problem(seed)
    for r in problem.resources:
        reference = brute_force(problem, minimise=r.name)
        assert minimum_usage(problem, r.name) == pytest.approx(-reference[2], rel=1e-9, abs=1e-12)


def _blocks_problem(min_kept: int, budget: float, block_value: dict | None = None) -> Problem:
    """Three blocks with one dim each and a shared outside dim; removing blocks saves latency."""
    dims = [DimChoice("e", [8, 16], np.array([4.0, 5.0]))]
    terms = [CostTerm("stem", ("e",), np.array([1.0, 2.0]))]
    for i in range(3):
        dims.append(DimChoice(f"m{i}", [8, 16, 24], np.array([1.0, 1.5, 1.8]) * (i + 1), f"blk{i}"))
        terms.append(CostTerm(f"fc{i}", ("e", f"m{i}"), np.array([[1.0, 2.0, 3.0], [2.0, 3.0, 4.0]]), f"blk{i}"))
        terms.append(CostTerm(f"norm{i}", ("e",), np.array([0.5, 0.7]), f"blk{i}"))
        terms.append(CostTerm(f"fixed{i}", (), np.array(0.25), f"blk{i}"))
    return Problem(dims, [f"blk{i}" for i in range(3)], [Resource("latency", terms, 0.1, budget)],
                   block_value=block_value or {}, min_blocks_kept=min_kept)


@pytest.mark.parametrize("method", PATHS + ("brute",))
@pytest.mark.parametrize("min_kept", [0, 1, 2, 3])
def test_min_blocks_kept_is_respected(method, min_kept):
    problem = _blocks_problem(min_kept, budget=9.0)
    sol = solve(problem, method=method)
    assert len(problem.blocks) - len(sol.removed) >= min_kept
    assert close(sol.objective, brute_force(problem)[2])
    check_solution(problem, sol)


def test_min_blocks_kept_can_make_a_budget_unreachable():
    with pytest.raises(InfeasibleBudget) as err:
        solve(_blocks_problem(3, budget=5.0))
    # all three blocks at their smallest, e at its smallest: 0.1 + 1 + 3 * (1 + 0.5 + 0.25)
    assert err.value.minimum == pytest.approx(6.35)
    assert minimum_usage(_blocks_problem(3, 5.0), "latency") == pytest.approx(6.35)
    assert minimum_usage(_blocks_problem(0, 5.0), "latency") == pytest.approx(1.1)


def test_removed_blocks_lose_their_value_and_cost():
    problem = _blocks_problem(0, budget=1.1)  # only the stem fits: every block goes
    sol = solve(problem)
    assert sorted(sol.removed) == ["blk0", "blk1", "blk2"]
    assert sol.objective == pytest.approx(4.0)
    assert sol.usage["latency"] == pytest.approx(1.1)
    assert all(sol.choice[f"m{i}"] == 0 for i in range(3))
    objective, usage = evaluate(problem, {"e": 1, "m0": 2, "m1": 0, "m2": 1}, removed=["blk1"])
    assert objective == pytest.approx(5.0 + 1.8 + 3 * 1.5)
    assert usage["latency"] == pytest.approx(0.1 + 2.0 + (4.0 + 0.7 + 0.25) + (3.0 + 0.7 + 0.25))


def test_block_value_is_counted_only_for_kept_blocks():
    problem = _blocks_problem(0, budget=3.5, block_value={"blk0": 100.0})
    sol = solve(problem)
    assert "blk0" not in sol.removed
    assert close(sol.objective, brute_force(problem)[2])


def test_a_budget_that_does_not_bind_keeps_everything():
    problem = _blocks_problem(0, budget=1e6)
    for method in PATHS:
        sol = solve(problem, method=method)
        assert sol.removed == [] and all(sol.choice[d.name] == len(d.widths) - 1 for d in problem.dims)


@pytest.mark.parametrize("method", ["decomposition", "milp"])
def test_time_limit_returns_best_found_with_a_consistent_gap(method):
    problem = resnet_problem((3, 4, 6, 3), 1, 0.4)
    sol = solve(problem, method=method, time_limit=0.3)
    assert sol.status in ("optimal", "time_limit")
    check_solution(problem, sol)
    if sol.status == "time_limit":
        assert sol.bound > sol.objective


def test_vit_problem_with_sub_block_decisions_is_solved():
    problem = between(vit_problem(3, 0, 1.0, embed=96, heads=4, head_dim=16, mlp=192, tokens=50,
                                  steps=(16, 1, 2, 16)), [0.3])
    sol = solve(problem)
    assert sol.status == "optimal"
    check_solution(problem, sol)


def test_pareto_knapsack_is_exact():
    rng = np.random.default_rng(0)
    for _ in range(30):
        groups = [(rng.uniform(0, 1, (1, n)), rng.uniform(0, 1, n)) for n in rng.integers(1, 5, 4)]
        capacity = np.array([rng.uniform(0.5, 2.5)])
        values = [sum(g[1][k] for g, k in zip(groups, ks, strict=True))
                  for ks in itertools.product(*(range(len(g[1])) for g in groups))
                  if sum(g[0][0, k] for g, k in zip(groups, ks, strict=True)) <= capacity[0]]
        found = pareto_knapsack(groups, capacity, np.array([rng.uniform(0, 2)]), -np.inf)
        if not values:
            assert found is None
        else:
            assert found is not None and found[0] == pytest.approx(max(values))
            assert sum(g[0][0, k] for g, k in zip(groups, found[1], strict=True)) <= capacity[0]


def test_variable_elimination_is_exact():
    rng = np.random.default_rng(1)
    sizes = [3, 2, 4, 3, 2]
    factors = [((0, 1), rng.normal(size=(3, 2))), ((1, 2, 3), rng.normal(size=(2, 4, 3))),
               ((0, 3), rng.normal(size=(3, 3))), ((3, 4), rng.normal(size=(3, 2))), ((2,), rng.normal(size=4))]
    best = max(sum(t[tuple(x[v] for v in s)] for s, t in factors) for x in itertools.product(*map(range, sizes)))
    (_, table), _ = eliminate(factors, sizes, ())
    assert float(table) == pytest.approx(best)
    (scope, marginal), _ = eliminate(factors, sizes, (1, 3))
    assert scope == (1, 3) and float(marginal.max()) == pytest.approx(best)


def _valid() -> Problem:
    return _two_dims(10.0)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p.dims.append(DimChoice("a", [8], np.array([1.0]))), "duplicate dim name 'a'"),
        (lambda p: setattr(p.dims[0], "widths", [16, 8, 24]), "ascending order"),
        (lambda p: setattr(p.dims[0], "value", np.array([2.0, 1.0, 3.0])), "nondecreasing"),
        (lambda p: setattr(p.dims[0], "value", np.array([1.0, 2.0])), r"value has shape \(2,\), expected \(3,\)"),
        (lambda p: setattr(p.dims[0], "block", "nope"), "unknown block 'nope'"),
        (lambda p: setattr(p.resources[0].terms[0], "dims", ("a", "zz")), "unknown dim 'zz'"),
        (lambda p: setattr(p.resources[0].terms[0], "table", np.ones((2, 2))), r"expected \(3, 2\)"),
        (lambda p: setattr(p.resources[0].terms[0], "table", -np.ones((3, 2))), "negative entries"),
        (lambda p: setattr(p.resources[0].terms[0], "dims", ("a", "b", "a")), "repeats a dim"),
        (lambda p: setattr(p, "min_blocks_kept", 1), r"min_blocks_kept=1 must lie in \[0, 0\]"),
        (lambda p: setattr(p, "resources", []), "at least one resource"),
        (lambda p: setattr(p.resources[0], "budget", float("nan")), "must be finite"),
        (lambda p: p.block_value.update(x=1.0), "unknown block 'x'"),
    ],
)
def test_validation_errors_are_clear(mutate, message):
    problem = _valid()
    mutate(problem)
    with pytest.raises(ValueError, match=message):
        solve(problem)


def test_dims_inside_a_block_are_used_only_by_that_blocks_terms():
    problem = _blocks_problem(0, 10.0)
    problem.resources[0].terms.append(CostTerm("leak", ("m0",), np.ones(3)))  # outside every block
    with pytest.raises(ValueError, match="dims inside a block may only be used by terms of that block"):
        solve(problem)
    problem = _blocks_problem(0, 10.0)
    problem.resources[0].terms.append(CostTerm("cross", ("m0", "m1"), np.ones((3, 3)), "blk0"))
    with pytest.raises(ValueError, match="uses dim 'm1' of block 'blk1'"):
        solve(problem)


def test_unknown_method_and_resource_are_refused():
    with pytest.raises(ValueError, match="unknown method"):
        solve(_valid(), method="magic")
    with pytest.raises(ValueError, match="unknown resource"):
        minimum_usage(_valid(), "energy")


def test_auto_falls_back_to_the_milp_when_the_decomposition_is_too_large(monkeypatch):
    import mdprune.solve.factor as factor

    problem = _blocks_problem(1, budget=7.0)
    monkeypatch.setattr(factor, "MAX_TABLE", 2)
    with pytest.raises(ValueError, match="decomposition does not suit"):
        solve(problem, method="decomposition")
    sol = solve(problem)
    assert sol.method == "milp" and close(sol.objective, brute_force(problem)[2])
