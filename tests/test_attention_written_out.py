"""Attention written out in a model's own code (no adapter): ``q @ k.transpose(-2, -1) * scale``, softmax,
``@ v``, or ``F.scaled_dot_product_attention``. The q/k and v widths per head prune exactly (heads kept), the
softmax scale stays the dense one, and the latency tables get an attention op. A fused qkv reshaped into
(3, heads, width) ties q, k and v to one width per head (timm's ``Attention`` adapter prunes them apart)."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import mdprune

from .conftest import check_exact, check_plan, randomize_norms


class HandAttention(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 2, fused: bool = False, bias: bool = False, table: bool = False,
                 merge_c: bool = False):
        super().__init__()
        self.heads, self.hd, self.fused, self.merge_c = heads, dim // heads, fused, merge_c
        self.scale = self.hd ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.randn(1, heads, 16, 16) * 0.1) if bias else None  # 16 tokens
        self.table = nn.Parameter(torch.randn(49, heads) * 0.1) if table else None  # relative positions
        self.register_buffer("index", torch.randint(0, 49, (16, 16)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused:
            o = F.scaled_dot_product_attention(q, k, v)  # the default scale: 1 / sqrt(q width)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            if self.bias is not None:
                attn = attn + self.bias
            if self.table is not None:  # a table gathered by an index buffer, reshaped, added to the scores
                attn = attn + self.table[self.index.view(-1)].view(16, 16, -1).permute(2, 0, 1).unsqueeze(0)
            o = attn.softmax(dim=-1) @ v
        # the heads merged back to c (the input's width, read from its shape) or to -1: the same slim model
        return self.proj(o.transpose(1, 2).reshape(b, n, c if self.merge_c else -1))


class TinyViT(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.embed = nn.Conv2d(3, 64, 4, 4)
        self.norm1 = nn.LayerNorm(64)
        self.attn = HandAttention(**kw)
        self.norm2 = nn.LayerNorm(64)
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


@pytest.mark.parametrize("kw", [{}, {"fused": True}, {"bias": True}, {"table": True}, {"merge_c": True}])
def test_hand_written_attention_prunes_exactly(kw: dict) -> None:
    torch.manual_seed(0)
    model = randomize_norms(TinyViT(**kw)).eval()
    space = check_exact(model, torch.randn(2, 3, 16, 16), seeds=(1, 2, 3))
    core = [o for o in space.ops if o.kind == "attention"]
    assert len(core) == 1 and core[0].fixed["tokens"] == 16 and bool(core[0].fixed.get("bias")) == bool(
        {"bias", "table"} & set(kw))
    heads = space.dims[core[0].roles["heads"][0].dims[0]]
    assert not heads.prunable and heads.size == 2  # heads are kept
    qk, v = (space.dims[core[0].roles[r][0].dims[0]] for r in ("qk", "v"))
    assert qk.prunable and v.prunable and qk.kind == "qk"
    # one fused qkv reshaped as (3, heads, width) ties the three parts' widths: q/k and v prune together here
    assert qk.name == v.name
    # both residual branches are removable blocks (``c`` read from the shape and left unused is no second exit)
    assert {"attn", "mlp"} <= set(space.blocks)
    narrowest = {d.name: min(d.widths()) for d in space.prunable_dims()}
    slim = mdprune.slim(space, mdprune.Plan.from_sizes(space, narrowest))
    assert slim.get_submodule("attn.qkv").out_features < 192


@pytest.mark.parametrize("name, size", [("visformer_tiny", 224), ("pvt_v2_b0", 64), ("tiny_vit_5m_224", 224),
                                        ("cait_xxs24_224", 224), ("davit_tiny", 224), ("coat_lite_tiny", 224),
                                        ("edgenext_xx_small", 256), ("efficientformerv2_s0", 224),
                                        ("nextvit_small", 224), ("gcvit_xxtiny", 224), ("efficientvit_b0", 224)])
def test_timm_models_with_written_out_attention(name: str, size: int) -> None:
    """Visformer (q @ k^T written out), PVT v2 (spatial-reduction keys and values), TinyViT (learnt attention
    biases picked by an index tensor and passed as the mask: kept whole), CaiT (talking heads: layers across the
    heads of the scores, kept whole), DaViT (channel attention: a channels-by-channels matrix, kept whole), CoaT
    (a position-encoding module shared by several residual branches: those branches are not removed), EdgeNeXt
    (cross-covariance attention after split convolutions: overlapping branches; a Fourier position encoding into a
    convolution), EfficientFormerV2 (convolutions across the heads of the scores), NextViT (keys and values
    pooled by AvgPool1d), GCViT (a global query repeated over windows by repeat_interleave), EfficientViT (MIT;
    linear attention in a float32 autocast block whose device comes from a tensor)."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    space = check_exact(model, torch.randn(1, 3, size, size), seeds=(1,))
    assert any(o.kind in ("attention", "matmul") for o in space.ops)  # its products timed and counted


