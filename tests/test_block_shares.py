"""Blocks' shares of shared dimensions from the importance accumulator (MDP's block semantics, issue 14): every
removable block's part of the score of the residual stream it writes into, non-negative and within the score,
normalised with it, switched off on demand, and accepted by the program end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import mdprune
from mdprune.importance import (
    SHARE_PREFIX,
    ImportanceAccumulator,
    block_key,
    estimate,
    normalize_scores,
    share_key,
    share_parts,
)
from mdprune.latency import LatencyModel, LatencyTable, fingerprint
from mdprune.search import build_problem, solve_plan

from .conftest import build


def _batches(x: torch.Tensor, n: int = 2, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*x.shape, generator=g), torch.randint(0, 10, (x.shape[0],), generator=g)) for _ in range(n)]


def _streams(space: mdprune.PruningSpace, block: str) -> list[str]:
    """The prunable dims a block's branch adds into (its residual stream), outside the block."""
    add = space.blocks[block].add_node
    op = next(o for o in space.ops if o.kind == "node" and o.name == add)
    return [d for s in op.roles["width"] for d in s.dims if space.dims[d].prunable and space.dims[d].block != block]


def _shares(scores: dict) -> dict:
    return {k: v for k, v in scores.items() if k.startswith(SHARE_PREFIX)}


def _check_within(space: mdprune.PruningSpace, scores: dict) -> None:
    """Non-negative, and summing over blocks to at most their dimension's score (float32-level tolerance)."""
    total: dict[str, np.ndarray] = {}
    for k, v in _shares(scores).items():
        b, d = share_parts(k)
        assert b in space.blocks and space.blocks[b].removable and space.dims[d].block != b
        assert v.shape == scores[d].shape and np.all(v >= 0)
        total[d] = total.get(d, 0) + v
    for d, t in total.items():
        assert np.all(t <= scores[d] * (1 + 1e-6) + 1e-12), d


@pytest.fixture(scope="module")
def r18():
    model, x, space = build("resnet18")
    data = _batches(x)
    return model, x, space, data, estimate(space, model, data, normalize="none")


def test_every_removable_block_has_a_share_of_its_stream(r18):
    model, x, space, data, raw = r18
    blocks = [b.name for b in space.removable_blocks()]
    assert blocks
    for b in blocks:
        streams = _streams(space, b)
        assert streams, b
        for d in streams:
            assert share_key(b, d) in raw and raw[share_key(b, d)].sum() > 0, (b, d)
    _check_within(space, raw)
    assert all(share_parts(k)[0] in blocks for k in _shares(raw))


