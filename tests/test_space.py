"""Model analysis: dimensions, blocks and ops found on known architectures; errors on unknown ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mdprune
from mdprune.space import Seg

from .conftest import build
from .models import SortsChannels


def test_resnet18_structure(resnet18):
    _, _, space = resnet18
    assert len(space.blocks) == 8
    assert sorted(b.shortcut for b in space.blocks.values()).count("projection") == 3
    assert space.dims["input"].protected and space.dims["fc"].protected
    # the stem's output channels are the residual stream of layer1: one coupled dimension
    stem = space.tensors["conv1.weight"].axes[0]
    assert stem == space.tensors["layer1.0.conv2.weight"].axes[0] == space.tensors["layer1.1.bn2.weight"].axes[0]
    assert space.dims["layer1.0.conv1"].block == "layer1.0"
    assert space.dims["conv1"].block is None
    # a conv op knows the dimensions on both its sides
    op = next(o for o in space.ops if o.name == "layer1.0.conv2")
    assert op.roles["in"] == (Seg(("layer1.0.conv1",)),) and op.roles["out"] == (Seg(("conv1",)),)
    assert op.fixed["kernel"] == (3, 3) and op.fixed["batch"] == 2 and op.block == "layer1.0"
    assert space.count_params() == sum(p.numel() for p in resnet18[0].parameters())


def test_deit_dimensions_and_blocks(deit_tiny):
    _, _, space = deit_tiny
    kinds = {}
    for d in space.prunable_dims():
        kinds[d.kind] = kinds.get(d.kind, 0) + 1
    assert kinds == {"embed": 1, "heads": 12, "qk": 12, "v": 12, "mlp": 12}
    assert space.dims["embed"].size == 192 and space.dims["blocks.3.attn.heads"].size == 3
    assert {b.name for b in space.blocks.values()} >= {"blocks.0.attn", "blocks.0.mlp", "blocks.11.mlp"}
    assert all(b.shortcut == "identity" for b in space.blocks.values())
    qkv = space.tensors["blocks.0.attn.qkv.weight"].axes[0]
    assert [s.dims[1] for s in qkv] == ["blocks.0.attn.qk", "blocks.0.attn.qk", "blocks.0.attn.v"]
    assert space.tensors["cls_token"].axes == {2: (Seg(("embed",)),)}
    kinds_ops = [o.kind for o in space.ops if o.block == "blocks.0.attn" and o.kind != "node"]
    assert kinds_ops == ["linear", "linear", "linear", "attention", "linear"]
    nodes = {o.fixed["target"] for o in space.ops if o.block == "blocks.0.attn" and o.kind == "node"}
    assert nodes == {"LayerNorm", "operator.add"}  # the branch's norm and the residual addition


def test_tiny_cnn_concat_depthwise_and_flatten():
    _, _, space = build("tiny_cnn")
    dw = space.tensors["dw.weight"].axes[0]
    assert dw == (Seg(("left",)), Seg(("right",)))  # concatenated channels, kept through the depthwise conv
    assert space.tensors["fc.weight"].axes[1] == (Seg(("left",), 4), Seg(("right",), 4))  # flatten of 2x2
    assert space.dims["res.0"].block == "res"


def test_tiny_vit_multihead_attention():
    _, _, space = build("tiny_vit")
    assert space.attention["blocks.0.attn"]["kind"] == "mha"
    assert space.dims["blocks.0.attn.heads"].size == 4 and space.dims["embed"].size == 32
    assert len(space.removable_blocks()) == 4


def test_steps_and_widths():
    model = mdprune.create_model("resnet18", num_classes=10)
    space = mdprune.analyze(model, torch.randn(1, 3, 32, 32), steps={"channel": 16, "layer4.0.conv1": 64})
    assert space.dims["conv1"].widths() == [16, 32, 48, 64]
    assert space.dims["layer4.0.conv1"].widths() == [64, 128, 192, 256, 320, 384, 448, 512]


def test_unsupported_op_names_module_and_op():
    model = SortsChannels()
    with pytest.raises(mdprune.AnalysisError) as e:
        mdprune.analyze(model, torch.randn(1, 3, 8, 8))
    assert "sort" in str(e.value) and "odd" in str(e.value) and "ignored_layers" in str(e.value)


def test_ignored_layers_keep_channels_whole():
    model = SortsChannels()
    space = mdprune.analyze(model, torch.randn(1, 3, 8, 8), ignored_layers=["odd"])
    assert "ignored layer odd" in space.dims["conv"].protected
    assert not space.prunable_dims()
    with pytest.raises(mdprune.AnalysisError, match="does not have"):
        mdprune.analyze(model, torch.randn(1, 3, 8, 8), ignored_layers=["nope"])


def test_unknown_layer_is_named():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LocalResponseNorm(2), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 8, 8))
    with pytest.raises(mdprune.AnalysisError, match=r"'1'"):
        mdprune.analyze(model, torch.randn(1, 3, 8, 8))


def test_hard_coded_width_in_reshape_is_patched():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)
            self.fc = nn.Linear(16 * 4 * 4, 2)

        def forward(self, x):
            return self.fc(self.conv(x).view(-1, 16 * 4 * 4))

    model = Net().eval()
    x = torch.randn(2, 3, 4, 4)
    space = mdprune.analyze(model, x)
    plan = mdprune.Plan({"conv": list(range(8))})
    s = mdprune.slim(space, plan)
    with torch.no_grad():
        assert torch.allclose(s(x), mdprune.masked(space, plan)(x), atol=1e-5)


def test_grouped_convolution_prunes_the_width_per_group():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2), nn.Flatten(1), nn.LazyLinear(2))
    model(torch.randn(1, 3, 8, 8))
    space = mdprune.analyze(model, torch.randn(1, 3, 8, 8))
    assert space.dims["0:groups"].size == 2 and "group count" in space.dims["0:groups"].protected
    # the input conv's 8 channels read as 2 groups x 4, the grouped conv's output likewise: a width per group each
    assert {n for n, d in space.dims.items() if d.size == 4 and d.prunable} == {"0", "1"}
