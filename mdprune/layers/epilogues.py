"""The layers that follow a compute op in its latency measurement (``fixed["epilogue"]``, see space/epilogue.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

_EPILOGUE: dict[str, Callable[[int], nn.Module]] = {
    "bn2d": nn.BatchNorm2d, "bn1d": nn.BatchNorm1d, "relu": lambda _: nn.ReLU(inplace=True),
    "relu6": lambda _: nn.ReLU6(inplace=True), "gelu": lambda _: nn.GELU(), "silu": lambda _: nn.SiLU(),
    "hardswish": lambda _: nn.Hardswish(), "sigmoid": lambda _: nn.Sigmoid(), "tanh": lambda _: nn.Tanh(),
}


def with_epilogue(op: nn.Module, fixed: dict[str, Any], width: int) -> nn.Sequential:
    """``op`` followed by the epilogue layers ``fixed`` names, each ``width`` channels wide."""
    return nn.Sequential(op, *(_EPILOGUE[e](width) for e in fixed.get("epilogue", ())))
