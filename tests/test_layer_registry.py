"""The layer registry: mdprune's own kinds found by type, and a user's layer taught with one public call.

The user's layer is the README's own example (its code block is run here), analysed, masked, slimmed exactly,
its latency op built and measured, and the whole model pruned in one call.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mdprune
from mdprune import Plan, layers
from mdprune.latency import LatencySettings, TimingSettings, build, open_table
from mdprune.latency.ops import ROLES, op_module
from mdprune.layers import registry

from .conftest import check_plan, rel_err

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def clean_registry():
    """Registrations made by a test are undone after it."""
    before = list(registry._USER)
    yield
    registry._USER[:] = before
    registry._changed()


@pytest.fixture
def readme(clean_registry) -> dict[str, Any]:
    """The namespace of the README's "Teach mdprune your own layer" example, run as written."""
    text = README.read_text()
    section = text[text.index("## Teach mdprune your own layer"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ns: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 - the README's example, run as the test
    return ns



def net(conv: type[nn.Module]) -> nn.Module:
    """A small CNN of ``conv`` layers: a stem with BatchNorm, a residual block, a linear head."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.bn = conv(3, 16), nn.BatchNorm2d(16)
            self.a, self.b = conv(16, 24), conv(24, 24)
            self.head = nn.Linear(24, 10)

        def forward(self, x):
            x = F.relu(self.bn(self.stem(x)))
            y = F.relu(self.a(x))
            y = y + self.b(F.relu(y))
            return self.head(y.mean((2, 3)))

    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "scale", None) is not None:
                m.scale.uniform_(0.5, 1.5)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


# ---- mdprune's own kinds ---------------------------------------------------------------------------------------

def test_builtin_kinds_found_by_type_and_nearest_ancestor():
    class PlainConv(nn.Conv2d):  # overrides nothing: the convolution's kind
        pass

    class OwnForward(nn.Conv2d):  # its own forward: traced into
        def forward(self, x):
            return super().forward(x) * 2

    assert layers.layer_kind(nn.Conv2d(3, 4, 3)).name == "conv2d"
    assert layers.layer_kind(PlainConv(3, 4, 3)) is layers.layer_kind(nn.Conv2d(3, 4, 3))
    assert layers.layer_kind(OwnForward(3, 4, 3)) is None
    assert layers.layer_kind(nn.BatchNorm1d(4)).name == "batchnorm"
    assert layers.layer_kind(nn.PReLU(4)).resize is not None and layers.layer_kind(nn.ReLU()).resize is None
    assert ROLES["conv2d"] == ROLES["linear"] == ("in", "out") and ROLES["attention"] == ("heads", "qk", "v")
    assert {"conv2d", "linear", "attention", "node"} <= set(ROLES)


def test_registration_rejects_what_it_cannot_use(clean_registry):
    with pytest.raises(TypeError, match="nn.Module classes"):
        mdprune.register_layer(int, channels=lambda p, n, m: None)
    with pytest.raises(ValueError, match="subclasses"):
        mdprune.register_layer(nn.ReLU, channels=lambda p, n, m: None, subclasses="some")
    op = layers.LatencyOp(("in", "out"), lambda f, w, b: (nn.Identity(), ()))
    with pytest.raises(ValueError, match="taken"):
        mdprune.register_layer(nn.ReLU, channels=lambda p, n, m: None, latency=op, name="conv2d")


# ---- a user's layer: the README's example ------------------------------------------------------------------------

def test_readme_layer_analyses_and_slims_exactly(readme):
    scaled = readme["ScaledConv"]
    model, x = net(scaled), torch.randn(2, 3, 32, 32)
    space = mdprune.analyze(model, x)
    assert [op.kind for op in space.ops if op.name in ("stem", "a", "b")] == ["ScaledConv"] * 3
    assert {"stem.weight", "stem.scale", "a.weight", "b.scale"} <= set(space.tensors)
    assert space.prunable_dims() and space.blocks  # the residual block is removable
    with torch.no_grad():
        dense = model(x)
    check_plan(space, Plan.identity(), x, dense, "identity")
    for seed in (1, 2, 3):
        check_plan(space, Plan.random(space, seed=seed, block_prob=0.3), x, label=f"seed {seed}")
    slim = mdprune.slim(space, Plan.uniform(space, 0.5))
    a = slim.get_submodule("a")
    assert type(a) is scaled and (a.out_channels, a.in_channels) == tuple(a.weight.shape[:2]) == (8, 8)


def test_readme_layer_importance_read_from_its_scale(readme):
    from mdprune.importance import probes

    model, x = net(readme["ScaledConv"]), torch.randn(1, 3, 32, 32)
    space = mdprune.analyze(model, x)
    found = {p.tensor for p in probes(space)}
    assert "a.scale" in found and "a.weight" not in found


def test_readme_layer_latency_op_builds_and_measures(readme, tmp_path):
    model, x = net(readme["ScaledConv"]), torch.randn(1, 3, 32, 32)
    space = mdprune.analyze(model, x)
    op = next(o for o in space.ops if o.name == "a")
    assert ROLES[op.kind] == ("in", "out")
    module, inputs = op_module(op.kind, op.fixed, {"in": 8, "out": 4}, batch=2)
    assert type(module) is readme["ScaledConv"] and module(*inputs).shape == (2, 4, 32, 32)
    assert op.macs(space.dense_sizes()) == 32 * 32 * 9 * 16 * 24
    settings = LatencySettings(backend="flops", grid_points=2,
                               timing=TimingSettings(warmup=1, reps=1, rounds=1, min_sample_ms=0.0))
    table = open_table(settings, tmp_path)
    report = build(space, table, settings, progress=False)
    assert report.remaining == 0
    assert "ScaledConv" in {e["kind"] for e in table.ops.values()}


def test_readme_layer_pruned_in_one_call(readme, tmp_path):
    model, x = net(readme["ScaledConv"]), torch.randn(1, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]
    settings = LatencySettings(backend="flops", grid_points=2,
                               timing=TimingSettings(warmup=1, reps=1, rounds=1, min_sample_ms=0.0))
    slim, report = mdprune.prune(model, x, "60%", data=data, lut=tmp_path, settings=settings)
    assert report.params[1] < report.params[0] and report.macs[1] < report.macs[0]
    with torch.no_grad():
        assert slim(x).shape == (1, 10)


# ---- matching subclasses, decorator, accepts -------------------------------------------------------------------

def test_subclasses_covered_unless_they_change_the_forward(readme):
    scaled = readme["ScaledConv"]

    class Same(scaled):  # only set-up differs: covered
        def __init__(self, cin, cout):
            super().__init__(cin, cout)
            self.tag = "same"

    class Doubled(scaled):  # its own forward: traced into (F.conv2d's function rule, not the layer's)
        def forward(self, x):
            return super().forward(x) * 2

    kind = layers.layer_kind(scaled(3, 4))
    assert kind.name == "ScaledConv" and layers.layer_kind(Same(3, 4)) is kind
    assert layers.layer_kind(Doubled(3, 4)) is None
    x = torch.randn(1, 3, 16, 16)
    space = mdprune.analyze(net(Same), x)
    assert {op.kind for op in space.ops} >= {"ScaledConv"}
    traced_into = {op.kind for op in mdprune.analyze(net(Doubled), x).ops}
    assert "conv2d" in traced_into and "ScaledConv" not in traced_into
    mdprune.register_layer(scaled, channels=kind.channels, resize=kind.resize, latency=kind.latency,
                           subclasses="all")
    assert layers.layer_kind(Doubled(3, 4)).subclasses == "all"
    assert "ScaledConv" in {op.kind for op in mdprune.analyze(net(Doubled), x).ops}  # now covered
    mdprune.register_layer(scaled, channels=kind.channels, resize=kind.resize, latency=kind.latency,
                           subclasses="exact")
    assert layers.layer_kind(Same(3, 4)) is None and layers.layer_kind(scaled(3, 4)) is not None


def test_decorator_accepts_and_a_passthrough_layer(clean_registry):
    @mdprune.register_layer(channels=lambda prop, node, m: prop.value(node.args[0]),
                            accepts=lambda m: m.gain == 1.0)
    class Gain(nn.Module):  # its forward has a data-dependent branch: untraceable, so a leaf it must be
        def __init__(self, gain: float = 1.0):
            super().__init__()
            self.gain = gain

        def forward(self, x):
            return x if bool((x > 0).all()) else x * self.gain

    assert isinstance(Gain, type) and layers.layer_kind(Gain()).name == "Gain"
    assert layers.layer_kind(Gain(2.0)) is None  # refused: traced into

    class Net(nn.Module):
        def __init__(self, gain: float):
            super().__init__()
            self.a, self.g, self.b = nn.Conv2d(3, 16, 3), Gain(gain), nn.Conv2d(16, 8, 3)

        def forward(self, x):
            return self.b(self.g(self.a(x)))

    x = torch.randn(1, 3, 16, 16)
    space = mdprune.analyze(Net(1.0), x)
    assert [d.size for d in space.prunable_dims()] == [16]
    plan = Plan.random(space, seed=1)
    with torch.no_grad():
        assert rel_err(mdprune.masked(space, plan)(x), mdprune.slim(space, plan)(x)) <= 1e-4
    with pytest.raises(mdprune.AnalysisError):
        mdprune.analyze(Net(2.0), x)


def test_user_registration_overrides_a_builtin_kind(clean_registry):
    """A user's kind for a built-in class wins: here ReLU6 kept whole (its channels protected)."""

    def keep_whole(prop, node, m):
        v = prop.value(node.args[0])
        prop.protect(v.segs, "kept by the user")
        return v

    mdprune.register_layer(nn.ReLU6, channels=keep_whole, subclasses="exact")
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU6(), nn.Conv2d(16, 24, 3), nn.ReLU(), nn.Conv2d(24, 4, 3))
    space = mdprune.analyze(model, torch.randn(1, 3, 16, 16))
    assert [d.size for d in space.prunable_dims()] == [24]  # the second conv's output only
