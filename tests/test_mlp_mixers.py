"""MLP-Mixer, ResMLP and gMLP: linear layers that mix tokens (applied to ``x.transpose(1, 2)``) leave the channels
where they are and prune exactly; ResMLP's affine (``torch.addcmul``) follows the channels."""

from __future__ import annotations

import pytest
import timm
import torch

import mdprune

from .conftest import check_exact


@pytest.mark.parametrize("name, kwargs", [
    ("mixer_s16_224", {"img_size": 64}),
    ("resmlp_12_224", {"img_size": 64}),
    ("gmlp_ti16_224", {"img_size": 64}),
])
def test_token_mixing_mlps_prune_exactly(name: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    space = check_exact(model, torch.randn(2, 3, 64, 64), seeds=(1, 2))
    across = [o for o in space.ops if o.kind == "linear_across"]
    assert across and all(16 in (o.fixed["in"], o.fixed["out"]) for o in across)  # 4 x 4 patches of 16 px
    assert len(space.prunable_dims()) >= 3
    from mdprune.latency.ops import op_module

    module, inputs = op_module("linear_across", across[0].fixed, across[0].widths(space.dense_sizes()), 2, "cpu",
                               torch.float32)
    assert module(*inputs).shape[-1] == across[0].fixed["out"]
    plan = mdprune.Plan.smallest(space)
    slim = mdprune.slim(space, plan).eval()
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())
