"""Numbers and item assignment computed from shapes while tracing (``int(n ** .5)``, ``float(n)``,
``x[..., 0] = ...``): fixed to the example input's values with a guard, as a branch on shapes is."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mdprune
from mdprune.space.trace import record_shapes, trace

from .conftest import check_plan


class GridTokens(nn.Module):
    """Tokens on a square grid whose side is ``int(n ** .5)`` (ConViT, NesT), and positions written item by item
    into a tensor made from shapes."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.embed, self.mix, self.head = nn.Linear(3, dim), nn.Linear(dim + 2, dim), nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.flatten(2).transpose(1, 2))  # (B, N, dim)
        side = int(tokens.shape[1] ** 0.5)
        pos = torch.zeros(1, tokens.shape[1], 2)
        grid = torch.arange(side, dtype=torch.float32)
        pos[:, :, 0] = grid.repeat(side)
        pos[:, :, 1] = grid.repeat_interleave(side)
        rows = [tokens[:, i * side:(i + 1) * side].mean(1) for i in range(side)]
        mixed = self.mix(torch.cat([tokens, pos.expand(tokens.shape[0], -1, -1)], -1))
        return self.head(mixed.mean(1) + torch.stack(rows, 1).mean(1))


def test_numbers_from_shapes_follow_the_example_and_are_guarded() -> None:
    torch.manual_seed(0)
    model, x = GridTokens().eval(), torch.randn(2, 3, 4, 4)
    gm = trace(model, example_inputs=(x,))
    record_shapes(gm, (x,))
    assert torch.allclose(gm(x), model(x), atol=1e-6)
    with pytest.raises(Exception, match="number computed from them"):
        gm(torch.randn(2, 3, 5, 5))  # 25 tokens: a 5 x 5 grid, not the 4 x 4 the trace fixed
    space = mdprune.analyze(model, x)
    check_plan(space, mdprune.Plan.identity(), x, model(x).detach(), "identity")
    assert check_plan(space, mdprune.Plan.uniform(space, 0.5), x, label="half")  # the embedding stays prunable
    slim = mdprune.slim(space, mdprune.Plan.uniform(space, 0.5), model)  # the tracer's constants are not weights
    assert slim(x).shape == (2, 4)


class ChannelCount(nn.Module):
    """A number fixed from a channel count: pruning those channels would fail the guard."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 16, 1), nn.Conv2d(8, 16, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        half = int(y.shape[1] * 0.5)
        return self.c(torch.relu(self.b(y[:, :half])))


def test_a_number_fixed_from_a_channel_count_keeps_it_whole() -> None:
    space = mdprune.analyze(ChannelCount().eval(), torch.randn(1, 3, 4, 4))
    parts = [d for d in space.dims.values() if d.name.startswith("a[")]  # (the slice splits a's channels)
    assert parts and all(not d.prunable and "the trace fixed" in d.protected for d in parts)
    assert space.dims["b"].prunable


class BatchZeros(nn.Module):
    """``torch.zeros(B, ...)`` from the input's batch size (EdgeNeXt's positional encoding): recorded as a call,
    never fixed to the example's batch."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 16), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x) + torch.zeros((x.shape[0], 16)))


def test_sizes_given_to_torch_stay_symbolic() -> None:
    space = mdprune.analyze(BatchZeros(), torch.randn(2, 4))
    slim = mdprune.slim(space, mdprune.Plan.uniform(space, 0.5))
    assert slim(torch.randn(5, 4)).shape == (5, 2)


class SizesOneByOne(nn.Module):
    """Sizes given one by one, the first traced (Gemma 4's patch mask, and its frequencies: a plain tensor
    attribute, not a buffer, expanded over the batch)."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 16, 2, 2), nn.Linear(16, 4)
        self.freq = torch.arange(4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        b, _, h, w = y.shape
        keep = torch.ones(b, h * w, 1)
        f = self.freq[None, :, None].expand(b, -1, 1)
        return self.head(y.flatten(2).transpose(1, 2) * keep).mean(1) + f.sum((1, 2))[:, None]


def test_sizes_given_one_by_one_may_be_traced() -> None:
    x = torch.randn(2, 3, 8, 8)
    space = mdprune.analyze(SizesOneByOne().eval(), x)
    assert space.dims["conv"].prunable
    assert check_plan(space, mdprune.Plan.uniform(space, 0.5), x)
    slim = mdprune.slim(space, mdprune.Plan.uniform(space, 0.5))
    assert slim(torch.randn(5, 3, 8, 8)).shape == (5, 4)  # the batch stays symbolic
    assert torch.ones(2, 3).shape == (2, 3) and torch.Tensor.expand.__name__ == "expand"  # patches undone


@torch.fx.wrap
def _clip_window(size: int, window: list[int]) -> list[int]:
    """Changes its list argument in place, as torchvision's Swin3d ``_get_window_and_shift_size`` does."""
    window[1] = min(window[1], size)
    return window


class ClippedWindow(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        w = _clip_window(y.shape[-1], [4, 8])
        return self.head(y.flatten(2)[..., : w[1]].mean(-1))


def test_wrapped_functions_may_change_their_list_arguments() -> None:
    x = torch.randn(2, 3, 6, 6)
    space = mdprune.analyze(ClippedWindow().eval(), x)
    assert check_plan(space, mdprune.Plan.uniform(space, 0.5), x)
