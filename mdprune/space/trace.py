"""Trace a model into a torch.fx graph whose leaves are the modules mdprune understands, with shapes."""

from __future__ import annotations

import builtins
import contextlib
import functools
import inspect
import operator
import os
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from .attention import attention_adapter
from .errors import GUARD, NUMBER_GUARD, AnalysisError, Problem, where
from .inline import inline_wrapped
from .modules import is_known_leaf
from .op_names import op_name


class _Tracer(fx.Tracer):
    """fx tracer with mdprune's leaves. Given the example inputs, a branch on shapes (``if H % p:``) follows the
    example's shapes, with a guard in the graph that fails loudly if a later input (or a slim model) disagrees;
    a branch on tensor values still fails."""

    def __init__(self, ignored: Sequence[str], example_inputs: Sequence[torch.Tensor] = ()):
        autowrap = ()
        try:  # timm registers its assert helper and a few functions to keep as calls
            from timm.layers import _assert

            autowrap = (_assert,)
        except ImportError:
            pass
        super().__init__(autowrap_functions=autowrap)
        self.ignored = tuple(ignored)
        self.failure: tuple[BaseException, str, type] | None = None  # the exception, where it was raised
        self.example = tuple(example_inputs)
        self.concrete = False  # while True, modules and parameters run as they are (evaluating shapes)
        self.values: dict[fx.Node, tuple[Any, bool]] = {}  # node -> (example value, depends on tensor data)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.ignored:
            return True
        if attention_adapter(m) is not None or is_known_leaf(m):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        if self.concrete:
            return forward(*args, **kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:
            if self.failure is None or self.failure[0] is not e:  # the innermost module sees it first
                self.failure = (e, self.path_of_module(m), type(m))
            raise

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        return attr_val if self.concrete else super().getattr(attr, attr_val, parameter_proxy_cache)

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = self.shape_value(obj.node)
        if value is _UNKNOWN:
            return super().to_bool(obj)
        value = bool(value)
        cond = obj if value else self.create_proxy("call_function", operator.not_, (obj,), {})
        self.create_proxy("call_function", torch._assert, (cond, GUARD), {})
        return value

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _NumberProxy(node, self)

    def to_number(self, obj: fx.Proxy, kind: type) -> Any:
        """``int(obj)`` / ``float(obj)`` on a value computed from shapes (ConViT's ``int(num_patches ** .5)``):
        the example's value, with a guard in the graph as for a branch. (No ``__index__``: torch's own argument
        parser would then fix sizes such as ``torch.zeros(B, C)`` that fx records as they are.)"""
        value = self.shape_value(obj.node)
        if value is _UNKNOWN or isinstance(value, torch.Tensor):
            raise TypeError(f"{kind.__name__}() of a traced value that mdprune cannot compute from the example "
                            "input's shapes")
        same = self.create_proxy("call_function", operator.eq, (obj, value), {})
        self.create_proxy("call_function", torch._assert, (same, NUMBER_GUARD), {})
        return kind(value)

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        value = self.shape_value(obj.node)
        if not isinstance(value, (tuple, list)):
            return super().iter(obj)
        return iter([obj[i] for i in range(len(value))])

    def shape_value(self, node: fx.Node) -> Any:
        """The value ``node`` takes on the example inputs if it depends on their shapes only, else _UNKNOWN."""
        if not self.example:
            return _UNKNOWN
        self.concrete = True
        try:
            with torch.no_grad():
                for n in self.graph.nodes:
                    if n not in self.values:
                        self.values[n] = self._evaluate(n)
                    if n is node:
                        break
        finally:
            self.concrete = False
        value, data = self.values.get(node, (_UNKNOWN, True))
        return _UNKNOWN if data or isinstance(value, torch.Tensor) else value

    def _evaluate(self, n: fx.Node) -> tuple[Any, bool]:
        if n.op == "placeholder":
            k = [m for m in self.graph.nodes if m.op == "placeholder"].index(n)
            if k < len(self.example):  # a copy: an in-place op must not change the caller's tensor
                return self.example[k].clone(), True
            return n.args[0] if n.args else None, False
        if n.op == "get_attr":
            return fetch(self.root, n.target), True
        if any(self.values.get(a, (_UNKNOWN,))[0] is _UNKNOWN for a in n.all_input_nodes):
            return _UNKNOWN, True
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: self.values[a][0])
        try:
            if n.op == "call_function":
                out = n.target(*args, **kwargs)
            elif n.op == "call_method":
                out = getattr(args[0], n.target)(*args[1:], **kwargs)
            elif n.op == "call_module":
                out = self.root.get_submodule(n.target)(*args, **kwargs)
            else:
                return _UNKNOWN, True
        except Exception:  # noqa: BLE001 - a value mdprune cannot compute is simply not known
            return _UNKNOWN, True
        return out, self._depends_on_data(n)

    def _depends_on_data(self, n: fx.Node) -> bool:
        """Whether ``n``'s value depends on tensor contents, not only on shapes (a tensor always does)."""
        inputs = n.all_input_nodes
        if _is_shape_query(n):
            return any(_shape_depends_on_data(self.values, a) for a in inputs)
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        return any(self.values[a][1] for a in inputs) or n.op in ("call_module", "get_attr") or name in _RANDOM


