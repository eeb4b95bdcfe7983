"""One-shot pruning in one call, and the program it builds (ablation switches, extra budgets)."""

from __future__ import annotations

import pytest
import torch

import mdprune
from mdprune.latency import LatencyModel, LatencySettings, LatencyTable, TimingSettings, fingerprint
from mdprune.one_call import prune
from mdprune.search import build_problem, parse_budget, plan_from_solution, solve_plan
from mdprune.solve import InfeasibleBudget, evaluate, solve

from .conftest import build

# measurements from operation counts, not a clock: what these tests check must not hang on the machine's load
FAST = LatencySettings(grid_points=3, grid_points_3d=2, backend="flops",
                       timing=TimingSettings(warmup=1, reps=2, rounds=2, min_sample_ms=0.2))


def _data(x: torch.Tensor, n: int = 3):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, *x.shape[1:], generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(n)]


def _fake(space: mdprune.PruningSpace) -> LatencyModel:
    """A latency model on a table filled with a smooth function of the widths (no timing)."""
    table = LatencyTable(fingerprint())
    lm = LatencyModel(space, table)
    for op, p in lm.needed():
        table.put(op, p, 1e-3 * float(torch.tensor(p, dtype=torch.float64).prod()) + 0.01, 0.0)
    lm.calibrate(lm.ops_ms(space.dense_sizes()) + 0.1)
    return lm


def _scores(space: mdprune.PruningSpace) -> dict:
    g = torch.Generator().manual_seed(1)
    return {d.name: torch.rand(d.size, generator=g).double().numpy() for d in space.prunable_dims()}


@pytest.mark.parametrize("key", ["tiny_cnn", "tiny_vit"])
def test_prune_returns_a_slim_model_meeting_the_predicted_budget(key, tmp_path):
    model, x, space = build(key)
    slim, report = prune(model, x, "90%", data=_data(x), lut=tmp_path, settings=FAST, space=space)
    kept = [c for c in report.checks if c["kept"]]  # measured beside the dense model; re-solved if it missed
    assert len(kept) == 1 and report.checks[0]["budget_ms"] == report.target_ms
    assert report.predicted_ms <= kept[0]["budget_ms"] * (1 + 1e-6)
    assert report.measured_ms == kept[0]["measured_ms"]
    assert report.solver["status"] == "optimal" and report.measured_ms > 0
    assert sum(p.numel() for p in slim.parameters()) == report.params[1] <= report.params[0]
    with torch.no_grad():
        assert slim(x).shape == model(x).shape


def test_prune_takes_constraints_and_the_older_names_alike(tmp_path):
    model, x, space = build("tiny_cnn")
    kw = dict(data=_data(x), lut=tmp_path, settings=FAST, space=space, log=lambda _: None)
    slim, report = prune(model, x, constraints={"latency": "90%", "params": "80%"}, **kw)
    assert [r["name"] for r in report.constraints] == ["latency", "params"]
    assert all(r["satisfiable"] for r in report.constraints) and report.target_ms < report.dense_ms
    assert sum(p.numel() for p in slim.parameters()) == report.params[1] <= 0.8 * report.params[0]
    _, same = prune(model, x, "90%", params="80%", **kw)  # budget= and params= are the same constraints
    assert same.plan == report.plan and same.constraints == report.constraints
    with pytest.raises(ValueError, match="given twice"):
        prune(model, x, "50%", constraints={"latency": "40%"}, **kw)
    with pytest.raises(ValueError, match="cannot read budget"):
        prune(model, x, constraints={"macs": "lots"}, **kw)


def test_unreachable_budget_states_the_smallest_latency():
    _, _, space = build("tiny_vit")
    lm = _fake(space)
    problem = build_problem(space, _scores(space), lm, 1e-6)
    with pytest.raises(InfeasibleBudget, match="smallest reachable") as e:
        solve(problem)
    assert e.value.minimum > 0


def test_ablation_switches_change_the_problem():
    _, _, space = build("resnet18")
    lm, scores = _fake(space), _scores(space)
    full = build_problem(space, scores, lm, 1.0)
    assert full.blocks and any(d.block for d in full.dims) and any(t.block for t in full.resources[0].terms)
    channels = build_problem(space, scores, lm, 1.0, blocks=False)
    assert not channels.blocks and not any(d.block for d in channels.dims)
    assert not any(t.block for t in channels.resources[0].terms)
    linear = build_problem(space, scores, LatencyModel(space, lm.table, mode="linear"), 1.0)
    conv = {t.name: t for t in full.resources[0].terms}["layer1.0.conv2"]
    conv_linear = {t.name: t for t in linear.resources[0].terms}["layer1.0.conv2"]
    assert conv.dims == ("layer1.0.conv1", "conv1") and conv_linear.dims == ("conv1",)  # input frozen


