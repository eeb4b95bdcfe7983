"""Masked and slim application of plans, on every supported model family."""

from __future__ import annotations

import pytest
import torch

import mdprune
from mdprune import Plan

from .conftest import MODELS, build, check_plan, rel_err


@pytest.mark.parametrize("key", list(MODELS))
def test_random_plans_slim_equals_masked(key):
    model, x, space = build(key)
    with torch.no_grad():
        dense_out = model(x)
    assert space.prunable_dims(), "nothing prunable found"
    seeds = (0, 1) if key in ("vgg16_bn", "deit_base", "resnet101") else (0, 1, 2)  # the big ones: fewer
    check_plan(space, Plan.identity(), x, dense_out, f"{key} identity")
    for seed in seeds[1:]:
        plan = Plan.random(space, seed=seed, block_prob=0.3)
        assert check_plan(space, plan, x, label=f"{key} seed {seed}"), "random plan pruned nothing"


def test_random_plans_really_prune_blocks_and_widths(resnet18):
    _, x, space = resnet18
    plan = Plan.random(space, seed=3, block_prob=0.5)
    assert plan.removed and plan.keep
    s = mdprune.slim(space, plan)
    names = {n for n, _ in s.named_modules()}
    for b in plan.removed:
        assert not any(m in names for m in space.blocks[b].modules)
    dim, kept = next(iter(plan.keep.items()))
    assert len(kept) < space.dims[dim].size


def test_masked_zeroes_pruned_slices(resnet18):
    _, _, space = resnet18
    plan = Plan.random(space, seed=1, block_prob=0.0)
    m = mdprune.masked(space, plan)
    dim = "layer1.0.conv1"
    pruned = sorted(set(range(space.dims[dim].size)) - set(plan.kept(space)[dim]))
    assert pruned
    w = m.get_submodule("layer1.0.conv1").weight
    bn = m.get_submodule("layer1.0.bn1")
    assert w[pruned].abs().sum() == 0 and w[plan.kept(space)[dim]].abs().sum() > 0
    assert bn.running_mean[pruned].abs().sum() == 0 and bn.weight[pruned].abs().sum() == 0
    consumer = m.get_submodule("layer1.0.conv2").weight
    assert consumer[:, pruned].abs().sum() == 0


def test_slim_attention_separates_qk_and_v_widths(deit_tiny):
    _, x, space = deit_tiny
    keep = {"blocks.0.attn.qk": list(range(0, 64, 2)), "blocks.0.attn.v": list(range(48)),
            "blocks.0.attn.heads": [0, 2]}
    s = mdprune.slim(space, Plan(keep))
    attn = s.get_submodule("blocks.0.attn")
    assert isinstance(attn, mdprune.PrunedAttention)
    assert attn.q.out_features == attn.k.out_features == 2 * 32
    assert attn.v.out_features == 2 * 48 and attn.proj.in_features == 2 * 48
    m = mdprune.masked(space, Plan(keep))
    with torch.no_grad():
        assert rel_err(m(x), s(x)) <= 1e-4


def test_embedding_pruning_slims_tokens_and_norms(deit_tiny):
    _, x, space = deit_tiny
    plan = Plan({"embed": list(range(0, 192, 2))})
    s = mdprune.slim(space, plan)
    assert s.get_parameter("cls_token").shape[-1] == 96
    assert s.get_parameter("pos_embed").shape[-1] == 96
    assert s.get_submodule("norm").normalized_shape == (96,)
    assert s.get_submodule("patch_embed.proj").out_channels == 96
    with torch.no_grad():
        assert rel_err(mdprune.masked(space, plan)(x), s(x)) <= 1e-4


def test_plan_json_round_trip(resnet18):
    _, _, space = resnet18
    plan = Plan.random(space, seed=4)
    again = Plan.from_json(plan.to_json())
    assert again == plan


def test_plan_validation_errors(resnet18):
    _, _, space = resnet18
    with pytest.raises(mdprune.PlanError, match="unknown dimension"):
        Plan({"nope": [0]}).validate(space)
    with pytest.raises(mdprune.PlanError, match="allowed widths"):
        Plan({"conv1": [0, 1, 2]}).validate(space)
    with pytest.raises(mdprune.PlanError, match="protected"):
        Plan({"input": [0]}).validate(space, strict_widths=False)
    with pytest.raises(mdprune.PlanError, match="unknown block"):
        Plan(removed=["layer9"]).validate(space)


def test_slim_from_trained_masked_weights(resnet18):
    """Slimming a masked model that was changed (trained) takes its weights, not the analysed ones."""
    _, x, space = resnet18
    plan = Plan.random(space, seed=2)
    m = mdprune.masked(space, plan)
    with torch.no_grad():
        m.get_submodule("fc").bias.add_(1.0)
    s = mdprune.slim(space, plan, model=m)
    with torch.no_grad():
        assert rel_err(m.eval()(x), s.eval()(x)) <= 1e-4
