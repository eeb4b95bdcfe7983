"""Norm variants (subclasses, norm + activation modules, norms written as function calls), pass-through layers,
and the analysis errors: every problem listed at once, ``unsupported="keep"``, autograd Functions, fx failures."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, GroupNormAct, LayerNorm2d, LayerNormAct, LayerNormAct2d, LayerScale2d
from timm.layers.activations import GELUTanh, HardSwish
from timm.layers.activations_me import SwishMe
from torch import nn
from torchvision.models.convnext import LayerNorm2d as TorchvisionLayerNorm2d
from torchvision.ops import SqueezeExcitation, StochasticDepth
from torchvision.ops.misc import FrozenBatchNorm2d

import mdprune
from mdprune import AnalysisError, Plan
from mdprune.cli import main
from mdprune.space.functions import NODE_KEY
from mdprune.space.modules import module_rule

from .conftest import check_plan


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial statistics and affine tensors in every norm (buffers too), so that masking errors show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            leaf = name.rpartition(".")[2]
            if leaf in ("running_var", "rv"):
                t.uniform_(0.5, 2.0, generator=g)
            elif leaf in ("running_mean", "rm", "bias", "b", "lb") or (leaf in ("weight", "w", "lw") and t.dim() == 1):
                t.normal_(1.0 if leaf in ("weight", "w", "lw") else 0.0, 0.3, generator=g)
    return model


def check_random_plans(model: nn.Module, x: torch.Tensor, space: mdprune.PruningSpace, seeds=(1, 2, 3)) -> None:
    """slim == masked, and the slim model's parameters and MACs are what the space predicts."""
    assert space.prunable_dims()
    shrunk = False
    for seed in seeds:
        shrunk |= check_plan(space, Plan.random(space, seed=seed, block_prob=0.3), x, label=f"seed {seed}")
    assert shrunk, "no random plan pruned anything"


# ---- norms and pass-throughs ---------------------------------------------------------------------------------

class FunctionalNorms(nn.Module):
    """Norms written as function calls on the module's own tensors, with a literal normalized_shape (a kwarg)."""

    def __init__(self, c: int):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.register_buffer("rm", torch.zeros(c))
        self.register_buffer("rv", torch.ones(c))
        self.lw, self.lb = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.rm, self.rv, self.w, self.b, False, 0.1, 1e-5)
        y = F.layer_norm(x.permute(0, 2, 3, 1), normalized_shape=(self.c,), weight=self.lw, bias=self.lb)
        return F.group_norm(y.permute(0, 3, 1, 2), self.c)  # one group per channel


