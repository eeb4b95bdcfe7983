"""Swin (timm and torchvision), LeViT and MobileViT analyse, slim exactly and prune without ignored layers.

What they need: channels-last pads, rolls and patch merging (``flatten`` folding positions into channels),
torchvision's fx-wrapped ``_patch_merging_pad`` traced into, ``reshape_as``, attention over fewer queries than
keys (LeViT's subsample: MACs over tokens x tokens_kv), MobileViT's unfold/fold reshapes (split one axis and
merge others) and its branch on shapes (traced with the example's shapes, guarded), MobileViT v2's single
query channel broadcast against the keys.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import mdprune
from mdprune import AnalysisError, Plan
from mdprune.space.trace import record_shapes, trace

from .conftest import check_exact


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random parameters and statistics (zero-initialised biases and tables would hide errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return model.eval()



def prunable_kinds(space: mdprune.PruningSpace) -> set[str]:
    return {d.kind for d in space.prunable_dims()}


# ---- the models ------------------------------------------------------------------------------------------------

def test_timm_swin():
    torch.manual_seed(0)
    model = randomize(timm.create_model("swin_tiny_patch4_window7_224", img_size=64, window_size=4, embed_dim=24,
                                        depths=(2, 2), num_heads=(2, 4), num_classes=10))
    space = check_exact(model, torch.randn(2, 3, 64, 64))
    assert {a["kind"] for a in space.attention.values()} == {"timm_window"}
    assert {"embed", "mlp", "heads", "qk", "v"} <= prunable_kinds(space)


@pytest.mark.parametrize("size", [64, 60])  # 60: odd maps before patch merging (padded)
def test_torchvision_swin(size):
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = randomize(SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 2],
                                      window_size=[4, 4], num_classes=10))
    space = check_exact(model, torch.randn(2, 3, size, size), seeds=(1,))
    assert {a["kind"] for a in space.attention.values()} == {"tv_window"}
    assert {"embed", "mlp", "heads", "qk", "v"} <= prunable_kinds(space)


def test_swin_v2_both_libraries_and_timm_cr():
    """Cosine attention (a learnt scale per head), a position bias MLP with a row per head, post-norm blocks;
    torchvision's forward zeroes k's bias (kept as a parameter, unused, in the slim model too)."""
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    torch.manual_seed(0)
    tv = randomize(SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 2],
                                   window_size=[4, 4], num_classes=10, block=SwinTransformerBlockV2,
                                   downsample_layer=PatchMergingV2))
    tm = randomize(timm.create_model("swinv2_tiny_window8_256", img_size=64, window_size=4, embed_dim=24,
                                     depths=(2, 2), num_heads=(2, 4), num_classes=10))
    cr = randomize(timm.create_model("swinv2_cr_tiny_224", img_size=64, window_size=4, embed_dim=24, depths=(2, 2),
                                     num_heads=(2, 4), num_classes=10))  # its bias MLP over every pair of tokens
    for model, kind in ((tv, "tv_window_v2"), (tm, "timm_window_v2"), (cr, "timm_window_v2cr")):
        space = check_exact(model, torch.randn(2, 3, 64, 64), seeds=(1,))
        assert {a["kind"] for a in space.attention.values()} == {kind}
        assert {"embed", "mlp", "heads", "qk", "v"} <= prunable_kinds(space)
        attn = next(iter(space.attention))
        plan = Plan({space.attention[attn]["heads"]: [1]})
        s = mdprune.slim(space, plan)
        assert s.get_submodule(attn).logit_scale.shape[0] == 1


def test_levit_with_downsampling_attention():
    from timm.models.levit import Levit

    torch.manual_seed(0)
    model = randomize(Levit(img_size=64, embed_dim=(32, 48), key_dim=8, depth=(1, 1), num_heads=(2, 3),
                            num_classes=10))
    space = check_exact(model, torch.randn(2, 3, 64, 64))
    down = [o for o in space.ops if o.kind == "attention" and "tokens_kv" in o.fixed]
    assert down and all(o.fixed["tokens"] < o.fixed["tokens_kv"] for o in down)
    assert {"heads", "mlp", "channel"} <= prunable_kinds(space)


def test_levit_convolution_mode():
    from timm.models.levit import Levit

    torch.manual_seed(0)
    model = randomize(Levit(img_size=64, embed_dim=(32, 48), key_dim=8, depth=(1, 1), num_heads=(2, 3),
                            use_conv=True, num_classes=10))
    space = check_exact(model, torch.randn(2, 3, 64, 64), seeds=(1,))
    assert {"heads", "mlp", "channel"} <= prunable_kinds(space)


def _mobilevit(v2: bool) -> nn.Module:
    from timm.models.byobnet import ByobNet, ByoModelCfg
    from timm.models.mobilevit import _inverted_residual_block, _mobilevit_block, _mobilevitv2_block

    block = _mobilevitv2_block(d=1, c=32, s=2, transformer_depth=1) if v2 else \
        _mobilevit_block(d=1, c=32, s=2, transformer_dim=64, transformer_depth=1, patch_size=2, br=2.0)
    cfg = ByoModelCfg(blocks=(_inverted_residual_block(d=1, c=16, s=2, br=2.0), block), stem_chs=16,
                      stem_type="3x3", stem_pool="", downsample="", act_layer="silu", num_features=64)
    return randomize(ByobNet(cfg, num_classes=10))


@pytest.mark.parametrize("size", [32, 36])  # 36: maps of odd size, which MobileViT interpolates (a shape branch)
def test_mobilevit(size):
    torch.manual_seed(0)
    space = check_exact(_mobilevit(False), torch.randn(2, 3, size, size))
    assert {"channel", "embed", "mlp", "heads", "qk", "v"} <= prunable_kinds(space)


def test_mobilevit_v2_single_query_channel():
    torch.manual_seed(0)
    space = check_exact(_mobilevit(True), torch.randn(2, 3, 32, 32), seeds=(1,))
    assert "channel" in prunable_kinds(space)
    one = [d for d in space.dims.values() if d.size == 1 and d.protected]
    assert one and all("broadcasts a single channel" in d.protected for d in one)


# ---- the rules, one at a time ----------------------------------------------------------------------------------

def _merge_halves(x: torch.Tensor) -> torch.Tensor:
    """Registered with torch.fx.wrap below: fx keeps it one call unless mdprune traces into it."""
    return torch.cat([x[..., 0::2, :], x[..., 1::2, :]], -1)


torch.fx.wrap("_merge_halves")


class ChannelsLast(nn.Module):
    """NHWC stages: a pad and a roll on spatial axes, a wrapped merge function, a patch-merging flatten."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 2, 2)
        self.fc1 = nn.Linear(32, 24)
        self.norm = nn.LayerNorm(96)
        self.fc2 = nn.Linear(96, 10)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)  # (B, 8, 8, 16)
        x = F.pad(x, (0, 0, 0, 2, 0, 2))
        x = torch.roll(x, shifts=(1, -1), dims=(1, 2))
        x = self.fc1(_merge_halves(x))  # (B, 10, 5, 24)
        b, h, w, c = x.shape
        x = x[:, :8, :4].reshape(b, 4, 2, 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)  # channels x4
        return self.fc2(self.norm(x)).mean((1, 2))


