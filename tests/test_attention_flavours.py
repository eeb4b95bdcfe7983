"""Every attention flavour analyses and slims exactly: heads, q/k width, v width, MLP and embedding prunable.

torchvision's ViT (nn.MultiheadAttention), DeiT distilled, ViT with average pooling, BEiT (relative position
bias, q/v biases), EVA-02 (rotary embedding, interleaved and half layouts, q/k norms, inner norm), timm's gated
attention, timm and torchvision window attention (relative position bias, shifted windows, padding), and the
command line's --input-size for every constructor.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

import mdprune
from mdprune import AnalysisError, Plan
from mdprune.models import ModelError, create_model_for_size

from .conftest import check_exact, measured_macs, rel_err


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random (zero-initialised heads, biases, position tables and norms would hide errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ln_1.weight",
                                         "ln_2.weight", "ln.weight")) else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return model.eval()



def assert_attention_prunable(space: mdprune.PruningSpace, kinds: tuple[str, ...] = ("heads", "qk", "v")) -> None:
    assert space.attention
    for path, info in space.attention.items():
        for k in kinds:
            d = space.dims[info[k]]
            assert d.prunable, f"{path} {k}: {d.protected}"


def assert_kinds_prunable(space: mdprune.PruningSpace, kinds: tuple[str, ...]) -> None:
    found = space.summary()["prunable_by_kind"]
    assert all(found.get(k) for k in kinds), found


def timm_model(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return randomize(mdprune.create_model(f"timm:{name}", num_classes=10, **kwargs))


# ---- whole models ------------------------------------------------------------------------------------------------

def test_torchvision_vit_multihead_attention_with_discarded_weights():
    torch.manual_seed(0)
    model = randomize(torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=4,
                                                           hidden_dim=64, mlp_dim=128, num_classes=10))
    space = check_exact(model, torch.randn(2, 3, 32, 32))
    assert {a["kind"] for a in space.attention.values()} == {"mha"}
    assert_attention_prunable(space)
    assert_kinds_prunable(space, ("embed", "mlp", "heads", "qk", "v"))


def test_deit_distilled_two_tokens_two_heads():
    space = check_exact(timm_model("deit_tiny_distilled_patch16_224", img_size=32, depth=2),
                        torch.randn(2, 3, 32, 32))
    assert_attention_prunable(space)
    assert_kinds_prunable(space, ("embed", "mlp"))


def test_vit_without_class_token_average_pool():
    space = check_exact(timm_model("vit_small_patch16_224", img_size=32, depth=2, class_token=False,
                                   global_pool="avg"), torch.randn(2, 3, 32, 32))
    assert_attention_prunable(space)
    assert_kinds_prunable(space, ("embed", "mlp"))


def test_vit_with_attention_pooling_head():
    """SigLIP's head: a learned latent query attends over the tokens (its MACs count with PyTorch's counter)."""
    space = check_exact(timm_model("vit_small_patch16_224", img_size=32, depth=2, global_pool="map",
                                   class_token=False), torch.randn(2, 3, 32, 32))
    assert_attention_prunable(space)
    assert_kinds_prunable(space, ("embed", "mlp"))


def test_beit_relative_position_bias_follows_heads():
    model = timm_model("beit_base_patch16_224", img_size=32, depth=2, embed_dim=64, num_heads=4, init_values=0.0)
    space = check_exact(model, torch.randn(2, 3, 32, 32))
    assert {a["kind"] for a in space.attention.values()} == {"beit"}
    assert_attention_prunable(space)
    assert_kinds_prunable(space, ("embed", "mlp"))
    heads = space.attention["blocks.0.attn"]["heads"]
    assert space.tensors["blocks.0.attn.relative_position_bias_table"].axes[1][0].dims == (heads,)
    plan = Plan({heads: [0, 3]})
    s = mdprune.slim(space, plan)
    assert s.get_submodule("blocks.0.attn").pos_bias.table.shape[1] == 2


@pytest.mark.parametrize("kwargs", [{}, {"swiglu_mlp": False, "rope_rotate_half": True, "qk_norm": True,
                                         "scale_attn_inner": True}], ids=["interleaved", "half-qknorm-innernorm"])
def test_eva_rotary_embedding_prunes_qk_in_pairs(kwargs):
    model = timm_model("eva02_tiny_patch14_224", img_size=28, depth=2, **kwargs)  # SwiGLU MLP by default
    space = check_exact(model, torch.randn(2, 3, 28, 28))
    assert {a["kind"] for a in space.attention.values()} == {"eva"}
    assert_attention_prunable(space)
    assert_kinds_prunable(space, ("embed", "mlp"))
    qk = space.attention["blocks.0.attn"]["qk"]
    assert space.dims[qk].size == 32  # 64 q/k columns per head, pruned as 32 rotary pairs


def test_gated_attention_with_norms():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(12, 64)
            self.norm = nn.LayerNorm(64)
            self.attn = timm.layers.Attention(64, num_heads=4, qkv_bias=True, qk_norm=True, scale_norm=True,
                                              gated=True, norm_layer=nn.LayerNorm)
            self.head = nn.Linear(64, 10)

        def forward(self, x):
            x = self.embed(x)
            x = x + self.attn(self.norm(x))
            return self.head(x.mean(1))

    torch.manual_seed(0)
    space = check_exact(randomize(Net()), torch.randn(2, 9, 12))
    assert_attention_prunable(space)


def test_efficientformer_heads_with_attention_biases():
    model = timm_model("efficientformer_l1", depths=(1, 1, 1, 1), embed_dims=(16, 16, 32, 32))
    space = check_exact(model, torch.randn(1, 3, 224, 224), seeds=(1,))
    assert {a["kind"] for a in space.attention.values()} == {"efficientformer"}
    assert_attention_prunable(space, ("heads",))  # q, k, v interleaved head by head: widths kept whole
    qk = space.dims[space.attention["stages.3.blocks.1.token_mixer"]["qk"]]
    assert "interleaved head by head" in qk.protected


class Levit(nn.Module):
    """timm's LeViT attention (Linear + BatchNorm projections) and its downsampling attention, on 4x4 tokens."""

    def __init__(self, down: bool):
        super().__init__()
        from timm.models.levit import Attention, AttentionDownsample

        self.down = down
        self.embed = nn.Linear(12, 32)
        self.attn = Attention(32, key_dim=16, num_heads=4, attn_ratio=2, resolution=4, act_layer=nn.Hardswish)
        self.attn2 = AttentionDownsample(32, 48, key_dim=16, num_heads=4, attn_ratio=2, stride=2, resolution=4,
                                         act_layer=nn.Hardswish) if down else None
        self.head = nn.Linear(48 if down else 32, 10)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attn(x)
        if self.attn2 is not None:
            x = self.attn2(x)
        return self.head(x.mean(1))


