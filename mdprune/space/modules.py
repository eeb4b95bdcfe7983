"""Leaf modules: the analysis finds each one's channel rule in the layer registry (``mdprune/layers``).

The rules themselves live with their layer kinds, one module per family under ``mdprune/layers``; the lookups
here are lazy, so the analysis keeps flowing one way (the layer modules import the analysis' data types).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch.fx as fx
from torch import nn

if TYPE_CHECKING:
    from .channels import Propagation

Rule = Callable[["Propagation", fx.Node, nn.Module], Any]


def module_rule(m: nn.Module) -> Rule | None:
    """The channel rule of a leaf module, or None if mdprune does not know it (see
    :func:`mdprune.layers.layer_kind`: subclasses that change the computation are traced into)."""
    from ..layers.registry import layer_kind

    kind = layer_kind(m)
    return kind.channels if kind is not None else None


def is_known_leaf(m: nn.Module) -> bool:
    """Modules traced as one node: those with a rule (a subclass with its own forward is traced into)."""
    return module_rule(m) is not None


def linear_fixed(prop: Propagation, in_shape: tuple[int, ...], bias: bool) -> dict[str, Any]:
    """Fixed signature of a linear layer applied to a tensor of ``in_shape`` (features last)."""
    from ..layers.linear import linear_fixed as fixed

    return fixed(prop, in_shape, bias)
