"""MDP's block semantics: a removed block's share of a dimension it shares with the rest of the network (a ResNet
block's last BatchNorm on the stage's channels) leaves the objective with it, exactly."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mdprune
from mdprune.importance import SHARE_PREFIX, estimate, probes, share_key
from mdprune.search import build_problem, plan_from_solution
from mdprune.solve import evaluate, solve

from .conftest import fake_latency_model, randomize_norms


class TinyResNet(nn.Module):
    """A stem and three residual blocks on one 8-channel stage (the shared dimension), then a classifier."""

    def __init__(self, width: int = 8, blocks: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.ModuleList(nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)) for _ in range(blocks))
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for b in self.blocks:
            x = F.relu(x + b(x))
        return self.fc(x.mean(dim=(2, 3)))


def _shares(space: mdprune.PruningSpace, model: nn.Module, batches, scores: dict) -> dict:
    """By hand, each removable block's share of every dimension outside it: the dimension's score split in proportion to
    the mean absolute gate gradient each source (the block's own parameters, or the rest) contributes."""
    owner = {t: b.name for b in space.removable_blocks() for t in b.tensors}
    named = dict(model.named_parameters())
    mags: dict[tuple[str, str | None], torch.Tensor] = {}
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        per: dict[tuple[str, str | None], torch.Tensor] = {}
        for p in probes(space):
            if space.dims[p.dim].block is not None:
                continue
            t = named[p.tensor]
            g = (t.detach() * t.grad).double()
            g = g.sum(dim=[a for a in range(g.dim()) if a != p.axis]) if g.dim() > 1 else g
            key = (p.dim, owner.get(p.tensor))
            per[key] = per.get(key, 0) + g[p.start:p.start + space.dims[p.dim].size]
        for k, g in per.items():
            mags[k] = mags.get(k, 0) + g.abs()
    out = {}
    for d in {k[0] for k in mags}:
        total = sum(v for k, v in mags.items() if k[0] == d)
        for (dim, b), v in mags.items():
            if dim == d and b is not None:
                out[share_key(b, d)] = (torch.as_tensor(scores[d]) * v / total.clamp_min(1e-30)).numpy()
    return out


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = randomize_norms(TinyResNet()).train()
    x = torch.randn(2, 3, 8, 8)
    space = mdprune.analyze(model.eval(), x, steps={"channel": 4})
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(3)]
    scores = estimate(space, model, batches, block_shares=False)
    shares = {k: v for k, v in estimate(space, model, batches).items() if k.startswith(SHARE_PREFIX)}
    return space, scores, shares, _shares(space, model.train(), batches, scores)


def test_the_accumulators_shares_are_the_hand_computed_ones(setup):
    _, _, shares, hand = setup
    assert sorted(shares) == sorted(hand)
    for k, v in hand.items():
        np.testing.assert_allclose(shares[k], v, rtol=1e-9, atol=1e-12)


def test_each_block_has_a_share_of_the_stage_dimension(setup):
    space, scores, shares, _ = setup
    stage = [d.name for d in space.prunable_dims() if d.block is None]
    blocks = [b.name for b in space.removable_blocks()]
    assert len(stage) == 1 and len(blocks) == 3
    assert sorted(shares) == sorted(share_key(b, stage[0]) for b in blocks)
    total = sum(shares.values())
    assert np.all(total <= scores[stage[0]] + 1e-12) and np.all(total > 0)


def test_a_removed_blocks_share_leaves_the_objective_exactly(setup):
    """For every configuration: the program's objective is the kept elements' scores minus the shares of the
    removed blocks on the elements the plan keeps (the highest-scoring ones), plus the kept blocks' values."""
    space, scores, shares, _ = setup
    lm = fake_latency_model(space)
    plain = build_problem(space, scores, lm, 1e9)
    shared = build_problem(space, {**scores, **shares}, lm, 1e9)
    stage = next(d.name for d in space.prunable_dims() if d.block is None)
    dims = {d.name: d for d in plain.dims}
    order = np.argsort(-np.asarray(scores[stage]), kind="stable")
    for removed in itertools.chain.from_iterable(itertools.combinations(plain.blocks, k) for k in range(4)):
        for choice in itertools.product(*[range(len(d.widths)) for d in plain.dims]):
            pick = dict(zip(dims, choice, strict=True))
            ties = {f"{stage}@share:{b}": pick[stage] for b in plain.blocks}
            value, usage = evaluate(shared, {**pick, **ties}, removed)
            base, _ = evaluate(plain, pick, removed)
            kept = order[:dims[stage].widths[pick[stage]]]
            gone = sum(float(shares[share_key(b, stage)][kept].sum()) for b in removed)
            assert value == pytest.approx(base - gone, rel=1e-12, abs=1e-12)
            assert usage["block shares tie"] == 0.0
            if pick[stage] > 0:  # a copy at another width than its dimension breaks the tie while its block is kept
                _, bad = evaluate(shared, {**pick, **ties, f"{stage}@share:{plain.blocks[0]}": 0}, removed)
                assert (bad["block shares tie"] > 0) == (plain.blocks[0] not in removed)


@pytest.mark.parametrize("fraction", [0.45, 0.6, 0.8])
def test_the_solver_optimum_is_exact_and_its_plan_reads_back(setup, fraction):
    space, scores, shares, _ = setup
    lm = fake_latency_model(space)
    budget = fraction * lm.predict(space.dense_sizes())
    problem = build_problem(space, {**scores, **shares}, lm, budget)
    auto, brute = solve(problem), solve(problem, method="brute")
    assert auto.objective == pytest.approx(brute.objective, rel=1e-9)
    stage = next(d.name for d in space.prunable_dims() if d.block is None)
    for b in space.removable_blocks():
        if b.name not in auto.removed:
            assert auto.widths[f"{stage}@share:{b.name}"] == auto.widths[stage]
    plan = plan_from_solution(space, auto, scores)
    assert set(plan.removed) == set(auto.removed) and plan.sizes(space)[stage] == auto.widths[stage]
    assert lm.predict_plan(plan) <= budget * (1 + 1e-9)
    # removing blocks costs their shares now: never a higher objective than the program without them
    assert auto.objective <= solve(build_problem(space, scores, lm, budget)).objective + 1e-9