def test_param_and_mac_budgets_count_what_the_space_counts():
    _, _, space = build("deit_tiny")
    problem = build_problem(space, _scores(space), _fake(space), 1e9, params=1e12, macs=1e15)
    for seed in range(3):
        plan = mdprune.Plan.random(space, seed=seed, block_prob=0.3)
        sizes = plan.sizes(space)
        choice = {d.name: d.widths.index(sizes[d.name]) for d in problem.dims}
        _, usage = evaluate(problem, choice, plan.removed)
        assert usage["params"] == pytest.approx(space.count_params(sizes, set(plan.removed)))
        assert usage["macs"] == pytest.approx(space.count_macs(sizes, set(plan.removed)))


def test_solution_plan_keeps_the_top_scored_elements():
    _, _, space = build("tiny_cnn")
    scores = _scores(space)
    lm = _fake(space)
    sol = solve(build_problem(space, scores, lm, 0.9 * lm.predict(space.dense_sizes())))
    plan = plan_from_solution(space, sol, scores)
    for name, kept in plan.keep.items():
        order = sorted(range(len(scores[name])), key=lambda i: -scores[name][i])
        assert kept == sorted(order[:len(kept)])


def test_budget_parsing():
    assert parse_budget("50%", 8.0) == 4.0 and parse_budget(3, 8.0) == 3.0 and parse_budget("2.5ms", 1) == 2.5
    with pytest.raises(ValueError, match="cannot read budget"):
        parse_budget("fast", 1.0)


def _fake_measurements(lm: LatencyModel, error: float):
    """measure_models as if the slim model ran ``error`` slower than predicted (the dense one as predicted)."""
    from mdprune.latency import Measurement

    plans = []

    def measure(models):
        plan = plans[-1]
        return {"dense": Measurement(lm.predict(lm.space.dense_sizes()), 0.0),
                "pruned": Measurement(lm.predict_plan(plan) * (1 + error), 0.0)}
    return plans, measure


@pytest.mark.parametrize("error, rounds", [(0.25, 3), (0.25, 0), (0.0, 3), (-0.25, 3)])
def test_a_plan_is_solved_again_until_its_measured_latency_fits_the_budget(error, rounds):
    from mdprune.search import measured as budget_check

    _, _, space = build("tiny_cnn")
    lm, scores = _fake(space), _scores(space)
    dense = lm.predict(space.dense_sizes())
    target = 0.7 * dense
    plans, fake = _fake_measurements(lm, error)
    budgets = []

    def solve_at(ms):
        budgets.append(ms)
        plan, _ = solve_plan(space, scores, lm, ms)
        plans.append(plan)
        return plan, ms

    plan, solver_budget, checks = budget_check.solve_within_measured_budget(space, lm, FAST, solve_at, target,
                                                                            dense, rounds=rounds, measure=fake)
    assert len(checks) == len(budgets) <= rounds + 1 and budgets[0] == target
    assert [c["budget_ms"] for c in checks] == budgets
    kept = [i for i, c in enumerate(checks) if c["kept"]]
    assert len(kept) == 1 and plan is plans[kept[0]] and solver_budget == budgets[kept[0]]
    if error == 0.0 or rounds == 0:  # an exact model, or no re-solve allowed: one solve
        assert len(budgets) == 1
    elif error > 0:  # the model under-predicts: tighter budgets until the measurement fits
        assert checks[0]["fraction"] > checks[0]["target_fraction"] * 1.03
        assert budgets[1] < target and checks[kept[0]]["fraction"] <= checks[kept[0]]["target_fraction"] * 1.03
    else:  # the model over-predicts: the first plan fits with room to spare; a looser budget uses it
        assert checks[0]["fraction"] < checks[0]["target_fraction"] * 0.94
        assert budgets[1] > target and solver_budget > target
        assert checks[0]["fraction"] < checks[kept[0]]["fraction"] <= checks[kept[0]]["target_fraction"] * 1.03


def test_when_the_budget_cannot_be_tightened_further_the_last_plan_is_kept():
    from mdprune.search import measured as budget_check

    _, _, space = build("tiny_cnn")
    lm, scores = _fake(space), _scores(space)
    dense = lm.predict(space.dense_sizes())
    plans, fake = _fake_measurements(lm, 20.0)  # no plan of this space measures within the budget
    said = []

    def solve_at(ms):
        plan, _ = solve_plan(space, scores, lm, ms)
        plans.append(plan)
        return plan, ms

    plan, budget, checks = budget_check.solve_within_measured_budget(space, lm, FAST, solve_at, 0.7 * dense, dense,
                                                                     rounds=5, log=said.append, measure=fake)
    assert any("cannot tighten further" in s and "keeping the last plan" in s for s in said)
    assert plan is plans[-1] and not any(c["kept"] for c in checks[:-1]) and checks[-1]["kept"]
    assert checks[-1]["fraction"] > checks[-1]["target_fraction"]
