"""Importance criteria: magnitude built-ins against hand computations, user plug-ins, the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import mdprune
from mdprune.importance import ImportanceAccumulator, block_key, criterion_names, estimate, register_criterion
from mdprune.importance import criteria as criteria_module


def _net() -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10))
    with torch.no_grad():  # BatchNorm's default gamma=1, beta=0 would hide a slicing mistake
        for bn in (model[1], model[4]):
            bn.weight.uniform_(-2, 2)
            bn.bias.uniform_(-1, 1)
    space = mdprune.analyze(model, torch.randn(2, 3, 6, 6), steps={"channel": 2})
    return model, space


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 10, (4,), generator=g)


def test_magnitude_equals_hand_computation():
    model, space = _net()
    conv1, bn1, conv2, bn2, fc = model[0], model[1], model[3], model[4], model[8]
    # channel c of dim "0": conv1 row c (weight and bias), bn1 gamma/beta c, conv2 input column c
    touched0 = lambda c: [conv1.weight[c], conv1.bias[c:c + 1], bn1.weight[c:c + 1], bn1.bias[c:c + 1],  # noqa: E731
                          conv2.weight[:, c]]
    touched3 = lambda c: [conv2.weight[c], conv2.bias[c:c + 1], bn2.weight[c:c + 1], bn2.bias[c:c + 1],  # noqa: E731
                          fc.weight[:, c]]
    for name, p in (("l1", 1), ("l2", 2)):
        scores = ImportanceAccumulator(space, model, criterion=name).scores(normalize="none")
        for dim, touched, n in (("0", touched0, 8), ("3", touched3, 6)):
            hand = [sum(float(t.detach().double().norm(p)) for t in touched(c)) for c in range(n)]
            np.testing.assert_allclose(scores[dim], hand, rtol=1e-10)


def test_magnitude_blocks_take_the_sum_of_their_own_dims():
    model, x, space = _resnet()
    scores = ImportanceAccumulator(space, model, criterion="l2").scores(normalize="none")
    for b in space.removable_blocks():
        own = sum(scores[d.name].sum() for d in space.prunable_dims() if d.block == b.name)
        assert scores[block_key(b.name)][0] == pytest.approx(own)


def _resnet():
    from .conftest import build

    return build("resnet18")


class _SquaredGate:
    """A gate-form plug-in: records what it was given."""

    def __init__(self) -> None:
        self.calls = 0

    def from_gate_gradients(self, grad: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return grad * grad


class _BatchNorm:
    """A per-batch model-form plug-in: a score from the batch (its mean) times the channel index."""

    per_batch = True

    def __init__(self) -> None:
        self.batches = []

    def from_model(self, model, batch, context):
        self.batches.append(batch)
        level = float(batch[0].abs().mean())
        return {d: level * torch.arange(context.space.dims[d].size, dtype=torch.float64) for d in context.dims}


def _steps(model, acc, data, pass_batch: bool) -> None:
    model.train()
    for x, y in data:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        acc.step((x, y) if pass_batch else None)


def test_gate_plugin_is_called_and_its_scores_used():
    model, space = _net()
    data = [_batch(0), _batch(1)]
    plug = _SquaredGate()
    acc = ImportanceAccumulator(space, model, criterion=plug)
    _steps(model, acc, data, pass_batch=False)
    fisher = ImportanceAccumulator(space, model, criterion="fisher")
    _steps(model, fisher, data, pass_batch=False)
    assert plug.calls >= 2 * 2  # two dims, two batches
    ours, ref = acc.scores("none"), fisher.scores("none")
    for d in ("0", "3"):
        np.testing.assert_allclose(ours[d], 2 * ref[d], rtol=1e-12)  # g^2 against g^2 / 2


def test_batch_plugin_gets_each_batch_and_mixes_with_builtins():
    model, space = _net()
    data = [_batch(0), _batch(1)]
    plug = _BatchNorm()
    acc = ImportanceAccumulator(space, model, criterion={"channel": plug})
    _steps(model, acc, data, pass_batch=True)
    assert len(plug.batches) == 2 and plug.batches[1][0] is data[1][0]
    level = np.mean([float(x.abs().mean()) for x, _ in data])
    scores = acc.scores("none")
    np.testing.assert_allclose(scores["0"], level * np.arange(8), rtol=1e-12)
    state = acc.state()
    assert set(state) == set(acc.sums) | {"__batches__"}


def test_estimate_takes_a_criterion_name_and_a_plugin():
    model, space = _net()
    by_name = estimate(space, model, [_batch(0)], criterion="l1", normalize="none")
    direct = ImportanceAccumulator(space, model, criterion="l1").scores("none")
    np.testing.assert_allclose(by_name["0"], direct["0"])
    plug = _BatchNorm()
    estimate(space, model, [_batch(0), _batch(1)], criterion=plug)
    assert len(plug.batches) == 2


def test_registering_a_name_works(monkeypatch):
    monkeypatch.setattr(criteria_module, "_REGISTRY", dict(criteria_module._REGISTRY))
    plug = _SquaredGate()
    register_criterion("squared-gate", plug)
    assert "squared-gate" in criterion_names()
    model, space = _net()
    acc = ImportanceAccumulator(space, model, criterion="squared-gate")
    _steps(model, acc, [_batch(0)], pass_batch=False)
    assert plug.calls > 0 and acc.criterion["channel"] == "squared-gate"
    with pytest.raises(ValueError, match="already registered"):
        register_criterion("squared-gate", _SquaredGate())
    with pytest.raises(ValueError, match="built-in"):
        register_criterion("taylor", _SquaredGate())
    with pytest.raises(TypeError, match="from_gate_gradients"):
        register_criterion("nothing", object())


def test_unknown_names_are_refused_with_the_known_ones():
    model, space = _net()
    with pytest.raises(ValueError, match=r"unknown importance criterion 'l3'; known: fisher, l1, l2, taylor"):
        ImportanceAccumulator(space, model, criterion="l3")
    with pytest.raises(ValueError, match="known: "):
        ImportanceAccumulator(space, model, criterion={"channel": "magnitude"})
