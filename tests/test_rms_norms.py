"""RMS norms (torch's ``nn.RMSNorm`` and ``F.rms_norm``, timm's ``RmsNorm``, ``RmsNorm2d``, ``SimpleNorm``) analyse
and slim exactly: the width they normalise over is prunable, and the masked model normalises over the kept
features only, as the slim model's smaller norm does."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import RmsNorm, RmsNorm2d, SimpleNorm, SimpleNorm2d
from torch import nn

import mdprune
from mdprune.layers import MaskedRMSNorm, layer_kind

from .conftest import check_exact, randomize_norms, rel_err


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Norm weights away from one (a kept feature scaled by a wrong weight would show)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
    return randomize_norms(model, seed).eval()


class TokenMixer(nn.Module):
    """Residual MLP blocks over tokens, each normed by ``norm(width)``; the last norm called as a function."""

    def __init__(self, norm: type[nn.Module], width: int = 24, depth: int = 2):
        super().__init__()
        self.embed = nn.Linear(12, width)
        self.norms = nn.ModuleList(norm(width) for _ in range(depth))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
                                  for _ in range(depth))
        self.final = nn.Parameter(torch.ones(width))
        self.head = nn.Linear(width, 5)
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for norm, mlp in zip(self.norms, self.mlps, strict=True):
            x = x + mlp(norm(x))
        x = F.rms_norm(x, (self.width,), self.final, 1e-6)
        return self.head(x.mean(1))


class ConvBlocks(nn.Module):
    """Residual conv blocks normed over channels by ``norm(channels)`` (channels first)."""

    def __init__(self, norm: type[nn.Module], channels: int = 32, depth: int = 2):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(norm(channels), nn.Conv2d(channels, 2 * channels, 1), nn.GELU(),
                                                  nn.Conv2d(2 * channels, channels, 3, padding=1))
                                    for _ in range(depth))
        self.head = nn.Linear(channels, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for b in self.blocks:
            x = x + b(x)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("norm", [nn.RMSNorm, RmsNorm, SimpleNorm], ids=["torch", "timm", "timm_simple"])
def test_last_axis_rms_norms(norm: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = randomized(TokenMixer(norm))
    assert layer_kind(model.norms[0]) is not None and layer_kind(model.norms[0]).masked is not None
    space = check_exact(model, torch.randn(2, 6, 12), seeds=(1, 2, 3))
    embed = [d for d in space.prunable_dims() if d.kind == "embed"]
    assert len(embed) == 1 and embed[0].size == 24
    # the statistic over the kept features only (a plan that narrows only the normalised width)
    plan = mdprune.Plan.from_sizes(space, {embed[0].name: 16})
    with torch.no_grad():
        x = torch.randn(2, 6, 12)
        assert rel_err(mdprune.slim(space, plan)(x), mdprune.masked(space, plan)(x)) <= 1e-4


@pytest.mark.parametrize("norm", [RmsNorm2d, SimpleNorm2d], ids=["rms2d", "simple2d"])
def test_channels_first_rms_norms(norm: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = randomized(ConvBlocks(norm))
    space = check_exact(model, torch.randn(2, 3, 8, 8), seeds=(1, 2, 3))
    assert any(d.kind == "embed" and d.size == 32 for d in space.prunable_dims())


def test_timm_convnext_rms() -> None:
    """timm's ConvNeXt with RmsNorm2d (its ``_rms`` variants): stage widths prunable, slim == masked."""
    torch.manual_seed(0)
    model = randomized(timm.create_model("convnext_atto_rms", num_classes=10, depths=(1, 1, 2, 1),
                                         dims=(32, 48, 64, 96)))
    space = check_exact(model, torch.randn(2, 3, 32, 32))
    assert sum(d.kind == "embed" for d in space.prunable_dims()) >= 4  # one per stage


def test_masked_rms_norm_matches_a_smaller_norm() -> None:
    """The stand-in over kept features equals the norm of the kept features alone; pruned ones are zero."""
    torch.manual_seed(0)
    norm = RmsNorm2d(8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0], dtype=torch.bool)
    small = RmsNorm2d(int(keep.sum()))
    with torch.no_grad():
        small.weight.copy_(norm.weight[keep])
    masked = MaskedRMSNorm(norm, axis=1)
    masked.set_keep(keep)
    x = torch.randn(2, 8, 3, 3) * keep.view(-1, 1, 1)
    y = masked(x)
    assert rel_err(small(x[:, keep]), y[:, keep]) <= 1e-5 and not y[:, ~keep].any()


def test_timm_vit_rms_with_qk_norm() -> None:
    """A timm ViT normed by RmsNorm, q/k normed per head by RmsNorm too: the embedding and q/k widths prunable."""
    torch.manual_seed(0)
    model = randomized(timm.create_model("vit_small_patch16_224", img_size=32, depth=2, embed_dim=48, num_heads=3,
                                         num_classes=10, norm_layer=RmsNorm, qk_norm=True))
    space = check_exact(model, torch.randn(2, 3, 32, 32), seeds=(1, 2, 3))
    kinds = {d.kind for d in space.prunable_dims()}
    assert {"embed", "qk", "v", "heads", "mlp"} <= kinds


class ScaleNorm(nn.Module):
    """A user's norm mdprune does not know: ``g * x / ||x||`` over the last axis, one gain per feature."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.normalized_shape, self.eps = (width,), 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def test_user_norm_registered_with_a_masked_stand_in() -> None:
    """The registry's ``masked=``: a user's norm over pruned features is exact once it gives a stand-in, and
    without one the masked model says what is missing instead of normalising over pruned features."""
    from mdprune import layers
    from mdprune.layers import registry

    before = list(registry._USER)
    try:
        _register_and_check(layers)
    finally:  # the registrations are undone
        registry._USER[:] = before
        registry._changed()


def _register_and_check(layers) -> None:  # noqa: ANN001
    def rule(prop, node, m):  # noqa: ANN001, ANN202
        x = layers.input_channels(prop, node, axis=-1, what="features")
        layers.bind(prop, node, "weight", 0, x.segs, "norm")
        layers.mark_normalized(prop, node.target, x.segs)
        return x

    def resize(new, old):  # noqa: ANN001, ANN202
        new.normalized_shape = tuple(new.weight.shape)

    torch.manual_seed(0)
    model = randomized(TokenMixer(ScaleNorm))
    mdprune.register_layer(ScaleNorm, channels=rule, resize=resize)
    space = mdprune.analyze(model, torch.randn(2, 6, 12))
    with pytest.raises(TypeError, match="masked stand-in"):
        mdprune.masked(space, mdprune.Plan.random(space, seed=1))
    mdprune.register_layer(ScaleNorm, channels=rule, resize=resize, masked=MaskedRMSNorm)
    check_exact(model, torch.randn(2, 6, 12), seeds=(1, 2, 3))
