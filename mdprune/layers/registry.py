"""The layer registry: what mdprune knows about each kind of leaf layer, in one record, found by module type.

A :class:`LayerKind` holds how channels flow through the layer (its *channel rule*), how the slim model updates
its size attributes once its tensors are sliced (``resize``), and the latency op its rule adds (``latency``:
how that op is built alone at given widths, and its multiply-accumulates). Where its importance is read follows
from the roles its rule binds tensors with (see :func:`mdprune.layers.bind`). mdprune's own kinds live in one
module per family beside this one; :func:`register_layer` adds a user's.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, overload

from torch import nn

if TYPE_CHECKING:
    import torch
    import torch.fx as fx

    from ..space.channels import Propagation

ChannelRule = Callable[["Propagation", "fx.Node", nn.Module], Any]
"""``(prop, node, module) -> value``: the analysis value of the layer's output (a :class:`Chan` for a tensor
whose channels sit on one axis, None for one without channels); records bindings and ops on ``prop``."""
Resize = Callable[[nn.Module, nn.Module], None]
"""``(new, old)``: ``new`` is a copy of ``old`` whose bound tensors are already sliced; set its size attributes."""
Build = Callable[[dict[str, Any], dict[str, int], int], tuple[nn.Module, tuple["torch.Tensor", ...]]]
"""``(fixed, widths, batch) -> (module, inputs)``: the op alone at ``widths`` (role -> width), on a batch."""
Macs = Callable[[dict[str, Any], dict[str, int]], int]
"""``(fixed, widths) -> MACs`` of one forward pass of the op as analysed (its batch is ``fixed["batch"]``). The
solver passes NumPy arrays of widths to count a whole grid at once: use arithmetic, not ``int()`` or ``if``."""
Subclasses = Literal["unchanged", "all", "exact"]

# modules of this package, loaded on first lookup
_BUILTIN_FAMILIES = ("conv", "conv1d", "conv_transpose", "linear", "matmul", "norm", "passthrough", "recurrent",
                     "stdconv")
_RESERVED_OPS = frozenset({"attention", "node"})  # op kinds of latency/ops.py (attention cores, replayed nodes)


@dataclass(frozen=True)
class LatencyOp:
    """The latency op a layer's rule adds: its roles (the widths that drive it, in table-key order), how to build
    it alone, and its multiply-accumulates (None: none counted, a memory-bound op)."""

    roles: tuple[str, ...]
    build: Build
    macs: Macs | None = None


@dataclass(frozen=True)
class LayerKind:
    """Everything mdprune knows about one kind of leaf layer.

    Attributes:
        name: the kind's name; also the kind of the latency op its rule adds (``Op.kind``).
        types: the classes it covers (or ``"package.module.Class"`` paths of optional libraries).
        channels: the channel rule.
        resize: updates the slim copy's size attributes; None when its size lives in its tensors only.
        latency: the latency op kind its rule adds (named after the layer kind: ``Op.kind == name``); None for
            kinds that add no op of their own (element-wise and per-channel layers, timed as node ops if at all).
        subclasses: which subclasses of ``types`` it covers: ``"unchanged"`` those that override nothing a
            forward may use (others are traced into), ``"all"`` every subclass, ``"exact"`` none.
        accepts: a further check on the instance (None: every instance); a refused one is traced into.
        masked: for a layer that normalises over features its rule marks *normalised* (``mark_normalized``):
            ``module -> stand-in`` for the masked model, computing the same norm over the kept features only
            (same tensor names; ``set_keep(mask)``; see :class:`mdprune.layers.MaskedRMSNorm`). None: the
            masked model knows LayerNorm only.
    """

    name: str
    types: tuple[type | str, ...]
    channels: ChannelRule
    resize: Resize | None = None
    latency: LatencyOp | None = None
    subclasses: Subclasses = "unchanged"
    accepts: Callable[[nn.Module], bool] | None = None
    masked: Callable[[nn.Module], nn.Module] | None = None


_BUILTIN: list[LayerKind] = []  # mdprune's own kinds, registered by the family modules beside this one
_USER: list[LayerKind] = []  # kinds registered by register_layer: they win over built-in ones, later over earlier


def builtin(kind: LayerKind) -> LayerKind:
    """Register one of mdprune's own kinds (a user's registration of the same type wins)."""
    _BUILTIN.append(kind)
    _changed()
    return kind


@overload
def register_layer(types: type | str | tuple[type | str, ...], *, channels: ChannelRule, resize: Resize | None = ...,
                   latency: LatencyOp | None = ..., subclasses: Subclasses = ...,
                   accepts: Callable[[nn.Module], bool] | None = ..., name: str | None = ...,
                   masked: Callable[[nn.Module], nn.Module] | None = ...) -> LayerKind: ...


@overload
def register_layer(types: None = ..., *, channels: ChannelRule, resize: Resize | None = ...,
                   latency: LatencyOp | None = ..., subclasses: Subclasses = ...,
                   accepts: Callable[[nn.Module], bool] | None = ..., name: str | None = ...,
                   masked: Callable[[nn.Module], nn.Module] | None = ...) -> Callable[[type], type]: ...


def register_layer(types: type | str | tuple[type | str, ...] | None = None, *, channels: ChannelRule,
                   resize: Resize | None = None, latency: LatencyOp | None = None,
                   subclasses: Subclasses = "unchanged", accepts: Callable[[nn.Module], bool] | None = None,
                   name: str | None = None, masked: Callable[[nn.Module], nn.Module] | None = None
                   ) -> LayerKind | Callable[[type], type]:
    """Teach mdprune a layer: it is traced as one node and pruned through ``channels`` (see :class:`LayerKind`).

    Without ``types`` it is a class decorator (``@mdprune.register_layer(channels=...)``). The layer's slim copy
    keeps its class; its tensors are sliced along the axes its rule binds, then ``resize`` updates its size
    attributes. A registration replaces any earlier one of the same type (mdprune's own included).

    Returns:
        the new :class:`LayerKind`, or (as a decorator) the class itself.
    """
    if subclasses not in ("unchanged", "all", "exact"):
        raise ValueError(f"subclasses must be 'unchanged', 'all' or 'exact', not {subclasses!r}")
    if not callable(channels):
        raise TypeError("channels must be a rule (prop, node, module) -> value")

    def add(ts: tuple[type | str, ...]) -> LayerKind:
        _load_builtins()
        for t in ts:
            if not isinstance(t, str) and not (isinstance(t, type) and issubclass(t, nn.Module)):
                raise TypeError(f"register_layer takes nn.Module classes (or their dotted paths), not {t!r}")
        if not ts:
            raise ValueError("register_layer needs at least one type")
        first = ts[0]
        kind = LayerKind(name or (first if isinstance(first, str) else first.__name__).rpartition(".")[2], ts,
                         channels, resize, latency, subclasses, accepts, masked)
        taken = _RESERVED_OPS | {k.name for k in _BUILTIN if k.latency is not None} \
            | {k.name for k in _USER if k.latency is not None and k.types != ts}
        if latency is not None and kind.name in taken:
            raise ValueError(f"the latency op kind {kind.name!r} is taken; give the layer kind another name=")
        _USER.append(kind)
        _changed()
        return kind

    if types is None:
        def decorate(cls: type) -> type:
            add((cls,))
            return cls
        return decorate
    return add(types if isinstance(types, tuple) else (types,))


def _import(path: str) -> type | None:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):  # optional libraries, other versions
        return None


def _load_builtins() -> None:
    for family in _BUILTIN_FAMILIES:  # each registers its kinds when first imported
        importlib.import_module(f"{__package__}.{family}")


@functools.cache
def _table() -> dict[type, LayerKind]:
    """Class -> kind, for every registered class importable here (a user's kind wins, a later one too)."""
    _load_builtins()
    table: dict[type, LayerKind] = {}
    for kind in [*_BUILTIN, *_USER]:
        for t in kind.types:
            cls = _import(t) if isinstance(t, str) else t
            if cls is not None:
                table[cls] = kind
    return table


# nn.Module's own methods do not change what a forward computes, except these
_MODULE_API = frozenset(dir(nn.Module)) - {"forward", "__call__", "_call_impl", "_wrapped_call_impl", "__getattr__",
                                           "__getattribute__"}
_HARMLESS = frozenset({"reset_parameters", "reset_running_stats", "_check_input_dim"})  # set-up and checks only


def _covers(cls: type, base: type) -> bool:
    """Whether ``cls`` runs ``base``'s computation: it overrides no method of ``base`` that a forward may use."""
    for k in cls.__mro__[:cls.__mro__.index(base)]:
        for name, v in vars(k).items():
            method = callable(v) or isinstance(v, (staticmethod, classmethod, property))
            if method and hasattr(base, name) and name not in _MODULE_API and name not in _HARMLESS:
                return False
    return True


def layer_kind(m: nn.Module) -> LayerKind | None:
    """The kind of a leaf module, or None if mdprune does not know it (it is then traced into).

    Its own class's kind first, else that of its nearest registered ancestor, if the kind covers that subclass
    (by default: one that overrides nothing the ancestor's forward uses; a BatchNorm whose forward adds an
    activation is traced into); and if the kind's ``accepts`` takes the instance.
    """
    table = _table()
    cls = type(m)
    base = next((k for k in cls.__mro__ if k in table), None)
    if base is None:
        return None
    kind = table[base]
    if base is not cls and (kind.subclasses == "exact" or (kind.subclasses == "unchanged" and not _covers(cls, base))):
        return None
    if kind.accepts is not None and not kind.accepts(m):
        return None
    return kind


def latency_op(kind: str) -> LatencyOp | None:
    """The latency op of kind ``kind`` registered with a layer kind (None for other op kinds: attention, node)."""
    return latency_ops().get(kind)


@functools.cache
def latency_ops() -> dict[str, LatencyOp]:
    """Every latency op kind registered with a layer kind (a user's wins over mdprune's own)."""
    _table()
    return {k.name: k.latency for k in [*_BUILTIN, *_USER] if k.latency is not None}


def _changed() -> None:
    _table.cache_clear()
    latency_ops.cache_clear()
