"""Trace a model into a torch.fx graph whose leaves are the modules mdprune understands, with shapes."""

from __future__ import annotations

import contextlib
import inspect
import os
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from .attention import attention_adapter
from .errors import AnalysisError, Problem, where
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
        self.failure: tuple[BaseException, str, type] | None = None  # the exception, where it was raised

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.ignored:
            return True
        if attention_adapter(m) is not None or is_known_leaf(m):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:
            if self.failure is None or self.failure[0] is not e:  # the innermost module sees it first
                self.failure = (e, self.path_of_module(m), type(m))
            raise


def autograd_call(fn: type[torch.autograd.Function]) -> Callable[..., Any]:
    """The stand-in fx records for ``fn.apply``: one call, so the Function's own backward stays in the model."""
    if fn not in _CALLS:
        def call(*args: Any, **kwargs: Any) -> Any:
            return fn.apply(*args, **kwargs)

        call.__name__ = call.__qualname__ = f"{fn.__name__}_apply"
        call.autograd_function = fn  # type: ignore[attr-defined]  # read by the channel analysis
        _CALLS[fn] = call
    return _CALLS[fn]


_CALLS: dict[type, Callable[..., Any]] = {}


@contextlib.contextmanager
def _autograd_functions_as_calls() -> Iterator[None]:
    """While tracing, ``SomeFunction.apply(proxy)`` makes one call node instead of inlining ``forward``."""
    base = torch.autograd.Function
    original = base.__dict__["apply"]

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        proxy = next((a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, fx.Proxy)), None)
        if proxy is None:
            return original.__get__(None, cls)(*args, **kwargs)
        return proxy.tracer.create_proxy("call_function", autograd_call(cls), args, kwargs)

    base.apply = classmethod(apply)  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        base.apply = original  # type: ignore[method-assign]


def _fixed_args(model: nn.Module, n_inputs: int) -> dict[str, Any]:
    """Optional forward arguments beyond the example inputs, frozen at their defaults (masks, flags)."""
    params = list(inspect.signature(model.forward).parameters.values())
    return {p.name: p.default for p in params[n_inputs:]
            if p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD}


def trace(model: nn.Module, ignored_layers: Iterable[str] = (), n_inputs: int = 1) -> fx.GraphModule:
    """Symbolically trace ``model``; known layers, attention modules and ``ignored_layers`` stay leaves.

    Forward arguments after the first ``n_inputs`` are frozen at their defaults. Custom autograd Functions stay
    single calls. A failure raises an :class:`AnalysisError` naming the innermost module whose forward failed.
    """
    ignored = list(ignored_layers)
    names = dict(model.named_modules())
    missing = [n for n in ignored if n not in names]
    if missing:
        raise AnalysisError(f"ignored_layers names modules the model does not have: {missing}")
    was_training = model.training
    model.eval()
    tracer = _Tracer(ignored)
    try:
        with _autograd_functions_as_calls():
            graph = tracer.trace(model, concrete_args=_fixed_args(model, n_inputs) or None)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise _trace_error(model, tracer, e) from e
    finally:
        model.train(was_training)
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    gm.train(was_training)
    return gm


def _trace_error(model: nn.Module, tracer: _Tracer, e: Exception) -> AnalysisError:
    """Name the innermost module whose forward failed, and the line of code."""
    path, cls = "", type(model)
    if tracer.failure is not None and tracer.failure[0] is e:
        path, cls = tracer.failure[1], tracer.failure[2]
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not _in_torch(f.filename)]
    line = ""
    if frames:
        f = frames[-1]
        line = f" (at {os.path.basename(f.filename)}:{f.lineno}" + (f": `{f.line}`)" if f.line else ")")
    what = f"module '{path}' ({cls.__name__})" if path else f"the forward of {cls.__name__} itself"
    hint = " Data-dependent control flow (an `if` on a tensor's values) cannot be traced." \
        if "control flow" in str(e) else ""
    text = f"torch.fx could not trace {what}: {e}{line}.{hint}"
    if not path:  # nothing to keep whole: the model's own code must change
        return AnalysisError(f"{text} Make the model's forward traceable by torch.fx, or move that code into a "
                             "submodule (which can then be kept whole).")
    return AnalysisError("", [Problem(text, path)], type(model).__name__)


def _in_torch(filename: str) -> bool:
    return os.path.sep + "torch" + os.path.sep in filename


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
