"""Trace a model into a torch.fx graph whose leaves are the modules mdprune understands, with shapes."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .attention import attention_adapter
from .errors import AnalysisError, where
from .modules import is_known_leaf


class _Tracer(fx.Tracer):
    def __init__(self, ignored: Sequence[str]):
        autowrap = ()
        try:  # timm registers its assert helper and a few functions to keep as calls
            from timm.layers import _assert

            autowrap = (_assert,)
        except ImportError:
            pass
        super().__init__(autowrap_functions=autowrap)
        self.ignored = tuple(ignored)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.ignored:
            return True
        if attention_adapter(m) is not None or is_known_leaf(m):
            return True
        return super().is_leaf_module(m, qualname)


def _fixed_args(model: nn.Module, n_inputs: int) -> dict[str, Any]:
    """Optional forward arguments beyond the example inputs, frozen at their defaults (masks, flags)."""
    params = list(inspect.signature(model.forward).parameters.values())
    return {p.name: p.default for p in params[n_inputs:]
            if p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD}


def trace(model: nn.Module, ignored_layers: Iterable[str] = (), n_inputs: int = 1) -> fx.GraphModule:
    """Symbolically trace ``model``; known layers, attention modules and ``ignored_layers`` stay leaves.

    Forward arguments after the first ``n_inputs`` are frozen at their defaults.
    """
    ignored = list(ignored_layers)
    names = dict(model.named_modules())
    missing = [n for n in ignored if n not in names]
    if missing:
        raise AnalysisError(f"ignored_layers names modules the model does not have: {missing}")
    was_training = model.training
    model.eval()
    try:
        graph = _Tracer(ignored).trace(model, concrete_args=_fixed_args(model, n_inputs) or None)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise AnalysisError(
            f"torch.fx could not trace {type(model).__name__}: {e}. Models with data-dependent control flow "
            "need the offending module listed in ignored_layers."
        ) from e
    finally:
        model.train(was_training)
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    gm.train(was_training)
    return gm


def _describe(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return tuple(v.shape)
    if isinstance(v, (tuple, list)) and any(isinstance(x, torch.Tensor) for x in v):
        return [tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in v]
    return None


class _ShapeRecorder(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise AnalysisError(f"running the traced model failed at node {n.name} ({where(n)}): {e}") from e
        n.meta["mdp_shape"] = _describe(out)
        return out


@torch.no_grad()
def record_shapes(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> None:
    """Run ``gm`` once in eval mode and store every node's output shape in ``node.meta['mdp_shape']``."""
    was_training = gm.training
    gm.eval()
    try:
        _ShapeRecorder(gm).run(*inputs)
    finally:
        gm.train(was_training)
