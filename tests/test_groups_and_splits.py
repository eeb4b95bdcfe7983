"""Grouped convolutions (width per group a dimension) and channel splits (chunk, split, slices, shuffles)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mdprune
from mdprune import Plan
from mdprune.latency.ops import op_module

from .conftest import check_plan, randomize_norms, rel_err


def _exact(model: nn.Module, x: torch.Tensor, seeds: tuple[int, ...] = (1, 2, 3), steps=None) -> mdprune.PruningSpace:
    """Analyse; for random plans the slim model equals the masked one, with exact parameter and MAC counts."""
    model = randomize_norms(model).eval()
    space = mdprune.analyze(model, x, steps=steps)
    with torch.no_grad():
        dense = model(x)
        assert rel_err(dense, mdprune.slim(space, Plan.identity())(x)) <= 1e-4
    pruned = False
    for seed in seeds:
        pruned |= check_plan(space, Plan.random(space, seed=seed, block_prob=0.3), x, label=f"seed {seed}")
    assert pruned, "no random plan pruned anything"
    return space


def _per_group(space: mdprune.PruningSpace, conv: str) -> tuple[str, str | None]:
    """The group count and the input width per group of a grouped convolution (from its weight's axes)."""
    t = space.tensors[f"{conv}.weight"]
    (out,) = t.axes[0]
    (inp,) = t.axes.get(1, (None,))
    return out.dims[0], inp.dims[0] if inp is not None else None


# ---- grouped convolutions ------------------------------------------------------------------------------------

class Bottleneck(nn.Module):
    """ResNeXt's block: 1x1, grouped 3x3, 1x1, with an identity shortcut; ``se`` adds RegNet-Y's squeeze-excite."""

    def __init__(self, width: int = 16, mid: int = 32, groups: int = 4, se: bool = False):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(width, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(mid, mid, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(mid),
                               nn.ReLU())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(mid, 8, 1), nn.ReLU(), nn.Conv2d(8, mid, 1),
                                nn.Sigmoid()) if se else None
        self.c = nn.Sequential(nn.Conv2d(mid, width, 1, bias=False), nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(self.a(x))
        if self.se is not None:
            y = y * self.se(y)
        return F.relu(x + self.c(y))


class Net(nn.Module):
    def __init__(self, *body: nn.Module, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.body = nn.Sequential(*body)
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.body(self.stem(x)), 1).flatten(1))


@pytest.mark.parametrize("se", [False, True])
def test_resnext_block_prunes_widths_per_group(se):
    torch.manual_seed(0)
    space = _exact(Net(Bottleneck(se=se), Bottleneck(groups=8, se=se)), torch.randn(2, 3, 8, 8))
    groups, w_in = _per_group(space, "body.0.b.0")
    assert space.dims[groups].size == 4 and "group count" in space.dims[groups].protected
    assert space.dims[w_in].size == 8 and space.dims[w_in].prunable  # the 1x1's output, seen as 4 x 8
    out = space.tensors["body.0.b.0.weight"].axes[0][0]
    assert out.dims[0] == groups and space.dims[out.dims[1]].prunable
    # the 1x1 before the grouped conv is now a product: groups x width per group
    assert space.tensors["body.0.a.0.weight"].axes[0][0].dims == (groups, w_in)
    assert space.dims[w_in].step == 2  # a base step of 8 channels over 4 groups


def test_grouped_convolution_on_a_concatenation():
    """Group boundaries that fall inside a concatenated input (6 + 10 channels, groups of 4) stay exact."""

    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 10, 1)
            self.g = nn.Conv2d(16, 8, 3, padding=1, groups=4)
            self.h = nn.Conv2d(16, 12, 1, groups=2)  # the same input seen as 2 groups of 8 too
            self.fc = nn.Linear(20, 10)

        def forward(self, x):
            y = torch.cat([self.a(x), self.b(x)], 1)
            z = torch.cat([self.g(y), self.h(y)], 1)
            return self.fc(z.mean((2, 3)))

    torch.manual_seed(0)
    space = _exact(Cat(), torch.randn(2, 3, 6, 6), seeds=(1, 2, 3, 4), steps={"channel": 1})
    assert any(d.prunable for d in space.dims.values() if d.name.startswith(("a", "b")))


