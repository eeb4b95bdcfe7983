"""Weight-standardised convolutions (timm's StdConv2d, ScaledStdConv2d and their SAME-padded forms: BiT ResNet-V2,
NFNets) analyse and slim exactly: pruning a convolution's inputs standardises its weight over the kept ones, in
the slim model (a smaller convolution) and in the masked one (:class:`MaskedStdConv2d`) alike."""

from __future__ import annotations

from functools import partial

import pytest
import timm
import torch
from timm.layers import GroupNormAct, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
from timm.models.resnetv2 import ResNetV2

from mdprune.layers import layer_kind
from mdprune.layers.stdconv import MaskedStdConv2d

from .conftest import check_exact, rel_err
from .test_swin_levit_mobilevit import randomize


def test_bit_resnetv2() -> None:
    """BiT's pre-activation ResNet-V2: StdConv2d after GroupNorm + act; the inputs of every conv prunable."""
    torch.manual_seed(0)
    model = randomize(ResNetV2(layers=(1, 2), channels=(64, 128), num_classes=10, stem_chs=32, stem_type="fixed",
                               norm_layer=partial(GroupNormAct, num_groups=8)))  # fixed: BiT's ConstantPad2d stem
    space = check_exact(model, torch.randn(2, 3, 32, 32), seeds=(1, 2, 3))
    assert len(space.blocks) == 3 and len(space.prunable_dims()) >= 8


def test_nf_regnet() -> None:
    """A normaliser-free RegNet: ScaledStdConv2d (gain per output channel), grouped convolutions, SE, no norms."""
    torch.manual_seed(0)
    model = randomize(timm.create_model("nf_regnet_b0", num_classes=10))
    space = check_exact(model, torch.randn(2, 3, 32, 32))
    assert any(t.endswith(".gain") and space.tensors[t].axes for t in space.tensors)
    assert len(space.prunable_dims()) >= 20


@pytest.mark.parametrize("cls", [StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame])
def test_masked_stand_in_is_the_smaller_convolution(cls) -> None:  # noqa: ANN001
    """Standardised over the kept inputs only: the stand-in equals the convolution of the kept inputs alone."""
    torch.manual_seed(0)
    conv = cls(6, 4, 3)
    assert layer_kind(conv).masked is MaskedStdConv2d
    keep = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    small = cls(int(keep.sum()), 4, 3)
    with torch.no_grad():
        conv.weight.normal_()
        small.weight.copy_(conv.weight[:, keep])
        for t in ("bias", "gain"):
            if getattr(conv, t, None) is not None:
                getattr(conv, t).uniform_(0.5, 1.5)
                getattr(small, t).copy_(getattr(conv, t))
        if hasattr(conv, "scale"):
            small.scale = conv.scale  # the dense fan-in's scale is kept
    masked = MaskedStdConv2d(conv)
    masked.set_keep(keep)
    x = torch.randn(2, 6, 9, 9) * keep.view(-1, 1, 1)
    with torch.no_grad():
        assert rel_err(small(x[:, keep]), masked(x)) <= 1e-5
        masked.set_keep(torch.ones(6, dtype=torch.bool))
        assert rel_err(conv(x), masked(x)) <= 1e-5  # nothing pruned: the original convolution