class PickTokens(nn.Module):
    """Tokens picked by an index buffer (``x[:, idx]``): the channels pass on their axis."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 32, 4, 4)
        self.register_buffer("idx", torch.tensor([0, 3, 5, 6, 9]))
        self.fc = nn.Linear(32, 48)
        self.head = nn.Linear(48, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)[:, self.idx]
        return self.head(self.fc(t).relu().mean(1))


def test_tokens_picked_by_an_index_tensor() -> None:
    torch.manual_seed(0)
    space = check_exact(PickTokens().eval(), torch.randn(2, 3, 16, 16), seeds=(1, 2))
    assert {"embed", "fc"} <= {d.name for d in space.prunable_dims()}


class RepeatedEncoding(nn.Module):
    """A position encoding from a coordinates buffer, repeated over the batch and fed to a convolution (XCiT's
    Fourier encoding): the convolution's input is kept whole, its outputs prune with the channels they join."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 3, padding=1)
        self.register_buffer("coords", torch.randn(1, 4, 8, 8))
        self.pos = nn.Conv2d(4, 16, 1)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = self.pos(self.coords.repeat(x.shape[0], 1, 1, 1))
        return self.head((self.embed(x) + pos).relu().mean((2, 3)))


def test_repeated_buffer_into_a_convolution() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    space = check_exact(RepeatedEncoding().eval(), x, seeds=(1,))
    assert check_plan(space, mdprune.Plan.smallest(space), x)
    assert {d.name for d in space.prunable_dims()} == {"pos"}  # pos and embed outputs: one dimension
    assert space.tensors["pos.weight"].axes.get(1) is None or all(
        not space.dims[d].prunable for s in space.tensors["pos.weight"].axes[1] for d in s.dims)


class SpatialReduction(nn.Module):
    """PVT's keys and values from a spatially reduced map: ``sr(x).reshape(B, C, -1)`` with ``C`` read from the
    block's input. ``C`` is a channel count alone: the slim model gets the convolution's kept width as a literal
    there, and the two widths prune apart."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 2, 2)
        self.norm = nn.LayerNorm(dim)
        self.sr = nn.Conv2d(dim, dim, 2, 2)
        self.kv = nn.Linear(dim, 24)
        self.head = nn.Linear(dim + 24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        b, n, c = t.shape
        m = t.permute(0, 2, 1).reshape(b, c, 4, 4)
        r = self.norm(self.sr(m).reshape(b, c, -1).permute(0, 2, 1))
        return self.head(torch.cat([t.mean(1), self.kv(r).mean(1)], 1))


def test_width_read_from_another_tensor_becomes_a_literal() -> None:
    torch.manual_seed(0)
    model = randomize_norms(SpatialReduction()).eval()
    x = torch.randn(2, 3, 8, 8)
    space = check_exact(model, x, seeds=(1, 2, 3))
    sr = space.tensors["sr.weight"].axes[0][0].dims[0]  # the convolution's output channels
    assert sr != "embed" and {"embed", sr} <= {d.name for d in space.prunable_dims()}  # neither kept whole
    plan = mdprune.Plan.from_sizes(space, {"embed": 24, sr: 16})
    assert check_plan(space, plan, x)
    slim = mdprune.slim(space, plan)
    assert (slim.get_submodule("embed").out_channels, slim.get_submodule("sr").out_channels) == (24, 16)
