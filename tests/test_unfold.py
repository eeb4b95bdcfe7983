"""Unfold and fold: patches of channels (channel-major, each channel widened by its patch) prune exactly;
TNT (pixel embedding by nn.Unfold) slims exactly; a softmax across channels keeps them whole."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

import mdprune

from .conftest import check_exact, check_plan, randomize_norms


class Patches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.unfold = nn.Unfold(3, padding=1)
        self.weights = nn.Linear(16, 9)  # per-position weights over each 3 x 3 patch, softmaxed (kept whole)
        self.b = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        n, c, h, w = y.shape
        p = self.unfold(y).view(n, c, 9, h * w)  # channel-major patches
        att = self.weights(y.flatten(2).transpose(1, 2)).softmax(-1).transpose(1, 2).unsqueeze(1)  # (n, 1, 9, hw)
        folded = F.fold((p * att).reshape(n, c * 9, h * w), (h, w), 3, padding=1)
        return self.head(self.b(folded).mean((2, 3)))


def test_unfold_fold_prune_exactly() -> None:
    torch.manual_seed(0)
    model = randomize_norms(Patches()).eval()
    x = torch.randn(2, 3, 6, 6)
    space = check_exact(model, x, seeds=(1,))
    assert check_plan(space, mdprune.Plan.smallest(space), x)
    assert "a.0" in {d.name for d in space.prunable_dims()}
    assert "weights" not in {d.name for d in space.prunable_dims()}  # softmaxed across its outputs: kept


def test_tnt() -> None:
    torch.manual_seed(0)
    space = check_exact(timm.create_model("tnt_s_patch16_224", num_classes=10).eval(), torch.randn(1, 3, 224, 224),
                        seeds=(1,))
    assert len(space.prunable_dims()) >= 20


class Windows(nn.Module):
    """HaloNet's neighbourhoods (``x.unfold`` along H then W), im2col by ``F.unfold``, and a window over the
    channels themselves (kept whole)."""

    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(3, 12, 3, padding=1)
        self.b, self.d = nn.Conv2d(16, 16, 1), nn.Conv2d(9, 16, 1)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)  # (n, 16, 8, 8)
        windows = F.pad(y, [1, 1, 1, 1]).unfold(2, 4, 2).unfold(3, 4, 2)  # (n, 16, 4, 4, 4, 4)
        patches = F.fold(F.unfold(y, 2, stride=2), (8, 8), 2, stride=2)  # (n, 16 x 4, 16) and back
        z = self.b(windows.amax((-1, -2)) + patches[..., ::2, ::2])
        over_channels = self.c(x).unfold(1, 4, 1).mean(-1)  # (n, 9, 8, 8): windows of 4 channels
        return self.head((z + self.d(over_channels)[..., ::2, ::2]).mean((2, 3)))


def test_sliding_windows_keep_the_channels_they_do_not_slide_over() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    space = check_exact(Windows().eval(), x, seeds=(1,))
    assert check_plan(space, mdprune.Plan.smallest(space), x)
    assert {d.name for d in space.prunable_dims()} == {"a", "b"}  # b: b's and d's outputs, added
    assert "unfolds the channels into windows" in space.dims["c"].protected


def test_halonet_neighbourhood_attention() -> None:
    torch.manual_seed(0)
    model = timm.create_model("halonet26t", num_classes=10).eval()
    space = check_exact(model, torch.randn(1, 3, 256, 256), seeds=(1,))
    attention = [d for d in space.prunable_dims() if ".self_attn." in d.name]
    assert sorted({d.kind for d in attention}) == ["qk", "v"] and len(attention) == 6
    assert len(space.removable_blocks()) == 8