def test_levit_heads_sliced_in_place():
    torch.manual_seed(0)
    space = check_exact(randomize(Levit(down=False)), torch.randn(2, 16, 12))
    assert {a["kind"] for a in space.attention.values()} == {"levit"}
    assert_attention_prunable(space, ("heads",))
    s = mdprune.slim(space, Plan({space.attention["attn"]["heads"]: [1, 2]}))
    assert s.get_submodule("attn").num_heads == 2 and s.get_submodule("attn").attention_biases.shape[0] == 2


def test_levit_downsampling_attention():
    """Queries from every other token: slim = masked, parameters and MACs (tokens x tokens_kv) as predicted."""
    torch.manual_seed(0)
    model, x = randomize(Levit(down=True)), torch.randn(2, 16, 12)
    space = mdprune.analyze(model, x)
    assert space.dims[space.attention["attn2"]["heads"]].prunable
    for seed in (1, 2):
        plan = Plan.random(space, seed=seed, block_prob=0.3)
        m, s = mdprune.masked(space, plan).eval(), mdprune.slim(space, plan).eval()
        with torch.no_grad():
            assert rel_err(m(x), s(x)) <= 1e-4
        assert sum(p.numel() for p in s.parameters()) == space.count_params(plan.sizes(space), set(plan.removed))
        assert measured_macs(s, x) == space.count_macs(plan.sizes(space), set(plan.removed))
    op = next(o for o in space.ops if o.name == "attn2.attn")
    assert (op.fixed["tokens"], op.fixed["tokens_kv"]) == (4, 16)