class NormZoo(nn.Module):
    """A small CNN with every norm and pass-through variant the analysis must follow exactly."""

    default_input_size = (16, 16)

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bnact = BatchNormAct2d(16, act_layer=nn.SiLU)  # timm: BN + drop + act in one module
        self.conv1 = nn.Conv2d(16, 24, 3, padding=1)
        self.ln2d = LayerNorm2d(24)  # timm channels-first LayerNorm: traced into (permute, layer_norm, permute)
        self.act1 = GELUTanh()
        self.conv2 = nn.Conv2d(24, 24, 1)
        self.tvln = TorchvisionLayerNorm2d(24)  # torchvision's ConvNeXt LayerNorm2d, traced into
        self.scale = LayerScale2d(24)
        self.sd = StochasticDepth(0.2, "row")
        self.frozen = FrozenBatchNorm2d(24)
        self.func = FunctionalNorms(24)
        self.conv3 = nn.Conv2d(24, 32, 1)
        self.gn = nn.GroupNorm(32, 32)  # one group per channel: prunable
        self.lnact2d = LayerNormAct2d(32, act_layer=HardSwish)
        self.se = SqueezeExcitation(32, 8)
        self.conv4 = nn.Conv2d(32, 32, 3, padding=1)
        self.gnact = GroupNormAct(32, 4)  # groups of channels: kept whole
        self.swish = SwishMe()  # an activation built on an autograd Function, named as a pass-through
        self.conv5 = nn.Conv2d(32, 40, 1)
        self.lnact = LayerNormAct(40, act_layer=nn.GELU)  # channels last, after pooling
        self.fc = nn.Linear(40, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bnact(self.stem(x))
        y = self.act1(self.ln2d(self.conv1(x)))
        y = y + self.sd(self.scale(self.tvln(self.conv2(y))))
        y = self.func(self.frozen(y))
        z = self.se(self.lnact2d(self.gn(self.conv3(y))))
        z = self.swish(self.gnact(self.conv4(z)))
        z = self.conv5(z).mean((2, 3))
        return self.fc(self.lnact(z))


def test_module_rules_cover_subclasses_that_keep_the_computation():
    class PlainSub(nn.BatchNorm2d):
        def extra_repr(self) -> str:
            return "mine"

    class OwnForward(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    assert module_rule(PlainSub(4)) is module_rule(nn.BatchNorm2d(4)) is not None
    assert module_rule(OwnForward(4)) is None  # traced into
    assert module_rule(BatchNormAct2d(4, act_layer=nn.SiLU)) is not None
    assert module_rule(BatchNormAct2d(4, act_layer=nn.PReLU)) is None  # an act with parameters: traced into
    assert module_rule(LayerNorm2d(4)) is None and module_rule(TorchvisionLayerNorm2d(4)) is None
    for m in (FrozenBatchNorm2d(4), StochasticDepth(0.1, "row"), GELUTanh(), SwishMe(), nn.GELU("tanh"),
              nn.SiLU(inplace=True), nn.SyncBatchNorm(4), LayerScale2d(4)):
        assert module_rule(m) is not None, type(m).__name__


def test_norm_variants_slim_equals_masked():
    torch.manual_seed(0)
    model = randomize(NormZoo()).eval()
    x = torch.randn(2, 3, 16, 16)
    space = mdprune.analyze(model, x, steps={"channel": 4, "embed": 4})
    calls = [k for k in space.normalized if k.startswith(NODE_KEY)]
    assert len(calls) == 4  # timm's and torchvision's LayerNorm2d, LayerNormAct2d, the functional one
    assert "GroupNormAct" in space.dims["conv4"].protected or "group" in space.dims["conv4"].protected
    assert space.dims["conv3"].prunable and space.dims["stem"].prunable and space.dims["conv1"].prunable
    check_random_plans(model, x, space)

    plan = Plan.random(space, seed=4, block_prob=0.0)
    s = mdprune.slim(space, plan)
    kept = plan.sizes(space)
    for path, size in (("bnact", kept["stem"]), ("frozen", kept["conv1"]), ("gn", kept["conv3"])):
        m = s.get_submodule(path)
        assert m.weight.shape[0] == size
    assert s.get_submodule("bnact").num_features == kept["stem"]
    assert s.get_submodule("gn").num_channels == s.get_submodule("gn").num_groups == kept["conv3"]
    assert s.get_submodule("lnact").normalized_shape == (kept["conv5"],)
    assert s.get_submodule("ln2d").weight.shape == (kept["conv1"],)  # traced into: sliced where read


def test_batchnorm_subclass_with_its_own_forward_is_refused_by_name():
    class TwiceBN(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    model = nn.Sequential(nn.Conv2d(3, 8, 3), TwiceBN(8), nn.Conv2d(8, 8, 3)).eval()
    with pytest.raises(AnalysisError, match=r"module '1'.*TwiceBN"):
        mdprune.analyze(model, torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("name", ["timm:convnext_atto", "efficientnet_b0"])
def test_library_models_with_norm_variants(name):
    """timm's ConvNeXt (LayerNorm2d traced into, gamma), torchvision's EfficientNet (StochasticDepth, SE)."""
    torch.manual_seed(0)
    model = randomize(mdprune.create_model(name, num_classes=10)).eval()
    x = torch.randn(1, 3, 64, 64)
    space = mdprune.analyze(model, x)
    check_random_plans(model, x, space, seeds=(1,))


class Tokens(nn.Module):
    """A LayerNorm without weights over pruned features, and a residual block nested in another one's branch."""

    def __init__(self):
        super().__init__()
        self.fc0, self.fc1, self.fc2, self.fc3 = (nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16),
                                                  nn.Linear(16, 16))
        self.norm = nn.LayerNorm(16, elementwise_affine=False)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc0(x)
        y = self.fc1(x)
        y = y + self.fc2(torch.relu(y))  # inner block, inside the outer block's branch
        x = x + self.fc3(y)
        return self.head(self.norm(x).mean(1))


def test_weightless_layernorm_and_nested_blocks():
    torch.manual_seed(0)
    model = Tokens().eval()
    x = torch.randn(2, 5, 8)
    space = mdprune.analyze(model, x, steps={"embed": 4, "mlp": 4})
    inner = [b for b in space.blocks.values() if b.protected and "nested in block" in b.protected]
    assert len(inner) == 1 and len(space.removable_blocks()) == 1
    check_random_plans(model, x, space)
    plan = Plan.random(space, seed=2)
    assert mdprune.slim(space, plan).norm.normalized_shape == (plan.sizes(space)["embed"],)


# ---- errors and ways out -------------------------------------------------------------------------------------

class Odd(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sort(x, dim=1).values


class ManyProblems(nn.Module):
    """Three things mdprune cannot follow: an op in a submodule, an unknown torch.nn layer, a top-level op."""

    default_input_size = (8, 8)

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.odd = Odd()
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.conv3 = nn.Conv2d(4, 16, 3, padding=1)
        self.conv4 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(self.odd(self.conv(x))))
        x = self.conv4(torch.flip(self.conv3(self.shuffle(x)), [1]))
        return self.fc(x.mean((2, 3)))


def many_problems(num_classes: int = 10) -> ManyProblems:
    return ManyProblems(num_classes)


def test_every_problem_is_listed_with_the_ways_out():
    with pytest.raises(AnalysisError) as e:
        mdprune.analyze(ManyProblems(), torch.randn(1, 3, 8, 8))
    text, cli = str(e.value), e.value.for_cli()
    assert len(e.value.problems) == 3
    assert "sort" in text and "'odd'" in text and "PixelShuffle" in text and "flip" in text
    assert "ignored_layers=['odd', 'shuffle']" in text and "unsupported='keep'" in text
    assert "--ignore odd --ignore shuffle" in cli and "--keep-unsupported" in cli and "ignored_layers" not in cli


def test_keep_unsupported_keeps_their_modules_whole_and_warns():
    torch.manual_seed(0)
    model = ManyProblems().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"odd, shuffle") as w:
        space = mdprune.analyze(model, x, steps={"channel": 4}, unsupported="keep")
    assert "flip" in str(w[0].message)
    assert space.options["ignored_layers"] == ["odd", "shuffle"] and space.options["unsupported"] == "keep"
    assert space.dims["conv"].protected and space.dims["conv3"].protected  # around what is kept whole
    assert space.dims["conv2"].protected and not space.dims["conv4"].protected
    check_random_plans(model, x, space)


def test_cli_names_flags_and_keeps_unsupported(capsys):
    spec = "tests.test_norms_and_errors:many_problems"
    assert main(["inspect", spec]) == 2
    err = capsys.readouterr().err
    assert "--ignore odd --ignore shuffle" in err and "--keep-unsupported" in err
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert main(["inspect", spec, "--keep-unsupported"]) == 0
        assert main(["inspect", spec, "--ignore", "odd", "--ignore", "shuffle", "--keep-unsupported"]) == 0
    assert "odd, shuffle" in str(w[0].message) and "flip" in str(w[-1].message)


class GradRev(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return -g


class DomainHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(GradRev.apply(self.conv1(torch.relu(self.conv0(x)))))


def test_autograd_function_is_kept_as_one_call():
    torch.manual_seed(0)
    model = DomainHead().eval()
    x = torch.randn(2, 3, 8, 8)
    space = mdprune.analyze(model, x, steps={"channel": 4})
    assert any(getattr(n.target, "autograd_function", None) is GradRev for n in space.module.graph.nodes)
    assert not any(n.target == "view_as" for n in space.module.graph.nodes)  # forward not inlined
    assert "custom autograd function GradRev" in space.dims["conv1"].protected
    assert space.dims["conv0"].prunable
    check_random_plans(model, x, space, seeds=(1,))
    s = mdprune.slim(space, Plan.random(space, seed=1))
    (g,) = torch.autograd.grad(s(x).sum(), s.conv1.weight)
    (ref,) = torch.autograd.grad(s.head(s.conv1(torch.relu(s.conv0(x)))).sum(), s.conv1.weight)
    assert torch.allclose(g, -ref)


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x
        return -x


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), Gate())
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.conv(x)).mean((2, 3)))


def test_trace_failure_names_the_innermost_module():
    model = DataDependent().eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(AnalysisError) as e:
        mdprune.analyze(model, x)
    text = str(e.value)
    assert "module 'block.1' (Gate)" in text and "if x.sum() > 0:" in text and "ignored_layers=['block.1']" in text
    with pytest.warns(UserWarning, match="block.1"):
        space = mdprune.analyze(model, x, steps={"channel": 4}, unsupported="keep")
    assert space.options["ignored_layers"] == ["block.1"] and space.dims["conv"].prunable