def test_channels_last_pad_roll_wrapped_function_and_patch_merging():
    torch.manual_seed(0)
    space = check_exact(randomize(ChannelsLast()), torch.randn(2, 3, 16, 16))
    assert [d.size for d in space.prunable_dims()] == [16, 24]  # the stem's channels, fc1's features


class PadChannels(nn.Module):
    """The CIFAR ResNet's option-A shortcut: channels padded with zeros on both sides."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, 2, 1), nn.Linear(32, 10)

    def forward(self, x):
        x = self.a(x)
        y = self.b(x) + F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
        return self.head(y.mean((2, 3)))


def test_padding_channels_adds_kept_whole_channels():
    space = check_exact(randomize(PadChannels()), torch.randn(2, 3, 8, 8))
    assert "a" in {d.name for d in space.prunable_dims()}
    pads = [d for d in space.dims.values() if "pads channels" in (d.protected or "")]
    assert sorted(d.size for d in pads) == [8, 8]


class RollChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.roll(self.a(x), 1, dims=1))


def test_rolling_channels_keeps_them_whole():
    space = mdprune.analyze(RollChannels(), torch.randn(1, 3, 4, 4))
    assert "rolls the channels" in space.dims["a"].protected


class ShapeBranch(nn.Module):
    """Branches on shapes (MobileViT-like) and, in ``Data``, on values."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.a(x)
        if x.shape[-1] % 2:
            x = F.interpolate(x, size=(x.shape[-2] + 1, x.shape[-1] + 1))
        return self.b(x)


