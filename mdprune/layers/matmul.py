"""Matrix products a model writes out (``a @ b``, ``torch.matmul``, ``bmm``, ``torch.einsum``) that are not part of
an attention core: their latency op and multiply-accumulates, driven by the one channel width they carry
(contracted, rows or columns; a width kept whole is a constant)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn

from ..space.values import Chan
from .registry import LatencyOp, LayerKind, builtin

if TYPE_CHECKING:
    from ..space.channels import Propagation


class MatMul(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b


def _shape(template: list[int], width: int, fixed: dict[str, Any], batch: int) -> list[int]:
    s = [width if d == -1 else d for d in template]
    if fixed["per_image"] and len(s) > 2:
        s[0] = s[0] // fixed["batch"] * batch
    return s


def build_matmul(fixed: dict[str, Any], w: dict[str, int], batch: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return MatMul(), (torch.randn(_shape(fixed["a"], w["width"], fixed, batch)),
                      torch.randn(_shape(fixed["b"], w["width"], fixed, batch)))


def matmul_macs(f: dict[str, Any], w: dict[str, int]) -> int:
    m: Any = w["width"] if f["k"] == -1 else f["k"]
    for d in f["out"]:
        m = m * (w["width"] if d == -1 else d)
    return m


def _never(prop: Propagation, node: fx.Node, m: nn.Module) -> Chan:  # the op kind covers no module type
    raise AssertionError("matmul ops are added by the matmul rule only")


MATMUL = builtin(LayerKind("matmul", (), _never, latency=LatencyOp(("width",), build_matmul, matmul_macs)))


class Einsum(nn.Module):
    def __init__(self, equation: str):
        super().__init__()
        self.equation = equation

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.einsum(self.equation, a, b)


def _einsum_shape(spec: str, template: list[int], width: int, fixed: dict[str, Any], batch: int) -> list[int]:
    s = [width if d == -1 else d for d in template]
    if fixed["batch_letter"] and fixed["batch_letter"] in spec:
        i = spec.index(fixed["batch_letter"])
        s[i] = s[i] // fixed["batch"] * batch
    return s


def build_einsum(fixed: dict[str, Any], w: dict[str, int], batch: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    specs = fixed["equation"].split("->")[0].split(",")
    return Einsum(fixed["equation"]), tuple(torch.randn(_einsum_shape(spec, t, w["width"], fixed, batch))
                                            for spec, t in zip(specs, fixed["shapes"], strict=True))


def einsum_macs(f: dict[str, Any], w: dict[str, int]) -> int:
    """Every letter of the output or shared by both operands, once (a letter summed within one operand is
    reduced before the product, as torch.einsum does)."""
    lhs, out = f["equation"].split("->")
    specs = lhs.split(",")
    sizes = {c: (w["width"] if d == -1 else d) for spec, t in zip(specs, f["shapes"], strict=True)
             for c, d in zip(spec, t, strict=True)}
    m = 1
    for c, d in sizes.items():
        if c in out or all(c in spec for spec in specs):
            m *= d
    return m


EINSUM = builtin(LayerKind("einsum", (), _never, latency=LatencyOp(("width",), build_einsum, einsum_macs)))
