"""MetaFormer models (timm's CAFormer, ConvFormer, PoolFormerV2): attention heads through the MetaFormer
``Attention`` adapter, and per-channel ``Scale`` layers whose parameter is viewed to a shape written in the code
(``scale.view(dim, 1, 1)``): the slim model's literal follows the pruned width."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import mdprune

from .conftest import check_exact


@pytest.mark.parametrize("name", ["caformer_s18", "convformer_s18"])
def test_metaformer_prunes_exactly(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    space = check_exact(model, torch.randn(1, 3, 64, 64), seeds=(1,))
    kinds = {d.kind for d in space.prunable_dims()}
    assert "channel" in kinds and len(space.blocks) == 36
    if name.startswith("caformer"):
        assert {"heads", "qk", "v"} <= kinds


class ScaledConv(nn.Module):
    """A per-channel scale viewed to a literal shape, as timm's MetaFormer ``Scale`` does."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(16) + 0.5)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((self.conv(x) * self.scale.view(16, 1, 1)).mean((2, 3)))


def test_literal_parameter_view_is_patched() -> None:
    torch.manual_seed(0)
    model = ScaledConv().eval()
    x = torch.randn(2, 3, 8, 8)
    space = check_exact(model, x, seeds=(1,))
    slim = mdprune.slim(space, mdprune.Plan.smallest(space)).eval()
    assert slim.get_submodule("conv").out_channels < 16
    assert slim(x).shape == (2, 4)
