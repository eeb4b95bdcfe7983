"""Matrix products a model writes out (``a @ b``, ``torch.matmul``, ``bmm``) that are not part of an attention
core: their latency op and multiply-accumulates, driven by the one channel width they carry (contracted, rows
or columns; a width kept whole is a constant)."""

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
