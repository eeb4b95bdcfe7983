"""Blocks valued by a gate on their branch (never removed for free); ops on wide concatenations split into terms."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mdprune
from mdprune.apply import prepare_masked
from mdprune.apply.mask import GATES, gate_name
from mdprune.importance import ImportanceAccumulator, block_key, block_probes, estimate
from mdprune.latency import LatencyModel, LatencyTable, fingerprint
from mdprune.latency.model import interpolate, role_widths
from mdprune.search import build_problem, plan_from_solution
from mdprune.solve import evaluate, solve

from .conftest import build, randomize_norms


class GroupedBlocks(nn.Module):
    """Residual blocks holding only a grouped convolution (kept whole) and a BatchNorm; a prunable conv after."""

    def __init__(self, width: int = 16, blocks: int = 3, tail: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=4, bias=False),
                                                  nn.BatchNorm2d(width)) for _ in range(blocks))
        self.tail = nn.Sequential(nn.Conv2d(width, tail, 1, bias=False), nn.BatchNorm2d(tail), nn.ReLU())
        self.fc = nn.Linear(tail, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for b in self.blocks:
            x = F.relu(x + b(x))
        return self.fc(F.adaptive_avg_pool2d(self.tail(x), 1).flatten(1))


class TanhBranch(nn.Module):
    """A block whose branch ends in a function (no module, not linear): only a gate reads it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + torch.tanh(self.conv(x))
        return self.fc(x.mean(dim=(2, 3)))


class TinyDense(nn.Module):
    """DenseNet-like: every layer reads the concatenation of the stem's and all earlier layers' outputs."""

    def __init__(self, layers: int = 5, growth: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, growth, 3, padding=1, bias=False)
        widths = [growth * (i + 1) for i in range(layers)]
        self.layers = nn.ModuleList(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, growth, 3, padding=1))
                                    for c in widths)
        self.norm = nn.BatchNorm2d(growth * (layers + 1))
        self.fc = nn.Linear(growth * (layers + 1), 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [self.stem(x)]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        y = F.relu(self.norm(torch.cat(feats, 1)))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def _batches(n: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g).to(dtype), torch.randint(0, 10, (shape[0],), generator=g))
            for _ in range(n)]


def _table_model(space: mdprune.PruningSpace, fn) -> LatencyModel:
    """A latency model on a table filled with ``fn(point)`` (no timing)."""
    table = LatencyTable(fingerprint())
    lm = LatencyModel(space, table)
    for op, p in lm.needed():
        table.put(op, p, float(fn(p)), 0.0)
    lm.calibrate(lm.ops_ms(space.dense_sizes()) + 0.1)
    return lm


def _bilinear(p: tuple[int, ...]) -> float:
    return 1e-3 * math.prod(p) + 0.01


def _curved(p: tuple[int, ...]) -> float:
    return 1e-3 * p[0] ** 1.4 * math.prod(p[1:]) + 0.01  # not linear in the first role's width


def _table_ms(lm: LatencyModel, sizes: dict[str, int]) -> float:
    """Every op read from its table at its real widths (no split form)."""
    total = 0.0
    for i, g in enumerate(lm.grids):
        w = g.op.widths(sizes)
        q = [np.asarray(w[r]) for r in g.roles]
        if g.op.kind == "conv2d" and g.op.fixed["depthwise"]:
            q[0] = q[1]
        total += float(interpolate(g.axes, lm._grid_values()[i], q))
    return total


def _choice(problem, sizes: dict[str, int]) -> dict[str, int]:
    return {d.name: d.widths.index(sizes[d.name]) for d in problem.dims}


# ---- blocks --------------------------------------------------------------------------------------------------


def test_blocks_with_nothing_prunable_inside_get_a_value_and_are_not_all_removed():
    torch.manual_seed(0)
    model = randomize_norms(GroupedBlocks()).eval()
    space = mdprune.analyze(model, torch.randn(2, 3, 8, 8))
    blocks = [b.name for b in space.removable_blocks()]
    assert len(blocks) == 3 and all(d.block is None for d in space.prunable_dims())  # nothing prunable inside
    scores = estimate(space, model, _batches(3, (4, 3, 8, 8)))
    assert all(scores[block_key(b)].item() > 0 for b in blocks)
    lm = _table_model(space, _bilinear)
    dense = lm.predict(space.dense_sizes())
    problem = build_problem(space, scores, lm, 0.9 * dense)
    assert problem.block_value == {b: pytest.approx(scores[block_key(b)].item()) for b in blocks}
    sol = solve(problem)
    assert sol.status == "optimal" and len(sol.removed) < len(blocks)
    plan = plan_from_solution(space, sol, scores)
    assert lm.predict_plan(plan) <= 0.9 * dense * (1 + 1e-9)
    # the same problem without block values (nor their shares of the stream) removes every block: they were free
    dims_only = {k: v for k, v in scores.items() if not k.startswith(("block:", "share:"))}
    assert len(solve(build_problem(space, dims_only, lm, 0.9 * dense)).removed) == len(blocks)