class _NumberProxy(fx.Proxy):
    """A proxy that Python's number conversions turn into the example's value (see ``_Tracer.to_number``) and
    that records item assignment."""

    def __int__(self) -> int:
        return self.tracer.to_number(self, int)

    def __float__(self) -> float:
        return self.tracer.to_number(self, float)

    def __setitem__(self, index: Any, value: Any) -> None:  # ``x[..., 2] = y``, recorded as a call
        self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})


_UNKNOWN = object()
_SHAPE_METHODS = {"size", "dim", "numel", "nelement", "ndimension"}
_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda"}
# ops whose output shape depends on the input's values
_DATA_SHAPED = {"nonzero", "masked_select", "unique", "unique_consecutive", "argwhere", "repeat_interleave"}
_RANDOM = {"rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm", "bernoulli",
           "multinomial", "normal", "uniform_", "normal_", "bernoulli_", "exponential_", "random_"}


def fetch(root: nn.Module, target: str) -> Any:
    """``root``'s attribute at the dotted path ``target`` (a parameter, buffer or constant)."""
    obj: Any = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _is_shape_query(n: fx.Node) -> bool:
    if n.op == "call_method":
        return n.target in _SHAPE_METHODS
    if n.op == "call_function" and n.target is builtins.getattr:
        return len(n.args) > 1 and n.args[1] in _SHAPE_ATTRS
    return n.op == "call_function" and n.target is builtins.len