def test_maxvit_block_and_grid_attention():
    torch.manual_seed(0)
    model = randomize(torchvision.models.MaxVit(input_size=(32, 32), stem_channels=16, partition_size=2,
                                                block_channels=[32, 64], block_layers=[1, 1], head_dim=16,
                                                stochastic_depth_prob=0.0, num_classes=10))
    space = check_exact(model, torch.randn(2, 3, 32, 32))
    assert {a["kind"] for a in space.attention.values()} == {"tv_maxvit"}
    assert_attention_prunable(space)
    assert_kinds_prunable(space, ("embed", "mlp", "channel"))


# ---- window attention ------------------------------------------------------------------------------------------

class TimmWindows(nn.Module):
    """timm's swin WindowAttention on partitioned windows, with a shift mask."""

    def __init__(self, dim: int = 64, window: int = 4):
        super().__init__()
        from timm.models.swin_transformer import WindowAttention

        self.window = window
        self.stem = nn.Conv2d(3, dim, 4, 4)
        self.norm = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads=4, window_size=window)
        n = window * window
        self.register_buffer("mask", torch.where(torch.rand(4, n, n) > 0.7, -100.0, 0.0))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)  # B, 8, 8, C
        b, h, w, c = x.shape
        ws = self.window
        win = x.reshape(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        win = win + self.attn(self.norm(win), mask=self.mask)
        return self.head(win.mean(1))


class TorchvisionWindows(nn.Module):
    """torchvision's ShiftedWindowAttention on an NHWC map that needs padding (6x6, windows of 4, shift 2)."""

    def __init__(self, dim: int = 64):
        super().__init__()
        from torchvision.models.swin_transformer import ShiftedWindowAttention

        self.stem = nn.Conv2d(3, dim, 4, 4)
        self.norm = nn.LayerNorm(dim)
        self.attn = ShiftedWindowAttention(dim, [4, 4], [2, 2], num_heads=4)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = ShiftedWindowAttention(dim, [4, 4], [0, 0], num_heads=4)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)  # B, 6, 6, C
        x = x + self.attn(self.norm(x))
        x = x + self.attn2(self.norm2(x))
        return self.head(x.mean((1, 2)))


@pytest.mark.parametrize("net, size", [(TimmWindows, 32), (TorchvisionWindows, 24)], ids=["timm", "torchvision"])
def test_window_attention(net, size):
    torch.manual_seed(0)
    space = check_exact(randomize(net()), torch.randn(2, 3, size, size))
    assert_attention_prunable(space)
    op = next(o for o in space.ops if o.kind == "attention")
    assert op.fixed["tokens"] == 16 and op.fixed["windows"] == 4 and op.fixed["bias"]


def test_latency_ops_of_windows_bias_and_rotary_attention():
    from mdprune.latency.ops import op_module

    spaces = [mdprune.analyze(TorchvisionWindows().eval(), torch.randn(1, 3, 24, 24)),
              mdprune.analyze(timm_model("eva02_tiny_patch14_224", img_size=28, depth=1, swiglu_mlp=False),
                              torch.randn(1, 3, 28, 28))]
    seen = set()
    for space in spaces:
        for op in (o for o in space.ops if o.kind == "attention"):
            module, inputs = op_module(op.kind, op.fixed, {"heads": 2, "qk": 8, "v": 16}, batch=1)
            out = module(*inputs)
            assert out.shape == (op.fixed.get("windows", 1), op.fixed["tokens"], 2 * 16)
            seen |= {k for k in ("windows", "bias", "rope") if op.fixed.get(k)}
    assert seen == {"windows", "bias", "rope"}


