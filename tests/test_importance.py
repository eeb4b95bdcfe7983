"""Importance scores: Taylor on BatchNorm and gate Fisher, checked against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import mdprune
from mdprune.importance import ImportanceAccumulator, estimate, kept_value, share_key

from .conftest import build


def _batches(n: int, shape: tuple[int, ...], classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g), torch.randint(0, classes, (shape[0],), generator=g))
            for _ in range(n)]


def test_taylor_on_batchnorm_equals_hand_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    space = mdprune.analyze(model, torch.randn(2, 3, 6, 6), steps={"channel": 2})
    data = _batches(3, (4, 3, 6, 6))
    acc = ImportanceAccumulator(space, model)
    hand = {"0": np.zeros(8), "3": np.zeros(8)}
    model.train()
    for x, y in data:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        acc.step()
        for dim, bn in (("0", model[1]), ("3", model[4])):
            s = bn.weight * bn.weight.grad + bn.bias * bn.bias.grad
            hand[dim] += s.abs().detach().double().numpy() / len(data)
    scores = acc.scores(normalize="none")
    for dim in hand:
        np.testing.assert_allclose(scores[dim], hand[dim], rtol=1e-6, atol=1e-12 * hand[dim].max())


def test_residual_group_sums_its_batchnorms_before_the_absolute_value():
    model, _, space = build("resnet18")
    acc = ImportanceAccumulator(space, model, dims=["conv1"])
    model.train()
    x, y = _batches(1, (2, 3, 32, 32))[0]
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    acc.step()
    bns = ["bn1", "layer1.0.bn2", "layer1.1.bn2"]  # the stem and layer1's residual stream: one group
    total = sum(model.get_submodule(b).weight * model.get_submodule(b).weight.grad
                + model.get_submodule(b).bias * model.get_submodule(b).bias.grad for b in bns)
    expected = total.abs().detach().double().numpy()  # a float32 sum of three terms: rounding ~1e-7 of the largest
    np.testing.assert_allclose(acc.scores("none")["conv1"], expected, rtol=1e-4, atol=1e-6 * expected.max())


def test_gate_fisher_equals_explicit_gates():
    """Each transformer dimension's score equals (dL/dg)^2 / 2 of a real gate placed where the docs say.

    In float64: a score is a sum of products whose float32 rounding depends on the processor's summation order.
    """
    dense, x, space = build("tiny_vit")
    dense.double()  # the space's traced module shares these parameters
    x = x.double()
    y = torch.tensor([1, 3])
    slim = mdprune.slim(space, mdprune.Plan())  # same function, separate q/k/v: room for hooks
    gates = {}

    def gate(name: str, n: int) -> torch.Tensor:
        gates[name] = torch.ones(n, dtype=torch.float64, requires_grad=True)
        return gates[name]

    attn = slim.get_submodule("blocks.0.attn")
    h, d = attn.heads, attn.qk_dim
    g_mlp = gate("blocks.0.fc1", 64)
    slim.get_submodule("blocks.0.fc2").register_forward_pre_hook(lambda m, a: (a[0] * g_mlp,))
    g_head = gate("blocks.0.attn.heads", h)
    attn.proj.register_forward_pre_hook(lambda m, a: (a[0] * g_head.repeat_interleave(d),))
    g_q = gate("blocks.0.attn.qk", d)
    attn.q.register_forward_hook(lambda m, a, out: out * g_q.repeat(h))
    g_v = gate("blocks.0.attn.v", d)
    attn.v.register_forward_hook(lambda m, a, out: out * g_v.repeat(h))
    slim.train()
    nn.functional.cross_entropy(slim(x), y).backward()

    scores = estimate(space, dense, [(x, y)], normalize="none")
    for name, g in gates.items():
        np.testing.assert_allclose(scores[name], 0.5 * g.grad.numpy() ** 2, rtol=1e-7, atol=1e-20)


def test_estimate_restores_model_state_and_normalises():
    model, x, space = build("tiny_cnn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = estimate(space, model, _batches(2, (4, 3, 8, 8)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training and all(p.grad is None for p in model.parameters())
    allv = np.concatenate([scores[d.name] for d in space.prunable_dims()])
    assert allv.mean() == pytest.approx(1.0)
    assert set(scores) == {d.name for d in space.prunable_dims()} | {f"block:{b}" for b in space.blocks} \
        | {share_key(b.name, "stem") for b in space.removable_blocks()}


def test_kept_value_is_cumulative_top_scores():
    v = kept_value(np.array([0.1, 3.0, 2.0, 0.5]), [1, 2, 4])
    np.testing.assert_allclose(v, [3.0, 5.0, 5.6])
