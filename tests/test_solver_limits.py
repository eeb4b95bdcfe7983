"""The solver's time limit covers model building and every phase; HiGHS's threads are settable."""

from __future__ import annotations

import time

import pytest

from mdprune.solve import solve
from mdprune.solve.synthetic import random_problem, vit_problem

SLACK = 15.0  # generous: these check that a limit is honoured at all, never a timing


def test_tiny_limit_on_a_large_milp_returns_the_best_found_with_its_gap():
    problem = vit_problem(12, 0, 0.3)  # the monolithic MILP has ~650k columns: building it alone takes ~1 s
    limit = 0.2
    t0 = time.perf_counter()
    sol = solve(problem, method="milp", time_limit=limit)
    wall = time.perf_counter() - t0
    assert sol.status == "time_limit"
    assert wall < limit + SLACK and sol.seconds <= wall
    assert sol.bound >= sol.objective and sol.gap >= 0
    assert sol.usage["latency"] <= problem.resources[0].budget * (1 + 1e-9)


def test_zero_limit_on_the_decomposition_still_returns_a_configuration():
    problem = vit_problem(12, 1, 0.2)
    sol = solve(problem, time_limit=0.0)
    assert sol.status in ("time_limit", "optimal")
    assert sol.bound >= sol.objective and sol.usage["latency"] <= problem.resources[0].budget * (1 + 1e-9)
    assert solve(problem).objective >= sol.objective


@pytest.mark.parametrize("method", ["auto", "milp"])
def test_threads_give_the_same_optimum_and_mix_in_one_process(method):
    for seed in (4, 12):  # two budgets each: the decomposition ends in a MILP too
        problem = random_problem(seed, max_blocks=2, max_dims=5)
        one = solve(problem, method=method, threads=1)
        two = solve(problem, method=method, threads=2)
        again = solve(problem, method=method, threads=1)  # a pool of another size is rebuilt, not an error
        assert one.objective == pytest.approx(two.objective, rel=1e-9) == again.objective


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_bad_threads_are_refused(threads):
    with pytest.raises(ValueError, match="threads"):
        solve(random_problem(0), threads=threads)


def test_negative_time_limit_is_refused():
    with pytest.raises(ValueError, match="time_limit"):
        solve(random_problem(0), time_limit=-1.0)
