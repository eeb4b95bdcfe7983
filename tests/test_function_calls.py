"""Layers written as function calls on the model's own tensors: ``F.conv2d`` with a parameter or buffer weight
(blur pools, hand-written convolutions) and ``torch.stack`` of branch features."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mdprune

from .conftest import check_plan


class Blur(nn.Module):
    """A fixed per-channel blur, as an anti-aliasing downsample (TResNet's): a non-persistent buffer holds one
    filter per channel, and ``groups`` is a literal."""

    def __init__(self, channels: int):
        super().__init__()
        f = torch.tensor([1.0, 2.0, 1.0])
        self.channels = channels
        self.register_buffer("filt", (f[:, None] * f[None, :] / 16).repeat(channels, 1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.filt, stride=2, groups=self.channels)


class HandConv(nn.Module):
    """A dense convolution written out with its own parameters."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3) * 0.2)
        self.bias = nn.Parameter(torch.randn(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, 1, 1)


class BlurNet(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blur = Blur(width)
        self.body = HandConv(width, 2 * width)
        self.head = nn.Linear(2 * width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(torch.relu(self.blur(self.stem(x))))).mean((2, 3)))


def _check(space: mdprune.PruningSpace, x: torch.Tensor) -> None:
    """The identity plan, every dimension at half its width, and a random plan: all exact."""
    with torch.no_grad():
        dense = space.module(x)
    check_plan(space, mdprune.Plan.identity(), x, dense, "identity")
    assert check_plan(space, mdprune.Plan.uniform(space, 0.5), x, label="half")
    check_plan(space, mdprune.Plan.random(space, seed=1), x, label="random")


def test_functional_convolutions_prune_exactly() -> None:
    torch.manual_seed(0)
    model, x = BlurNet().eval(), torch.randn(2, 3, 12, 12)
    space = mdprune.analyze(model, x)
    _check(space, x)
    assert {"stem", "body"} <= {d.name for d in space.prunable_dims()}
    assert space.tensors["body.weight"].axes[1] == space.tensors["blur.filt"].axes[0]
    assert {o.name for o in space.ops if o.kind == "conv2d"} == {"stem", "blur.conv2d", "body.conv2d_1"}
    slim = mdprune.slim(space, mdprune.Plan.uniform(space, 0.5))
    assert slim.blur.filt.shape[0] == slim.stem.out_channels == 8
    assert slim.body.weight.shape == (16, 8, 3, 3)


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.weight = nn.Parameter(torch.randn(8, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.stem(x), self.weight, groups=2).mean((2, 3))


def test_grouped_convolution_call_is_refused_by_name() -> None:
    with pytest.raises(mdprune.AnalysisError, match="grouped convolution call"):
        mdprune.analyze(Grouped(), torch.randn(1, 3, 4, 4))


class TwoBranches(nn.Module):
    """Two branch classifiers' features stacked and averaged (CrossViT's head), then one more layer."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 32), nn.Linear(6, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(torch.stack([self.a(x), self.b(x)], dim=1).mean(1)))


def test_stacked_features_share_their_channels() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 6)
    space = mdprune.analyze(TwoBranches().eval(), x)
    _check(space, x)
    assert space.tensors["a.weight"].axes[0] == space.tensors["b.weight"].axes[0]
    assert len(space.prunable_dims()) == 1


class WrittenLinear(nn.Module):
    """Products with parameters: a feature projection ``x @ w`` (SwiftFormer's ``q @ w_g``), a token mixer
    ``t @ x`` over the tokens, and relative logits ``x @ rel.T`` whose result has no channels."""

    def __init__(self, dim: int = 32, tokens: int = 6):
        super().__init__()
        self.inp = nn.Linear(5, dim)
        self.w = nn.Parameter(torch.randn(dim, 12) * 0.2)
        self.t = nn.Parameter(torch.randn(tokens, tokens) * 0.3)
        self.rel = nn.Parameter(torch.randn(tokens, dim) * 0.2)
        self.out = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))  # (B, N, dim)
        mixed = self.t @ h  # tokens mixed, channels kept
        logits = (h @ self.rel.transpose(0, 1)).softmax(-1)  # (B, N, N): no channels
        gate = (h @ self.w).mean(-1, keepdim=True)  # (B, N, 1)
        return self.out(logits @ mixed * gate).mean(1)


def test_products_with_parameters_are_followed() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5)
    space = mdprune.analyze(WrittenLinear().eval(), x)
    _check(space, x)
    d = space.tensors["w"].axes[0][0].dims[0]
    assert space.dims[d].prunable and space.tensors["rel"].axes[1] == space.tensors["w"].axes[0]
    assert "t" not in space.tensors and 1 not in space.tensors["w"].axes  # not channels: kept as they are
    assert sum(o.kind == "matmul" for o in space.ops) >= 3


class EinsumAttention(nn.Module):
    """Attention written with einsum, a relative position term with a parameter (SAM's ``bhwc,hkc->bhwk``) and
    an einsum without channels."""

    def __init__(self, dim: int = 64, heads: int = 2, tokens: int = 6):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.rel = nn.Parameter(torch.randn(tokens, dim // heads) * 0.2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (f(x).reshape(b, n, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        logits = torch.einsum("bhnd,bhmd->bhnm", q, k) + torch.einsum("bhnd,md->bhnm", q, self.rel)
        probs = logits.softmax(-1)
        probs = torch.einsum("bhnm,bhmk->bhnk", probs, probs)  # no channels
        out = torch.einsum("bhnm,bhmd->bhnd", probs, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class EinsumNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.attn, self.head = nn.Linear(5, 64), EinsumAttention(), nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.head(h + self.attn(h)).mean(1)


def test_einsum_products_are_followed() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5)
    space = mdprune.analyze(EinsumNet().eval(), x)
    _check(space, x)
    dims = {t: {d for seg in space.tensors[t].axes[a] for d in seg.dims} for t, a in
            (("attn.rel", 1), ("attn.k.weight", 0), ("attn.q.weight", 0))}
    assert dims["attn.rel"] <= dims["attn.k.weight"] == dims["attn.q.weight"]  # the q/k width of a head
    assert space.tensors["attn.v.weight"].axes[0] != space.tensors["attn.k.weight"].axes[0]
    assert sum(o.kind == "einsum" for o in space.ops) == 4
    assert any(d.prunable for d in space.dims.values() if d.name.startswith("attn.v"))


def test_an_einsum_summing_channels_keeps_them_whole() -> None:
    class Sum(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 16), nn.Linear(16, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return self.b(h) * torch.einsum("nc->n", h)[:, None]

    space = mdprune.analyze(Sum(), torch.randn(3, 4))
    assert "sums them within one einsum operand" in space.dims["a"].protected


class WrittenNorms(nn.Module):
    """A norm written out over the channels (``var`` over axis 1, MobileNetV5-like) and a max over tokens
    (VOLO's class-token pooling) with its indices."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 32, 1), nn.Conv2d(32, 32, 1), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = h / (h.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()
        t = torch.relu(self.b(h)).flatten(2).transpose(1, 2)  # (B, N, C)
        values, _ = t.max(1)
        return self.c(values + t.mean(1))


def test_reductions_over_channels_keep_them_whole_and_others_pass() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    space = mdprune.analyze(WrittenNorms().eval(), x)
    _check(space, x)
    assert "reduces over them" in space.dims["a"].protected
    assert space.dims["b"].prunable  # max over the tokens keeps the channels


class TiledPositions(nn.Module):
    """A window position embedding tiled over the windows (Hiera's absolute-window embedding): the parameter is
    repeated along its own spatial axes, its channel axis follows the features'."""

    def __init__(self):
        super().__init__()
        self.stem, self.head = nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.Linear(16, 4)
        self.pos = nn.Parameter(torch.randn(1, 16, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.pos.tile([s // w for s, w in zip(h.shape[-2:], self.pos.shape[-2:], strict=True)])
        return self.head(torch.relu(h + self.pos.repeat(1, 1, 2, 2)).mean((2, 3)))


def _positions_space(model: nn.Module) -> mdprune.PruningSpace:
    """Analyse a position-embedding model on 8x8 images: exact plans, and the stem's channels stay prunable."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    space = mdprune.analyze(model.eval(), x)
    _check(space, x)
    assert space.dims["stem"].prunable
    return space


def test_parameters_tiled_along_their_own_axes_keep_their_channels() -> None:
    _positions_space(TiledPositions())


class SummedPositions(nn.Module):
    """Hiera's absolute-window embedding: a global embedding resized to the feature map plus a window embedding
    tiled over it; the sum of the two parameters is added to the features."""

    def __init__(self):
        super().__init__()
        self.stem, self.head = nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.Linear(16, 4)
        self.pos = nn.Parameter(torch.randn(1, 16, 3, 3))
        self.pos_win = nn.Parameter(torch.randn(1, 16, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        pos = F.interpolate(self.pos, size=h.shape[-2:], mode="bicubic")
        pos = pos + self.pos_win.tile([s // w for s, w in zip(h.shape[-2:], self.pos_win.shape[-2:], strict=True)])
        return self.head(torch.relu(h + pos).mean((2, 3)))


def test_sums_of_parameters_follow_the_channels_they_meet() -> None:
    space = _positions_space(SummedPositions())
    plan = mdprune.Plan.uniform(space, 0.5)
    sizes, slim = plan.sizes(space), mdprune.slim(space, plan)
    assert slim.pos.shape[1] == slim.pos_win.shape[1] == sizes["stem"] < 16


class ProductGain(nn.Module):
    """A per-channel gain computed as the product of two parameters (a layer scale times a learned temperature)."""

    def __init__(self):
        super().__init__()
        self.stem, self.head = nn.Linear(6, 12), nn.Linear(12, 3)
        self.gain, self.temp = nn.Parameter(torch.randn(12)), nn.Parameter(torch.randn(1, 12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.stem(x) * (self.gain * self.temp)))


class SquareSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8, 8))
        self.stem = nn.Linear(5, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x) @ (self.a + self.b)


def test_products_of_parameters_are_exact_or_kept_whole() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    space = mdprune.analyze(ProductGain().eval(), x)
    _check(space, x)
    assert space.dims["stem"].prunable
    x = torch.randn(4, 5)
    space = mdprune.analyze(SquareSum().eval(), x)  # a sum along two shared axes: no channels to follow
    assert check_plan(space, mdprune.Plan.identity(), x) is not None
    assert "not channels" in space.dims["stem"].protected


class SoftmaxedParameters(nn.Module):
    """Parameters passed through softmax: over the channels (their entries mix: kept whole), per channel over
    another axis (prunable), and EfficientViM's head fusion (a softmax over its heads' weights)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 12, 3, padding=1), nn.Conv2d(12, 16, 3, padding=1)
        self.mix, self.temp = nn.Parameter(torch.randn(12)), nn.Parameter(torch.randn(16, 2))
        self.heads = nn.ModuleList([nn.Linear(12, 4), nn.Linear(16, 4)])
        self.weights = nn.Parameter(torch.randn(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x) * self.mix.softmax(0).view(1, -1, 1, 1)
        g = torch.relu(self.b(h)) * self.temp.softmax(-1)[:, 0].view(1, -1, 1, 1)
        w = self.weights.softmax(-1)
        return torch.stack([w[0] * self.heads[0](h.mean((2, 3))), w[1] * self.heads[1](g.mean((2, 3)))]).sum(0)


def test_softmax_of_parameters_keeps_only_the_axis_it_mixes() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    space = mdprune.analyze(SoftmaxedParameters().eval(), x)
    _check(space, x)
    assert space.dims["a"].protected and space.dims["b"].prunable


class PerChannelProducts(nn.Module):
    """Matrix products batched over channels (one product per channel, as in BAT's transforms): a computed
    matrix broadcast over the channels, and two tensors paired channel by channel. Then channels that end on
    the last axis (a product's columns) read by a 1x1 convolution as positions: kept whole, exactly."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 1)
        self.q = nn.Linear(8, 8)
        self.c = nn.Conv2d(1, 16, 1)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)  # (n, 16, 8, 8)
        mix = torch.eye(8) + x.mean(1, keepdim=True).softmax(-1)  # (n, 1, 8, 8): no channels
        z = self.b(torch.relu(y @ mix))
        paired = z @ y.transpose(-1, -2)  # channel i of z times channel i of y
        m = x.mean(1, keepdim=True)
        columns = m @ self.q(m)  # (n, 1, 8, 8): q's outputs on the last axis
        return self.head((paired + self.c(columns)).mean((2, 3)))


def test_products_batched_over_channels_pass_them_through() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    space = mdprune.analyze(PerChannelProducts().eval(), x)
    _check(space, x)
    assert {d.name for d in space.prunable_dims()} == {"a"}  # a, b and c tied by the products and the sum
    assert "where it expects positions" in space.dims["q"].protected


class ReducedGain(nn.Module):
    """A gain computed by reducing a parameter (its mean over a second axis): the remaining axis follows the
    channels it scales; the sum of a whole parameter is a number without channels."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16, 4)
        self.gain, self.shift = nn.Parameter(torch.randn(16, 3)), nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x) * self.gain.mean(1).view(1, -1, 1, 1) + self.shift.sum()
        return self.head(y.mean((2, 3)))


def test_reduced_parameters_follow_the_axes_they_keep() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    space = mdprune.analyze(ReducedGain().eval(), x)
    _check(space, x)
    assert space.dims["a"].prunable and space.tensors["gain"].axes.keys() == {0}


class TableLookup(nn.Module):
    """Gemma 4's position embeddings: a one-hot matrix (no channels) times a learned table, a product whose
    cost is counted as a fixed op; the features around it stay prunable."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(5, 64), nn.Linear(64, 8), nn.Linear(8, 3)
        self.table = nn.Parameter(torch.randn(6, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = F.one_hot(torch.arange(x.shape[1]), 6).float() @ self.table  # (N, 8)
        return self.head(self.b(torch.relu(self.a(x))) + positions).mean(1)


def test_products_of_a_parameter_without_channels_are_counted() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5)
    space = mdprune.analyze(TableLookup().eval(), x)
    _check(space, x)  # MACs included: the lookup's product is counted
    assert space.dims["a"].prunable and not space.dims["b"].prunable