def test_depth_multiplier_and_groups_of_one_channel():
    """groups == in_channels < out_channels: the input is kept whole, the outputs per group are a dimension."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 24, 3, groups=8), nn.BatchNorm2d(24), nn.ReLU(),
                          nn.Conv2d(24, 8, 1, groups=8), nn.Flatten(1), nn.LazyLinear(10))
    x = torch.randn(2, 3, 6, 6)
    model(x)
    space = _exact(model, x, steps={"channel": 1})
    assert space.dims["0"].protected and space.dims["1"].prunable  # 8 groups x 3 outputs each


@pytest.mark.parametrize("name", ["resnext50_32x4d", "regnet_x_400mf"])
def test_torchvision_grouped_models(name):
    torch.manual_seed(0)
    model = mdprune.create_model(f"torchvision:{name}", num_classes=10)
    space = _exact(model, torch.randn(1, 3, 64, 64), seeds=(1, 2))
    grouped = [n for n, m in space.module.named_modules()
               if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels]
    assert grouped
    for conv in grouped:
        groups, w_in = _per_group(space, conv)
        w_out = space.tensors[f"{conv}.weight"].axes[0][0].dims[1]
        assert space.dims[groups].protected
        assert space.dims[w_out].prunable and space.dims[w_in].prunable, conv


def test_grouped_conv_latency_op_keeps_its_groups():
    torch.manual_seed(0)
    model = Net(Bottleneck(groups=8))
    space = mdprune.analyze(model.eval(), torch.randn(2, 3, 8, 8))
    op = next(o for o in space.ops if o.name == "body.0.b.0")
    sizes = space.dense_sizes() | {d: space.dims[d].widths()[0] for d in op.dims() if space.dims[d].prunable}
    widths = op.widths(sizes)
    assert widths["in"] < 32 and widths["in"] % 8 == 0
    m, inputs = op_module("conv2d", op.fixed, widths, batch=2)
    conv = m[0]
    assert conv.groups == 8 and (conv.in_channels, conv.out_channels) == (widths["in"], widths["out"])
    assert m(*inputs).shape[1] == widths["out"]


# ---- splits ---------------------------------------------------------------------------------------------------

class Glu(nn.Module):
    """timm's GluMlp: one linear layer, halves by chunk, one gates the other."""

    def __init__(self, dim: int = 16, hidden: int = 32):
        super().__init__()
        self.fc1, self.fc2, self.norm = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim), nn.LayerNorm(dim)

    def forward(self, x):
        a, b = self.fc1(self.norm(x)).chunk(2, dim=-1)
        return x + self.fc2(a * F.silu(b))


def test_glu_halves_are_one_dimension():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), Glu(), Glu(), nn.Linear(16, 4))
    space = _exact(model, torch.randn(2, 5, 8))
    (a, b) = space.tensors["1.fc1.weight"].axes[0]
    assert a.dims == b.dims and space.dims[a.dims[0]].prunable and space.dims[a.dims[0]].size == 32


class CrossStage(nn.Module):
    """CSPNet: split (an int size) into a kept half and a processed half, concatenate, mix."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(c, 2 * c, 1), nn.BatchNorm2d(2 * c), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.mix = nn.Conv2d(2 * c, c, 1)

    def forward(self, x):
        xs, xb = self.expand(x).split(16, dim=1)
        return self.mix(torch.cat([xs, self.block(xb)], dim=1))


class Ghost(nn.Module):
    """GhostNet's module: primary conv, a cheap depthwise conv of it, concatenated, cut to ``out`` channels."""

    def __init__(self, c: int = 16, out: int = 15):
        super().__init__()
        init = (out + 1) // 2
        self.out = out
        self.primary = nn.Sequential(nn.Conv2d(c, init, 1), nn.BatchNorm2d(init), nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(init, init, 3, padding=1, groups=init), nn.BatchNorm2d(init), nn.ReLU())

    def forward(self, x):
        y = self.primary(x)
        return torch.cat([y, self.cheap(y)], dim=1)[:, :self.out, :, :]