def _shape_depends_on_data(values: dict[fx.Node, tuple[Any, bool]], node: fx.Node) -> bool:
    """Whether the shape of ``node``'s value depends on tensor contents (a mask, ``nonzero``), recursively."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        if name in _DATA_SHAPED or (n.op in ("call_function", "call_method") and name in ("getitem", "__getitem__")
                                    and any(isinstance(values.get(a, (None,))[0], torch.Tensor)
                                            and values[a][0].dtype == torch.bool for a in n.all_input_nodes[1:])):
            return True
        todo += n.all_input_nodes
    return False


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


@contextlib.contextmanager
def _autocast_blocks_traceable() -> Iterator[None]:
    """While tracing, ``with torch.autocast(device_type=x.device.type, enabled=False)`` (a block kept in float32,
    efficientvit's linear attention) takes a proxy for the device: it is read as "cpu". fx records no autocast
    region either way; the traced graph computes the block in the model's own dtype."""
    original = torch.autocast

    class TracingAutocast(original):  # type: ignore[misc, valid-type]
        def __init__(self, device_type: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__("cpu" if isinstance(device_type, fx.Proxy) else device_type, *args, **kwargs)

    torch.autocast = TracingAutocast  # type: ignore[misc]
    try:
        yield
    finally:
        torch.autocast = original  # type: ignore[misc]


_SIZED_FACTORIES = ("ones", "zeros", "empty", "rand", "randn")
_SIZED_METHODS = ("expand", "view", "reshape", "repeat", "permute", "new_ones", "new_zeros", "new_empty")


@contextlib.contextmanager
def _sizes_may_be_traced() -> Iterator[None]:
    """While tracing, sizes given one by one with a traced one among them (Gemma 4's ``torch.ones(B, n)`` and
    ``self.inv_freq[None, :, None].expand(B, -1, 1)`` on a plain tensor attribute) are passed as one tuple:
    torch's argument parser refuses a proxy followed by more sizes, not a tuple holding it."""
    def sized(fn: Any, method: bool) -> Any:
        @functools.wraps(fn)  # (fx names a method call after the function)
        def call(*args: Any, **kwargs: Any) -> Any:
            head, size = (args[:1], args[1:]) if method else ((), args)
            if len(size) > 1 and any(isinstance(n, fx.Proxy) for n in size):
                return fn(*head, tuple(size), **kwargs)
            return fn(*args, **kwargs)
        return call

    patched = [(torch, name, getattr(torch, name), False) for name in _SIZED_FACTORIES]
    patched += [(torch.Tensor, name, getattr(torch.Tensor, name), True) for name in _SIZED_METHODS]
    for owner, name, fn, method in patched:
        setattr(owner, name, sized(fn, method))
    try:
        yield
    finally:
        for owner, name, fn, _ in patched:
            setattr(owner, name, fn)


def _fixed_args(model: nn.Module, n_inputs: int) -> dict[str, Any]:
    """Optional forward arguments beyond the example inputs, frozen at their defaults (masks, flags)."""
    params = list(inspect.signature(model.forward).parameters.values())
    return {p.name: p.default for p in params[n_inputs:]
            if p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD}


def trace(model: nn.Module, ignored_layers: Iterable[str] = (), n_inputs: int = 1,
          example_inputs: Sequence[torch.Tensor] = ()) -> fx.GraphModule:
    """Symbolically trace ``model``; known layers, attention modules and ``ignored_layers`` stay leaves.

    Forward arguments after the first ``n_inputs`` are frozen at their defaults. Custom autograd Functions stay
    single calls; functions registered with ``torch.fx.wrap`` are traced into where they can be. With
    ``example_inputs``, branches on shapes follow the example (guarded). A failure raises an
    :class:`AnalysisError` naming the innermost module whose forward failed.
    """
    ignored = list(ignored_layers)
    names = dict(model.named_modules())
    missing = [n for n in ignored if n not in names]
    if missing:
        raise AnalysisError(f"ignored_layers names modules the model does not have: {missing}")
    was_training = model.training
    model.eval()
    tracer = _Tracer(ignored, example_inputs)
    try:
        with _autograd_functions_as_calls(), _autocast_blocks_traceable(), _sizes_may_be_traced():
            graph = tracer.trace(model, concrete_args=_fixed_args(model, n_inputs) or None)
            inline_wrapped(graph, lambda: _Tracer(()))
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise _trace_error(model, tracer, e) from e
    finally:
        tracer.values.clear()  # example values: not kept alive
        model.train(was_training)
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    gm.train(was_training)
    return gm


def _trace_error(model: nn.Module, tracer: _Tracer, e: Exception) -> AnalysisError:
    """Name the innermost module whose forward failed, and the line of code."""
    path, cls = "", type(model)
    if tracer.failure is not None and tracer.failure[0] is e:
        path, cls = tracer.failure[1], tracer.failure[2]
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not _in_torch(f.filename) and f.filename != __file__]
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

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        return super().call_function(target, *_mutable((args, kwargs)))


def _mutable(x: Any) -> Any:
    """fx hands a node's literal lists over immutable; the generated code passes fresh lists, which a wrapped
    function may change in place (torchvision's Swin3d ``_get_window_and_shift_size``)."""
    if isinstance(x, (list, tuple)):
        items = [_mutable(v) for v in x]
        return items if isinstance(x, list) else tuple(items) if type(x) is tuple else x  # (torch.Size as it is)
    if isinstance(x, dict):
        return {k: _mutable(v) for k, v in x.items()}
    return x


@torch.no_grad()
def record_shapes(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> None:
    """Run ``gm`` once in eval mode and store every node's output shape in ``node.meta['mdp_shape']``."""
    was_training = gm.training
    gm.eval()
    try:
        _ShapeRecorder(gm).run(*inputs)
    finally:
        gm.train(was_training)


def live_nodes(graph: fx.Graph) -> set[fx.Node]:
    """The nodes whose results reach the output or a side effect. torch.fx counts in-place tensor ops as pure
    (NFNet's ``x.mul_(self.skipinit_gain)``, ``x`` read afterwards); here one is live when the tensor it writes
    into is read later by a live node, or is an input, a parameter or a view (whose base mdprune does not
    follow)."""
    live: set[fx.Node] = set()
    for n in reversed(graph.nodes):
        if any(u in live for u in n.users):
            live.add(n)
        elif _in_place(n):  # before is_impure: fx calls every setitem impure, even into a tensor no one reads
            base = _written(n)
            if not isinstance(base, fx.Node) or base.op in ("placeholder", "get_attr") \
                    or op_name(base) in _VIEWS or any(u in live for u in base.users if u is not n):
                live.add(n)
        elif n.is_impure():
            live.add(n)
    return live


def eliminate_dead_code(graph: fx.Graph) -> None:
    """``graph.eliminate_dead_code`` that keeps the in-place ops :func:`live_nodes` keeps."""
    live = live_nodes(graph)
    for n in reversed(graph.nodes):
        if n not in live and not n.users:
            graph.erase_node(n)


def _in_place(n: fx.Node) -> bool:
    if n.op == "call_module":
        owner = n.graph.owning_module
        return owner is not None and bool(getattr(owner.get_submodule(n.target), "inplace", False))
    if n.op not in ("call_method", "call_function"):
        return False
    if n.kwargs.get("inplace") is True or n.target in _IN_PLACE_OPERATORS:
        return True
    name = op_name(n)
    return name.endswith("_") and not name.endswith("__")


def written_by(n: fx.Node) -> fx.Node | None:
    """The node whose tensor the in-place op ``n`` writes into; None when ``n`` is not in place."""
    base = _written(n) if _in_place(n) else None
    return base if isinstance(base, fx.Node) else None


def _written(n: fx.Node) -> Any:
    """The tensor an in-place op writes into, through chains of in-place ops (``x.mul_(a).add_(b)``)."""
    while _in_place(n) and n.args:
        n = n.args[0]
        if not isinstance(n, fx.Node):
            return n
    return n


_IN_PLACE_OPERATORS = (operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                       operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor)
_VIEWS = {"view", "reshape", "view_as", "reshape_as", "transpose", "permute", "getitem", "flatten", "unflatten",
          "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "select", "split", "chunk", "unbind", "t",
          "contiguous", "as_strided", "movedim", "swapaxes", "diagonal", "detach", "unfold"}
