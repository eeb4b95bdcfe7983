"""Shared helpers: the models under test, built small so the suite stays fast."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import mdprune
from mdprune.latency.backends import count_flops

torch.set_num_threads(1)

# name -> (builder spec, constructor kwargs, input shape, analysis steps)
MODELS = {
    "resnet18": ("resnet18", {"num_classes": 10}, (2, 3, 32, 32), None),
    "resnet50": ("resnet50", {"num_classes": 10}, (2, 3, 32, 32), None),
    "resnet101": ("resnet101", {"num_classes": 10}, (1, 3, 32, 32), None),
    "mobilenet_v2": ("mobilenet_v2", {"num_classes": 10}, (2, 3, 32, 32), None),
    "vgg16_bn": ("vgg16_bn", {"num_classes": 10}, (1, 3, 32, 32), None),
    "deit_tiny": ("deit_tiny_patch16_224", {"img_size": 32, "num_classes": 10}, (2, 3, 32, 32), None),
    "deit_small": ("deit_small_patch16_224", {"img_size": 32, "num_classes": 10}, (2, 3, 32, 32), None),
    "deit_base": ("deit_base_patch16_224", {"img_size": 32, "num_classes": 10}, (1, 3, 32, 32), None),
    "vit_small": ("vit_small_patch16_224", {"img_size": 32, "num_classes": 10}, (2, 3, 32, 32), None),
    "tiny_cnn": ("tests.models:tiny_cnn", {}, (2, 3, 8, 8), {"channel": 4}),
    "tiny_vit": ("tests.models:tiny_vit", {}, (2, 3, 16, 16), {"embed": 8, "mlp": 16, "qk": 2, "v": 2}),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``a``."""
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()


def measured_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs counted by PyTorch's own FlopCounterMode (math attention, so the matmuls are visible)."""
    with sdpa_kernel(SDPBackend.MATH):
        return count_flops(model, (x,))[0] // 2


def check_plan(space: mdprune.PruningSpace, plan: mdprune.Plan, x: torch.Tensor,
               dense: torch.Tensor | None = None, label: str = "") -> bool:
    """The exactness contract for one plan: the slim model's output equals the masked model's (and ``dense``,
    the dense output, when given: an identity plan), and its parameters and MACs are what the space predicts.
    Returns whether the plan pruned any parameter."""
    sizes, removed = plan.sizes(space), set(plan.removed)
    m, s = mdprune.masked(space, plan).eval(), mdprune.slim(space, plan).eval()
    with torch.no_grad():
        a, b = m(x), s(x)
    assert rel_err(a, b) <= 1e-4, f"{label}: slim differs from masked"
    assert sum(p.numel() for p in s.parameters()) == space.count_params(sizes, removed), label
    assert measured_macs(s, x) == space.count_macs(sizes, removed), label
    if dense is not None:
        assert rel_err(dense, b) <= 1e-4, f"{label}: identity plan changed the output"
    return space.count_params(sizes, removed) < space.count_params()


def check_exact(model: nn.Module, x: torch.Tensor, seeds: tuple[int, ...] = (1, 2), block_prob: float = 0.3
                ) -> mdprune.PruningSpace:
    """Analyse ``model``; the identity plan gives the dense output and every random plan prunes, exactly."""
    space = mdprune.analyze(model, x)
    with torch.no_grad():
        dense = model(x)
    check_plan(space, mdprune.Plan.identity(), x, dense, "identity")
    for seed in seeds:
        assert check_plan(space, mdprune.Plan.random(space, seed=seed, block_prob=block_prob), x,
                          label=f"seed {seed}"), f"seed {seed} pruned nothing"
    return space


def fake_latency_model(space: mdprune.PruningSpace):
    """A calibrated LatencyModel on a table of made-up entries (1e-3 x the product of the widths + 0.01 ms per
    op, 0.1 ms fixed): deterministic, nothing measured."""
    import numpy as np

    from mdprune.latency import LatencyModel, LatencyTable, fingerprint

    table = LatencyTable(fingerprint())
    lm = LatencyModel(space, table)
    for op, p in lm.needed():
        table.put(op, p, 1e-3 * float(np.prod(p)) + 0.01, 0.0)
    lm.calibrate(lm.ops_ms(space.dense_sizes()) + 0.1)
    return lm


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give norms non-trivial statistics and affine parameters, so that masking errors would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)) and m.weight is not None:
                m.weight.normal_(1.0, 0.3, generator=g)
                m.bias.normal_(0.0, 0.3, generator=g)
    return model


def build(key: str) -> tuple[nn.Module, torch.Tensor, mdprune.PruningSpace]:
    name, kwargs, shape, steps = MODELS[key]
    torch.manual_seed(0)
    model = randomize_norms(mdprune.create_model(name, **kwargs)).eval()
    x = torch.randn(shape)
    return model, x, mdprune.analyze(model, x, steps=steps)


@pytest.fixture(scope="session")
def resnet18():
    return build("resnet18")


@pytest.fixture(scope="session")
def deit_tiny():
    return build("deit_tiny")