@pytest.mark.parametrize("which", ["windows", "eva"])
def test_prune_end_to_end(which, tmp_path):
    """Importance, latency table (operation counts), solve, slim: the whole pipeline takes these kinds."""
    from mdprune.latency import LatencySettings, TimingSettings

    if which == "windows":
        model, x = randomize(TorchvisionWindows()), torch.randn(1, 3, 24, 24)
    else:
        model = timm_model("eva02_tiny_patch14_224", img_size=28, depth=1, swiglu_mlp=False)
        x = torch.randn(1, 3, 28, 28)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, *x.shape[1:], generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]
    settings = LatencySettings(grid_points=3, grid_points_3d=2, backend="flops",
                               timing=TimingSettings(warmup=1, reps=2, rounds=2, min_sample_ms=0.2))
    slim, report = mdprune.prune(model, x, "80%", data=data, lut=tmp_path, settings=settings)
    assert report.params[1] < report.params[0]
    with torch.no_grad():
        assert slim(x).shape == model(x).shape


# ---- calls mdprune refuses, by name ----------------------------------------------------------------------------

def test_multihead_attention_weights_used_is_named():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            out, weights = self.attn(x, x, x)
            return self.head(out.mean(1)) + weights.mean()

    with pytest.raises(AnalysisError, match="attention weights are used"):
        mdprune.analyze(Net(), torch.randn(1, 5, 16))


def test_multihead_attention_sequence_first():
    class Net(nn.Module):
        def __init__(self, cross: bool = False):
            super().__init__()
            self.cross = cross
            self.norm = nn.LayerNorm(32)
            self.attn = nn.MultiheadAttention(32, 2)
            self.head = nn.Linear(32, 2)

        def forward(self, x):
            x = x.transpose(0, 1)  # tokens, batch, features
            y = self.norm(x)
            x = x + self.attn(y, x if self.cross else y, y, need_weights=False)[0]
            return self.head(x.mean(0))

    torch.manual_seed(0)
    space = check_exact(randomize(Net()), torch.randn(2, 5, 32))
    assert_attention_prunable(space)
    with pytest.raises(AnalysisError, match="self-attention"):
        mdprune.analyze(Net(cross=True), torch.randn(2, 5, 32))


def test_attention_mask_and_grouped_query_are_named():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = timm.layers.Attention(16, num_heads=2)
            self.register_buffer("m", torch.zeros(5, 5))

        def forward(self, x):
            return self.attn(x, attn_mask=self.m)

    with pytest.raises(AnalysisError, match=r"attn\.|attn_mask"):
        mdprune.analyze(Masked(), torch.randn(1, 5, 16))

    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = timm.layers.AttentionRope(16, num_heads=4, qkv_fused=False, num_kv_heads=2)

        def forward(self, x):
            return self.attn(x)

    with pytest.raises(AnalysisError, match="grouped-query"):
        mdprune.analyze(Grouped(), torch.randn(1, 5, 16))


# ---- input size ------------------------------------------------------------------------------------------------

def test_input_size_goes_to_the_keyword_each_constructor_takes():
    vit = create_model_for_size("torchvision:vit_b_16", 32, num_classes=10)
    assert vit.image_size == 32 and vit._mdprune_source["kwargs"]["image_size"] == 32
    deit = create_model_for_size("timm:deit_tiny_patch16_224", 32, num_classes=10)
    assert tuple(deit.patch_embed.img_size) == (32, 32)
    distilled = create_model_for_size("timm:deit_tiny_distilled_patch16_224", 32, num_classes=10)  # **kwargs
    assert tuple(distilled.patch_embed.img_size) == (32, 32)
    swin = create_model_for_size("timm:swin_tiny_patch4_window7_224", 64, num_classes=10)
    assert swin._mdprune_source["kwargs"]["img_size"] == 64
    resnet = create_model_for_size("resnet18", 40, num_classes=10)  # no size keyword: runs as built
    assert "image_size" not in resnet._mdprune_source["kwargs"]


def test_input_size_a_model_cannot_take_is_a_clear_error(capsys):
    from mdprune.cli import main

    with pytest.raises(ModelError, match="64x64"):
        create_model_for_size("timm:efficientformer_l1", 64, num_classes=10)
    assert main(["inspect", "torchvision:maxvit_t", "--input-size", "64"]) == 2
    err = capsys.readouterr().err
    assert "64x64" in err and "Traceback" not in err