class Window(nn.Module):
    """A slice in the middle of the channels, and a torch.split with sizes; the unused channels are dropped."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(15, 24, 1)
        self.fc = nn.Linear(14, 10)

    def forward(self, x):
        y = self.conv(x)
        a, _, c = torch.split(y, [5, 7, 12], dim=1)
        return self.fc(torch.cat([a, c[:, 3:12]], 1).mean((2, 3)))


def test_csp_split_ghost_slice_and_windows():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), CrossStage(), Ghost(), Window())
    space = _exact(model, torch.randn(2, 3, 6, 6), seeds=(1, 2, 3, 4), steps={"channel": 2})
    halves = space.tensors["1.expand.0.weight"].axes[0]
    assert len(halves) == 2 and all(space.dims[s.dims[0]].prunable for s in halves)
    assert space.dims[space.tensors["2.primary.0.weight"].axes[0][0].dims[0]].prunable
    # the channels no one reads are a dimension of their producer only
    conv = [s.dims[0] for s in space.tensors["3.conv.weight"].axes[0]]
    assert len(conv) >= 4 and all(not any(d in s.dims for s in space.tensors["3.fc.weight"].axes[1])
                                  for d in conv[1:3])


class Shuffle(nn.Module):
    """ShuffleNet-v2's unit: chunk, a branch on one half, concatenate, shuffle the two groups."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(c // 2, c // 2, 1), nn.BatchNorm2d(c // 2), nn.ReLU(),
                                    nn.Conv2d(c // 2, c // 2, 3, padding=1, groups=c // 2), nn.BatchNorm2d(c // 2),
                                    nn.Conv2d(c // 2, c // 2, 1), nn.ReLU())

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        y = torch.cat([a, self.branch(b)], dim=1)
        n, c, h, w = y.size()
        return y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)


def test_channel_shuffle_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), Shuffle(), Shuffle(), Shuffle(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(16, 10))
    space = _exact(model, torch.randn(2, 3, 6, 6), seeds=(1, 2, 3, 4), steps={"channel": 1})
    assert space.dims[space.tensors["2.branch.0.weight"].axes[0][0].dims[0]].prunable


def test_what_cannot_be_followed_is_kept_whole():
    """A strided channel slice and a single picked channel: their channels kept whole, with a reason."""

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 6, 1)
            self.fc = nn.Sequential(nn.Linear(4 + 6 + 1, 12), nn.ReLU(), nn.Linear(12, 10))

        def forward(self, x):
            y, z = self.a(x), self.b(x)
            pick = z[:, 2].mean((1, 2))[:, None]
            return self.fc(torch.cat([y[:, ::2].mean((2, 3)), z.mean((2, 3)), pick], 1))

    torch.manual_seed(0)
    space = _exact(Odd(), torch.randn(2, 3, 5, 5), steps={"channel": 1})
    assert "slices channels with a step" in space.dims["a"].protected
    assert "picks single channels" in space.dims["b"].protected


def test_tokens_flattened_into_features():
    """(B, N, C) reshaped to (B, N * C): the channels repeat once per token, each copy pruned alike."""

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(3 * 8, 10)

        def forward(self, x):
            y = self.fc1(x)
            return self.fc2(y.reshape(y.shape[0], 3 * 8))

    torch.manual_seed(0)
    space = _exact(Flat(), torch.randn(2, 3, 4), steps={"mlp": 1, "linear": 1})
    assert [s.dims for s in space.tensors["fc2.weight"].axes[1]] == [("fc1",)] * 3


def test_computed_slices_swapped_halves_and_unbind():
    """A slice at a computed position is kept whole; chunks put back in another order and unbind stay exact."""

    class Mix(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 12, 1)
            self.c = nn.Conv2d(3, 6, 1)
            self.fc = nn.Sequential(nn.Linear(4 + 12 + 3, 12), nn.ReLU(), nn.Linear(12, 10))

        def forward(self, x):
            y, z, w = self.a(x), self.b(x), self.c(x)
            half = y[:, : y.shape[1] // 2]
            swapped = torch.cat(z.chunk(2, 1)[::-1], 1)
            u = w.unbind(2)  # along a spatial axis: the channels pass through
            rows = u[0] + u[4]
            parts = [half.mean((2, 3)), swapped.mean((2, 3)), rows[:, :3].mean(2)]
            return self.fc(torch.cat(parts, 1))

    torch.manual_seed(0)
    space = _exact(Mix(), torch.randn(2, 3, 5, 5), seeds=(1, 2, 3, 4), steps={"channel": 1})
    assert "computed positions" in space.dims["a"].protected
    assert any(d.prunable for d in space.dims.values() if d.name.startswith("b["))
