"""Three-dimensional convolutions (video models): dense, depthwise and grouped Conv3d prune by the Conv2d rule, with
3d pooling passing channels through; torchvision's video ResNets prune exactly."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

import mdprune
from mdprune.latency.ops import op_module

from .conftest import check_exact, check_plan, randomize_norms


class Video(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(3, 16, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(16), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv3d(16, 32, 1), nn.BatchNorm3d(32), nn.ReLU(),
                                    nn.Conv3d(32, 32, 3, padding=1, groups=32), nn.ReLU(),
                                    nn.Conv3d(32, 32, 3, padding=1, groups=4), nn.ReLU(),
                                    nn.Conv3d(32, 16, 1), nn.BatchNorm3d(16))
        self.pool, self.head = nn.AdaptiveAvgPool3d(1), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = torch.relu(y + self.branch(nn.functional.max_pool3d(y, 1)))
        return self.head(self.pool(y).flatten(1))


def test_conv3d_prunes_like_a_convolution() -> None:
    torch.manual_seed(0)
    model = randomize_norms(Video()).eval()
    x = torch.randn(2, 3, 4, 6, 6)
    space = check_exact(model, x, seeds=(1, 2))
    assert check_plan(space, mdprune.Plan.smallest(space), x)
    assert {"stem.0", "branch.0"} <= {d.name for d in space.prunable_dims()}
    assert len(space.removable_blocks()) == 1
    ops = [o for o in space.ops if o.kind == "conv3d"]
    assert len(ops) == 5
    for op in ops:  # the latency tables build each at its widths
        module, inputs = op_module(op.kind, op.fixed, op.widths(space.dense_sizes()), 1, "cpu", torch.float32)
        assert module(*inputs).ndim == 5


def test_torchvision_video_resnet() -> None:
    torch.manual_seed(0)
    model = randomize_norms(torchvision.models.video.r2plus1d_18(num_classes=10)).eval()
    space = check_exact(model, torch.randn(1, 3, 4, 32, 32), seeds=(1,))
    assert len(space.removable_blocks()) == 8


def test_torchvision_video_swin_shifted_windows_in_three_axes() -> None:
    """Swin3d: windows shifted along time, height and width; in the second stage (3x3 after merging) the window
    shrinks to the map and takes the first entries of the position index, as torchvision does."""
    from torchvision.models.video.swin_transformer import SwinTransformer3d

    torch.manual_seed(0)
    model = SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                              window_size=[2, 4, 4], num_classes=5).eval()
    space = check_exact(model, torch.randn(1, 3, 8, 24, 24), seeds=(1, 2))
    attn = [o for o in space.ops if o.kind == "attention"]
    assert [(o.fixed["tokens"], o.fixed.get("windows"), o.fixed.get("bias")) for o in attn] == \
        [(32, 8, True)] * 2 + [(2 * 3 * 3, 2, True)] * 2  # 4x6x6 padded to 4x8x8 in 2x4x4 windows; 4x3x3 in 2x3x3
    live = {d.name for d in space.prunable_dims()}
    assert {"features.0.0.attn.heads", "features.2.1.attn.heads", "features.2.1.mlp.0"} <= live
    assert len(space.removable_blocks()) == 8
