"""One-dimensional convolutions: ECA attention (a Conv1d slid along the pooled channels) keeps those channels whole
and the rest of the network prunable; a Conv1d over a sequence prunes like a convolution."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import CecaModule, EcaModule
from torch import nn

import mdprune

from .conftest import check_exact, check_plan, randomize_norms


class EcaNet(nn.Module):
    def __init__(self, attn: type[nn.Module]):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.attn = attn(channels=24)
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(self.mid(self.stem(x))).mean((2, 3)))


@pytest.mark.parametrize("attn", [EcaModule, CecaModule])
def test_eca_keeps_its_channels_whole(attn: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = randomize_norms(EcaNet(attn)).eval()
    x = torch.randn(2, 3, 12, 12)
    space = check_exact(model, x, seeds=(1,))
    assert check_plan(space, mdprune.Plan.smallest(space), x)
    prunable = {d.name for d in space.prunable_dims()}
    assert "stem.0" in prunable and "mid.0" not in prunable  # the channels ECA slides along stay whole
    assert any("neighbours" in (d.protected or "") for d in space.dims.values())


def test_ecaresnet() -> None:
    """timm's ECA-ResNet: every bottleneck's inner widths prunable; the channels its ECA reads kept."""
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model("ecaresnet26t", num_classes=10)).eval()
    space = check_exact(model, torch.randn(1, 3, 32, 32), seeds=(1,))
    assert len(space.prunable_dims()) >= 16


class Seq1d(nn.Module):
    """Conv1d over a flattened feature map (channels on axis 1): dense, then depthwise."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 4, 1)
        self.a = nn.Sequential(nn.Conv1d(4, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv1d(16, 16, 5, padding=2, groups=16), nn.BatchNorm1d(16), nn.ReLU())
        self.b = nn.Conv1d(16, 12, 1)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(self.dw(self.a(self.embed(x).flatten(2)))).mean(2))


def test_conv1d_over_a_sequence_prunes_like_a_convolution() -> None:
    torch.manual_seed(0)
    model = randomize_norms(Seq1d()).eval()
    x = torch.randn(2, 3, 4, 5)
    space = check_exact(model, x, seeds=(1, 2, 3))
    assert {"a.0", "b"} <= {d.name for d in space.prunable_dims()}
    assert {o.kind for o in space.ops} >= {"conv1d"}
    slim = mdprune.slim(space, mdprune.Plan.smallest(space)).eval()
    assert slim.get_submodule("dw.0").groups == slim.get_submodule("dw.0").in_channels < 16


def test_conv1d_latency_ops_build_at_their_widths() -> None:
    from mdprune.latency.ops import op_module

    for model, x in ((Seq1d(), torch.randn(1, 3, 4, 5)), (EcaNet(CecaModule), torch.randn(1, 3, 8, 8))):
        space = mdprune.analyze(model.eval(), x)
        ops = [o for o in space.ops if o.kind in ("conv1d", "conv1d_along_channels")]
        assert ops
        for op in ops:
            module, inputs = op_module(op.kind, op.fixed, op.widths(space.dense_sizes()), 1, "cpu", torch.float32)
            assert module(*inputs).ndim == 3
