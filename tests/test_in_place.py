"""In-place tensor ops whose result nothing reads (``out.mul_(gain)``): torch.fx counts them as pure, but the
tensor they write into is read afterwards, so neither the slim model nor block finding may drop them."""

from __future__ import annotations

import torch
from torch import nn

import mdprune

from .conftest import check_exact


class SkipInitBlock(nn.Module):
    """NFNet's pattern: the branch is scaled in place by a learnt scalar, then read through the original name."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1), nn.Conv2d(2 * width, width, 3, padding=1)
        self.gain = nn.Parameter(torch.tensor(0.7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(torch.relu(self.conv1(x)))
        out.mul_(self.gain)
        return out * 0.5 + x


class SkipInitNet(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.Sequential(SkipInitBlock(width), SkipInitBlock(width))
        self.head = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x.add_(1.0)  # an in-place op on the trunk, its result unused too
        return self.head(self.blocks(x).mean((2, 3)))


def test_in_place_ops_survive_slimming_and_leave_with_their_block() -> None:
    torch.manual_seed(0)
    model, x = SkipInitNet().eval(), torch.randn(2, 3, 8, 8)
    space = check_exact(model, x, seeds=(1, 2, 3), block_prob=0.5)
    blocks = space.removable_blocks()
    assert len(blocks) == 2  # the in-place scaling is inside its branch, not a second exit
    plan = mdprune.Plan(removed=[blocks[0].name])
    slim = mdprune.slim(space, plan)
    assert "blocks.0.gain" not in dict(slim.named_parameters())  # the removed branch is gone, its scalar too
    assert "blocks.1.gain" in dict(slim.named_parameters())
    with torch.no_grad():
        assert not torch.allclose(slim(x), mdprune.slim(space, mdprune.Plan()).eval()(x))