def test_switch_removes_the_shares_and_nothing_else(r18):
    model, x, space, data, raw = r18
    off = estimate(space, model, data, normalize="none", block_shares=False)
    assert not _shares(off)
    assert set(off) == set(raw) - set(_shares(raw))
    for k, v in off.items():
        np.testing.assert_allclose(raw[k], v, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("how", ["criterion", "kind"])
def test_normalisation_keeps_each_share_on_its_dimensions_scale(r18, how):
    _, _, space, _, raw = r18
    normal = normalize_scores(space, raw, how)
    plain = normalize_scores(space, {k: v for k, v in raw.items() if not k.startswith(SHARE_PREFIX)}, how)
    for k, v in raw.items():
        if k.startswith(SHARE_PREFIX):
            d = share_parts(k)[1]
            scale = raw[d].sum() / normal[d].sum()
            np.testing.assert_allclose(normal[k] * scale, v, rtol=1e-12)
        else:  # shares count in no mean
            np.testing.assert_allclose(normal[k], plain[k], rtol=1e-12)
    _check_within(space, normal)


def test_state_round_trip_and_loading_into_an_accumulator_without_shares(r18):
    model, _, space, data, _ = r18
    model.train()
    acc = ImportanceAccumulator(space, model)
    for x, y in data:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        acc.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    state = acc.state()
    again = ImportanceAccumulator(space, model)
    again.load_state(state)
    a, b = acc.scores(), again.scores()
    assert set(a) == set(b) and _shares(a)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    without = ImportanceAccumulator(space, model, block_shares=False)
    without.load_state(state)
    plain = without.scores()
    assert set(plain) == set(a) - set(_shares(a))
    acc.close(), again.close(), without.close()


@pytest.mark.parametrize("p", [1, 2])
def test_magnitude_shares_are_the_blocks_own_norms(p):
    """l1/l2 on the tiny CNN: the block ``res`` (conv, BN, ReLU, conv, BN) on the stem's channels: its first conv's
    input columns, its last conv's rows, its last BN's gamma and beta."""
    model, _, space = build("tiny_cnn")
    raw = ImportanceAccumulator(space, model, criterion=f"l{p}").scores("none")
    stream = _streams(space, "res")
    assert stream and set(_shares(raw)) == {share_key("res", d) for d in stream}
    d = stream[0]
    res = model.res
    touched = lambda c: [res[0].weight[:, c], res[3].weight[c], res[4].weight[c:c + 1], res[4].bias[c:c + 1]]  # noqa: E731
    hand = [sum(float(t.detach().double().norm(p)) for t in touched(c)) for c in range(space.dims[d].size)]
    np.testing.assert_allclose(raw[share_key("res", d)], hand, rtol=1e-10)
    _check_within(space, raw)
    off = ImportanceAccumulator(space, model, criterion=f"l{p}", block_shares=False).scores("none")
    assert not _shares(off)


class _Plugin:
    """A model-form user criterion: a constant score; ``share`` of it for every block it may give a share for."""

    per_batch = False

    def __init__(self, share: float | None):
        self.share = share

    def from_model(self, model, batch, context):
        out = {d: torch.ones(context.space.dims[d].size, dtype=torch.float64) for d in context.dims}
        if self.share is not None:
            for d in context.dims:
                for s in context.slices[d]:
                    b = context.share_owner(s.tensor, d)
                    if b is not None:
                        out[share_key(b, d)] = torch.full_like(out[d], self.share)
        return out


def test_model_plugins_give_their_own_shares_or_none():
    model, _, space = build("tiny_cnn")
    d = _streams(space, "res")[0]
    given = ImportanceAccumulator(space, model, criterion={"channel": _Plugin(0.25)}).scores("none")
    assert set(_shares(given)) == {share_key("res", d)}
    np.testing.assert_allclose(given[share_key("res", d)], 0.25)
    assert not _shares(ImportanceAccumulator(space, model, criterion={"channel": _Plugin(None)}).scores("none"))
    assert not _shares(ImportanceAccumulator(space, model, criterion={"channel": _Plugin(0.25)},
                                             block_shares=False).scores("none"))
    with pytest.raises(ValueError, match="shares"):
        ImportanceAccumulator(space, model, criterion={"channel": _Plugin(-1.0)}).scores("none")
    with pytest.raises(ValueError, match="shares"):
        ImportanceAccumulator(space, model, criterion={"channel": _Plugin(2.0)}).scores("none")


def test_transformer_blocks_share_the_embedding():
    model, x, space = build("tiny_vit")
    raw = estimate(space, model, _batches(x), normalize="none")
    for b in space.removable_blocks():
        assert any(share_key(b.name, d) in raw for d in _streams(space, b.name)), b.name
    _check_within(space, raw)


def _latency(space: mdprune.PruningSpace, per_op: float) -> LatencyModel:
    """A deterministic latency model: a cost per op plus a cost per unit of its widths' product."""
    table = LatencyTable(fingerprint())
    lm = LatencyModel(space, table)
    for op, p in lm.needed():
        table.put(op, p, 1e-6 * float(np.prod(p)) + per_op, 0.0)
    lm.calibrate(lm.ops_ms(space.dense_sizes()) + 0.1)
    return lm


def test_end_to_end_estimate_to_plan_at_half_the_latency(r18):
    model, x, space, data, _ = r18
    scores = estimate(space, model, data)
    plain = {k: v for k, v in scores.items() if not k.startswith(SHARE_PREFIX)}
    lm = _latency(space, per_op=0.05)
    budget = 0.5 * lm.predict(space.dense_sizes())
    plan, sol = solve_plan(space, scores, lm, budget)
    assert sol.status == "optimal" and sol.removed and lm.predict_plan(plan) <= budget * (1 + 1e-9)
    copies = {n for n in sol.widths if n not in space.dims}
    assert copies and all(n.split("@share:")[1] in space.blocks for n in copies)
    for n in copies:  # a kept block's copy has its dimension's width
        d, b = n.split("@share:")
        if b not in sol.removed:
            assert sol.widths[n] == sol.widths[d]
    _, ref = solve_plan(space, plain, lm, budget)
    assert sol.objective <= ref.objective + 1e-9  # shares only ever take value away
    slim = mdprune.slim(space, plan).eval()
    with torch.no_grad():
        assert slim(x).shape == (x.shape[0], 10)
    # iterative: from the plan, with its removed blocks' shares in the scores, to a smaller one
    plan2, sol2 = solve_plan(space, scores, lm, 0.8 * budget, current=plan)
    assert set(plan.removed) <= set(plan2.removed) and lm.predict_plan(plan2) <= 0.8 * budget * (1 + 1e-9)
    assert build_problem(space, scores, lm, budget, current=plan2).dims


def test_block_keys_and_shares_come_together(r18):
    _, _, space, _, raw = r18
    for k in _shares(raw):
        assert block_key(share_parts(k)[0]) in raw