def test_shape_branch_follows_the_example_and_is_guarded():
    model = ShapeBranch().eval()
    gm = trace(model, example_inputs=(torch.randn(1, 3, 5, 5),))
    assert any(n.target is torch._assert for n in gm.graph.nodes)
    record_shapes(gm, (torch.randn(1, 3, 5, 5),))
    assert torch.allclose(gm(torch.ones(1, 3, 5, 5)), model(torch.ones(1, 3, 5, 5)))
    with pytest.raises(Exception, match="shape-dependent branch"):
        gm(torch.randn(1, 3, 6, 6))  # the branch would go the other way: refused, never silently wrong
    space = check_exact(model, torch.randn(2, 3, 5, 5), seeds=(1,))
    assert space.dims["a"].prunable


class Data(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        x = self.a(x)
        return x * 2 if x.shape[1] == 8 and bool(x.sum() > 0) else x


def test_branch_on_values_still_fails_naming_the_module():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Data()

        def forward(self, x):
            return self.inner(x)

    with pytest.raises(AnalysisError, match="'inner'.*control flow") as e:
        mdprune.analyze(Net(), torch.randn(1, 3, 4, 4))
    assert "bool(x.sum() > 0)" in str(e.value)  # the model's line, not mdprune's


class Unfold(nn.Module):
    """MobileViT's unfold and fold: (B, C, H, W) -> (B * C * nh, ph, nw, pw) -> (B * P, N, C) and back, the fold's
    sizes computed from the unfolded map's shape (``residual``: the tokens keep its channels, as in MobileViT)."""

    def __init__(self, residual: bool):
        super().__init__()
        self.residual = residual
        self.a, self.lin, self.b = nn.Conv2d(3, 32, 1), nn.Linear(32, 32), nn.Conv2d(32, 4, 1)

    def forward(self, x):
        x = self.a(x)
        b, c, h, w = x.shape
        t = x.reshape(b * c * h // 2, 2, w // 2, 2).transpose(1, 2)
        t = t.reshape(b, c, h * w // 4, 4).transpose(1, 3).reshape(b * 4, h * w // 4, -1)
        t = t + self.lin(t) if self.residual else self.lin(t)
        t = t.contiguous().view(b, 4, h * w // 4, -1).transpose(1, 3).reshape(b * c * h // 2, w // 2, 2, 2)
        return self.b(t.transpose(1, 2).reshape(b, c, h, w))


def test_reshape_that_splits_and_merges_axes():
    space = check_exact(randomize(Unfold(residual=True)), torch.randn(2, 3, 4, 6))
    assert space.dims["a"].prunable  # tied to the Linear by the residual addition


def test_reshape_sized_by_other_channels_keeps_both_whole():
    """The fold takes its channel count from the conv's output, but folds the Linear's: kept whole, not wrong."""
    space = check_exact(randomize(Unfold(residual=False)), torch.randn(2, 3, 4, 6), seeds=())
    assert not space.dims["a"].prunable and not space.dims["lin"].prunable
    assert "computed from other channels" in space.dims["lin"].protected


class ShapeOf(nn.Module):
    """``reshape(x.shape)`` / ``reshape_as(x)`` of tokens made by a Linear: the same channels only with ``tied``."""

    def __init__(self, tied: bool, method: str):
        super().__init__()
        self.tied, self.method = tied, method
        self.a, self.lin, self.b = nn.Conv2d(3, 32, 1), nn.Linear(32, 32), nn.Conv2d(32, 4, 1)

    def forward(self, x):
        x = self.a(x)
        t = x.flatten(2).transpose(1, 2)
        t = t + self.lin(t) if self.tied else self.lin(t)
        t = t.transpose(1, 2)
        return self.b(t.reshape(x.shape) if self.method == "shape" else t.reshape_as(x))


@pytest.mark.parametrize("method", ["shape", "as"])
def test_shape_taken_from_another_tensor(method):
    space = check_exact(randomize(ShapeOf(True, method)), torch.randn(2, 3, 4, 4), seeds=(1,))
    assert space.dims["a"].prunable
    space = mdprune.analyze(ShapeOf(False, method), torch.randn(2, 3, 4, 4))
    assert "other channels" in space.dims["a"].protected and "other channels" in space.dims["lin"].protected
