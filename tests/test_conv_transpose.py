"""Transposed convolutions (upsampling in decoders, mask and keypoint heads) analyse, mask and slim exactly; their
latency op is the layer alone at the analysed sizes; grouped ones are kept whole."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mdprune
from mdprune.latency.ops import op_module
from mdprune.space import AnalysisError

from .conftest import check_exact, randomize_norms


class TinyUNet(nn.Module):
    """Encoder, a transposed convolution up, a skip connection concatenated, a head."""

    def __init__(self, up_kwargs: dict | None = None, output_size: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 12, **(up_kwargs or {"kernel_size": 2, "stride": 2}))
        self.up_act = nn.Sequential(nn.BatchNorm2d(12), nn.ReLU())
        self.fuse = nn.Conv2d(12 + 8, 10, 1)
        self.output_size = output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.stem(x)
        y = self.down(skip)
        y = self.up(y, output_size=skip.shape[-2:]) if self.output_size else self.up(y)
        y = self.up_act(y)
        return self.fuse(torch.cat([y, skip], 1)).mean((2, 3))


@pytest.mark.parametrize("up_kwargs, output_size", [
    ({"kernel_size": 2, "stride": 2}, False),
    ({"kernel_size": 3, "stride": 2, "padding": 1, "output_padding": 1}, False),
    ({"kernel_size": 3, "stride": 2, "padding": 1}, True),  # the size asked in the call
])
def test_unet_prunes_exactly(up_kwargs: dict, output_size: bool) -> None:
    torch.manual_seed(0)
    model = randomize_norms(TinyUNet(up_kwargs, output_size)).eval()
    x = torch.randn(2, 3, 16, 16)
    space = check_exact(model, x, seeds=(1, 2, 3))
    op = next(o for o in space.ops if o.name == "up")
    assert op.kind == "conv_transpose2d" and len(op.dims()) == 2  # the down conv's and its own output channels
    assert "up" in {d.name for d in space.prunable_dims()}
    # the op alone at the dense widths produces the layer's output size; MACs: every input pixel, every tap
    module, inputs = op_module(op.kind, op.fixed, {"in": 16, "out": 12}, 2, "cpu", torch.float32)
    assert module(*inputs).shape == (2, 12, 16, 16)
    k = model.up.kernel_size
    assert op.macs(space.dense_sizes()) == 2 * 8 * 8 * 16 * 12 * k[0] * k[1]  # (check_exact also counted them)


def test_slim_transposed_convolution_is_smaller_and_loads(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = TinyUNet().eval()
    x = torch.randn(1, 3, 16, 16)
    space = mdprune.analyze(model, x, source={"name": "tests.test_conv_transpose:TinyUNet", "kwargs": {}})
    slim = mdprune.slim(space, mdprune.Plan.smallest(space)).eval()
    up = slim.get_submodule("up")
    assert up.weight.shape[:2] == (up.in_channels, up.out_channels) and up.in_channels < 16 and up.out_channels < 12
    mdprune.save(slim, tmp_path / "m.pt")
    with torch.no_grad():
        assert torch.allclose(mdprune.load(tmp_path / "m.pt", trust_code=True).eval()(x), slim(x), atol=1e-5)


def test_grouped_transposed_convolution_is_kept_whole() -> None:
    model = TinyUNet({"kernel_size": 2, "stride": 2, "groups": 4}).eval()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(AnalysisError, match="ConvTranspose2d"):
        mdprune.analyze(model, x)
    space = mdprune.analyze(model, x, unsupported="keep")
    plan = mdprune.Plan.random(space, seed=1, block_prob=0.0)
    slim = mdprune.slim(space, plan)
    assert slim.get_submodule("up").weight.shape == model.up.weight.shape
    with torch.no_grad():
        assert torch.allclose(mdprune.masked(space, plan).eval()(x), slim.eval()(x), atol=1e-4)
