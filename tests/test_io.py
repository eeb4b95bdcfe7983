"""Saving, loading and exporting slim models."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import mdprune
from mdprune import Plan

from .conftest import build


@pytest.mark.parametrize("key", ["resnet18", "deit_tiny", "tiny_vit", "tiny_cnn"])
def test_save_load_round_trip(key, tmp_path):
    _, x, space = build(key)
    plan = Plan.random(space, seed=5)
    s = mdprune.slim(space, plan).eval()
    path = tmp_path / "model.pt"
    mdprune.save(s, path)
    raw = torch.load(path, weights_only=True)  # nothing but tensors and plain data inside
    assert raw["info"]["plan"] == plan.to_dict()
    again = mdprune.load(path, trust_code=key.startswith("tiny")).eval()  # tiny_*: builders in tests.models
    with torch.no_grad():
        assert torch.equal(s(x), again(x))


def test_deepcopy_keeps_what_save_needs(resnet18, tmp_path):
    _, x, space = resnet18
    original = mdprune.slim(space, Plan.random(space, seed=1)).eval()
    s = copy.deepcopy(original)
    mdprune.save(s, tmp_path / "m.pt")
    loaded = mdprune.load(tmp_path / "m.pt").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), original(x))  # the copy saved the same plan and weights


def test_save_refuses_models_it_cannot_rebuild(tmp_path):
    from .models import TinyCNN

    model = TinyCNN().eval()
    space = mdprune.analyze(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="rebuild"):
        mdprune.save(mdprune.slim(space, Plan()), tmp_path / "m.pt")
    with pytest.raises(ValueError, match="state_dict"):
        mdprune.save(model, tmp_path / "m.pt")


@pytest.mark.parametrize("key", ["tiny_cnn", "tiny_vit"])
def test_onnx_export_matches(key, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    _, x, space = build(key)
    s = mdprune.slim(space, Plan.random(space, seed=2)).eval()
    path = mdprune.export_onnx(s, x, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path))
    x3 = torch.randn(3, *x.shape[1:])  # another batch size: the batch axis is dynamic
    out = sess.run(None, {sess.get_inputs()[0].name: x3.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, s(x3).numpy(), rtol=1e-4, atol=1e-5)