def test_block_gate_from_parameters_equals_hook_and_masked_gate():
    """On a block ending in BatchNorm: sum(p dL/dp) over gamma and beta, a hooked gate, the masked model's gate."""
    torch.manual_seed(0)
    model = randomize_norms(GroupedBlocks()).double().train()
    space = mdprune.analyze(model, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    data = _batches(2, (4, 3, 8, 8), torch.float64)
    by_params = block_probes(space, model)
    by_hooks = block_probes(space, model, use_params=False)
    assert {p.how for p in by_params.values()} == {"params"} and {p.how for p in by_hooks.values()} == {"hook"}
    masked = prepare_masked(space, model).double().train()  # its gates too
    gates = {b: getattr(masked.get_submodule(GATES), gate_name(b)) for b in by_params}
    for g in gates.values():
        g.requires_grad_(True)
    accs = [ImportanceAccumulator(space, model, dims=[]),
            ImportanceAccumulator(space, model, dims=[], block_params=False)]
    expected = {b: 0.0 for b in by_params}
    for x, y in data:
        out = [model(x), masked(x)]
        assert torch.equal(out[0], out[1])  # a gate of value 1 changes nothing
        model.zero_grad()
        F.cross_entropy(out[0], y).backward()
        for a in accs:
            a.step()
        F.cross_entropy(out[1], y).backward()
        for b, g in gates.items():
            expected[b] += abs(g.grad.item()) / len(data)
            g.grad = None
    for a in accs:
        got = a.scores("none")
        a.close()
        for b in by_params:
            assert got[block_key(b)].item() == pytest.approx(expected[b], rel=1e-9, abs=1e-15)
    assert all(not m._forward_hooks for m in model.modules())


def test_attention_blocks_read_through_a_hook_on_the_module_output():
    """nn.MultiheadAttention returns a tuple: the gate goes on item 0. Fisher for the embedding stream."""
    model, x, space = build("tiny_vit")
    model.double()
    probes = block_probes(space, model)
    assert {p.how for p in probes.values()} == {"hook", "params"}
    assert all(p.index == 0 for p in probes.values() if p.how == "hook")
    masked = prepare_masked(space, model).double().train()  # its gates too
    gates = {b: getattr(masked.get_submodule(GATES), gate_name(b)) for b in probes}
    for g in gates.values():
        g.requires_grad_(True)
    x, y = x.double(), torch.tensor([1, 3])
    F.cross_entropy(masked(x), y).backward()
    scores = estimate(space, model, [(x, y)], normalize="none")
    for b, g in gates.items():
        assert scores[block_key(b)].item() == pytest.approx(0.5 * g.grad.item() ** 2, rel=1e-9, abs=1e-30)


def test_state_carries_block_sums_and_a_function_branch_falls_back_to_the_masked_gate():
    torch.manual_seed(0)
    model = TanhBranch().double()
    space = mdprune.analyze(model, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    (b,) = [blk.name for blk in space.removable_blocks()]
    assert block_probes(space, model)[b] is None
    with pytest.raises(ValueError, match="masked model"):
        ImportanceAccumulator(space, model)
    x, y = _batches(1, (4, 3, 8, 8), torch.float64)[0]
    masked = prepare_masked(space, model).double().train()  # its gates too
    gate = getattr(masked.get_submodule(GATES), gate_name(b)).requires_grad_(True)
    F.cross_entropy(masked(x), y).backward()
    scores = estimate(space, model, [(x, y)], normalize="none")
    assert scores[block_key(b)].item() == pytest.approx(abs(gate.grad.item()), rel=1e-9)
    acc = ImportanceAccumulator(space, prepare_masked(space, model))
    assert block_key(b) in acc.state()  # summed across processes with the dimensions' sums
    acc.close()


# ---- concatenations --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dense_space():
    torch.manual_seed(0)
    model = randomize_norms(TinyDense()).eval()
    return mdprune.analyze(model, torch.randn(2, 3, 8, 8), steps={"channel": 2})


def test_concatenated_role_widths_without_the_cartesian_product(dense_space):
    space = dense_space
    last = next(op for op in space.ops if op.name == "layers.4.2")
    assert len(last.dims()) == 6
    segs = last.roles["in"]
    dims = sorted({d for s in segs for d in s.dims})
    brute = sorted({sum(c) for c in itertools.product(*[space.dims[d].widths() for d in dims])})
    assert role_widths(space, segs) == brute


def test_split_terms_are_exact_for_a_table_linear_in_the_concatenated_width(dense_space):
    space = dense_space
    lm = _table_model(space, _bilinear)
    split = lm.split_errors()
    assert "layers.4.2" in split and max(split.values()) < 1e-9
    dense = lm.predict(space.dense_sizes())
    problem = build_problem(space, {d.name: np.ones(d.size) for d in space.prunable_dims()}, lm, 0.6 * dense,
                            params=1e9, macs=1e12)
    assert max(len(t.dims) for r in problem.resources for t in r.terms) <= 3
    for seed in range(4):
        plan = mdprune.Plan.random(space, seed=seed)
        sizes = plan.sizes(space)
        _, usage = evaluate(problem, _choice(problem, sizes))
        assert usage["latency"] == pytest.approx(lm.predict(sizes), rel=1e-9)
        assert lm.ops_ms(sizes) == pytest.approx(_table_ms(lm, sizes), rel=1e-9)
        assert usage["params"] == space.count_params(sizes) and usage["macs"] == space.count_macs(sizes)
    sol = solve(problem)
    plan = plan_from_solution(space, sol, {})
    assert sol.status == "optimal" and lm.predict_plan(plan) == pytest.approx(sol.usage["latency"], rel=1e-9)
    assert sol.usage["latency"] <= 0.6 * dense * (1 + 1e-9)


def test_split_error_on_a_curved_table_is_bounded_by_the_reported_fit(dense_space):
    space = dense_space
    lm = _table_model(space, _curved)
    worst = max(lm.split_errors().values())
    assert 0 < worst < 0.5  # relative, largest at the narrowest widths
    split = {g.op.name for g in lm.grids if g.split is not None}
    for seed in range(4):
        sizes = mdprune.Plan.random(space, seed=seed).sizes(space)
        approx = sum(lm.op_ms(i, sizes) for i, g in enumerate(lm.grids) if g.op.name in split)
        exact = sum(float(interpolate(g.axes, lm._grid_values()[i], [np.asarray(v) for v in g.op.widths(sizes)
                                                                     .values()]))
                    for i, g in enumerate(lm.grids) if g.op.name in split)
        assert abs(approx - exact) <= 2 * worst * exact


@pytest.mark.parametrize("name,steps", [("googlenet", None), ("densenet121", {"channel": 16})])
def test_concatenation_heavy_torchvision_models_build_and_solve(name, steps):
    torch.manual_seed(0)
    model = mdprune.create_model(name, num_classes=10).eval()
    space = mdprune.analyze(model, torch.randn(1, 3, 64, 64), steps=steps)
    assert max(len([d for d in op.dims() if space.dims[d].prunable]) for op in space.ops) > 3
    lm = _table_model(space, _bilinear)
    dense = lm.predict(space.dense_sizes())
    scores = {d.name: np.random.default_rng(0).random(d.size) for d in space.prunable_dims()}
    problem = build_problem(space, scores, lm, 0.9 * dense, params=1e12, macs=1e15)
    sizes = mdprune.Plan.random(space, seed=0).sizes(space)
    _, usage = evaluate(problem, _choice(problem, sizes))
    assert usage["params"] == space.count_params(sizes) and usage["macs"] == space.count_macs(sizes)
    assert usage["latency"] == pytest.approx(lm.predict(sizes), rel=1e-9)
    problem.resources = problem.resources[:1]  # the latency alone: the solve stays short
    sol = solve(problem, time_limit=8)  # a proven optimum takes densenet121 ~15 s here: the best found is enough
    assert sol.status in ("optimal", "time_limit") and sol.usage["latency"] <= 0.9 * dense * (1 + 1e-9)
    plan = plan_from_solution(space, sol, scores)
    assert lm.predict_plan(plan) == pytest.approx(sol.usage["latency"], rel=1e-9)
