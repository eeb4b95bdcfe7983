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
