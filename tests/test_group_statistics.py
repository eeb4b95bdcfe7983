"""Statistics taken within channel groups written out as a reshape (EvoNorm's group std, a hand-written
GroupNorm): whole groups are pruned, the width of each group is kept, and the slim model is exact."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import mdprune

from .conftest import check_plan


class GroupStd(nn.Module):
    """EvoNorm-S0-like: ``x * sigmoid(v * x) / std`` with the std over groups of ``group_size`` channels, the
    group count an attribute computed at construction (as timm's ``EvoNorm2dS0`` does)."""

    def __init__(self, channels: int, group_size: int = 4):
        super().__init__()
        self.groups = channels // group_size
        self.v = nn.Parameter(torch.rand(channels) + 0.5)
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)
        self.bias = nn.Parameter(torch.randn(channels) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        torch._assert(C % self.groups == 0, "")
        g = x.reshape(B, self.groups, C // self.groups, H, W)
        std = g.float().var(dim=(2, 3, 4), unbiased=False, keepdim=True).add(1e-5).sqrt().to(x.dtype)
        std = std.expand(g.shape).reshape(B, C, H, W)
        x = x * (x * self.v.view(1, -1, 1, 1)).sigmoid() / std
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class FlatGroupNorm(nn.Module):
    """A GroupNorm written out with the group's channels and positions flattened together."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        g = x.view(B, self.groups, -1)
        g = (g - g.mean(-1, keepdim=True)) / (g.var(-1, keepdim=True) + 1e-5).sqrt()
        return g.view(B, C, H, W)


class Net(nn.Module):
    def __init__(self, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 24, 3, padding=1)
        self.na, self.nb = norm(16), norm(24)
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.na(self.a(x)))
        h = torch.relu(self.nb(self.b(h)))
        return self.head(h.mean((2, 3)))


def _exact(space: mdprune.PruningSpace, x: torch.Tensor) -> None:
    with torch.no_grad():
        dense = space.module(x)
    check_plan(space, mdprune.Plan.identity(), x, dense, "identity")
    for seed in range(4):
        check_plan(space, mdprune.Plan.random(space, seed=seed), x, label=f"random {seed}")
    assert check_plan(space, mdprune.Plan.uniform(space, 0.5), x, label="half")


def _group_dims(space: mdprune.PruningSpace, conv: str) -> tuple[list[int], list[int]]:
    """Widths of the prunable and kept-whole dimensions that ``conv``'s output channels are made of."""
    found = [d for n, d in space.dims.items() if n.startswith(conv)]
    return [d.size for d in found if d.prunable], [d.size for d in found if d.protected]


def test_group_std_prunes_whole_groups_exactly() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    space = mdprune.analyze(Net(GroupStd).eval(), x)
    _exact(space, x)
    for conv, groups in (("a", 4), ("b", 6)):
        prunable, whole = _group_dims(space, conv)
        assert prunable == [groups] and whole == [4], (conv, prunable, whole)
    # 4 of b's 6 groups: 16 channels, which the dense ``C % groups`` check (16 % 6) would refuse unpatched
    plan = mdprune.Plan(keep={"b:groups": [0, 2, 3, 5]})
    assert check_plan(space, plan, x, label="4 of 6 groups")
    assert mdprune.slim(space, plan).b.out_channels == 16


def test_flattened_group_norm_prunes_whole_groups_exactly() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    space = mdprune.analyze(Net(lambda c: FlatGroupNorm(4)).eval(), x)
    _exact(space, x)
    for conv, width in (("a", 4), ("b", 6)):
        assert _group_dims(space, conv) == ([4], [width])


def test_one_group_per_channel_follows_the_kept_width() -> None:
    """``groups == C`` (timm's EvoNorm with ``groups=32`` on 32 channels): each channel is its own group, the
    literal group count and ``C % groups`` follow the kept width."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    space = mdprune.analyze(Net(lambda c: GroupStd(c, 1)).eval(), x)
    _exact(space, x)
    assert space.dims["a"].prunable and space.dims["b"].prunable


class CheckedBlock(nn.Module):
    """A residual branch whose norm asserts its input's shape (timm's ``_assert(C % groups == 0)``), that checks
    the shape of a parameter only it reads (SAM's relative positions) and fills a tensor made from its shape by
    item assignment (ConViT's relative indices)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(channels, 8, 3, padding=1), nn.Conv2d(8, channels, 3, padding=1)
        self.norm = GroupStd(8)
        self.gain = nn.Parameter(torch.full((1, 1, 1, 1), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        torch._assert(h.dim() == 4, "expected 4D input")
        torch._assert(self.gain.shape[0] == 1, "one gain")
        pos = torch.zeros(1, 1, h.shape[2], h.shape[3])
        pos[:, :, 0] = 1.0
        return x + (self.conv2(torch.relu(self.norm(h))) * self.gain + pos)


class CheckedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.head = nn.Conv2d(3, 12, 3, padding=1), nn.Linear(12, 5)
        self.blocks = nn.Sequential(CheckedBlock(12), CheckedBlock(12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_shape_checks_inside_a_branch_leave_with_it() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    space = mdprune.analyze(CheckedNet().eval(), x)
    assert len(space.removable_blocks()) == 2
    _exact(space, x)
    plan = mdprune.Plan(removed=[b.name for b in space.removable_blocks()])
    assert check_plan(space, plan, x, label="both removed")  # MACs: the removed branches are not computed
    slim = mdprune.slim(space, plan)
    assert not [n for n in slim.graph.nodes if "assert" in str(n.target) or "setitem" in str(n.target)]
    assert sum(p.numel() for p in slim.parameters()) == space.count_params(plan.sizes(space), set(plan.removed))
