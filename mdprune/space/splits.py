"""Channel splits: chunk, split, narrow and slices of the channel axis, and reshapes that split or merge it.

A split at segment boundaries gives each part its segments; a split inside a segment refines the segment's
space into a concatenation (see :mod:`mdprune.space.layouts`), so every part is made of dimensions again.
The slim model's split sizes and slice bounds follow the kept widths: the call is rewritten, in the traced
graph, as ``torch.split(x, [sizes], dim)`` or ``torch.narrow(x, dim, start, length)`` whose literals are
patches. Channels no consumer reads (the tail a slice drops) remain their own dimensions: pruning them changes
only their producer.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from .errors import AnalysisError, where
from .values import Chan, ParamRef, RawSeg, Several

if TYPE_CHECKING:
    from .channels import Propagation

MAX_COPIES = 4096  # a merge that repeats the channels more often than this keeps them whole instead


def _arg(node: fx.Node, i: int, key: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key, default)


def _as_call(prop: Propagation, node: fx.Node, fn: Any, args: tuple[Any, ...]) -> None:
    """Rewrite ``node`` in place as ``fn(*args)`` (the same computation, with literals slimming can patch)."""
    node.op, node.target, node.args, node.kwargs = "call_function", fn, args, {}
    prop.gm.recompile()


def split_rule(prop: Propagation, node: fx.Node) -> Any:
    """``chunk``, ``split``, ``split_with_sizes``, ``tensor_split`` and ``unbind``: a tuple of parts."""
    x, shapes = node.args[0], node.meta.get("mdp_shape")
    v, src = prop.value(x), x.meta.get("mdp_shape") if isinstance(x, fx.Node) else None
    if not isinstance(shapes, list) or not isinstance(src, tuple):
        return None
    unbind = node.target in ("unbind", torch.unbind)
    dim = (_arg(node, 1, "dim", 0) if unbind else _arg(node, 2, "dim", 0)) % len(src)
    if isinstance(v, ParamRef):
        if v.axes[dim] is not None and src[dim] > 1:
            raise AnalysisError(f"{where(node)} splits parameter {v.tensor}; not supported")
        return Several(tuple(v for _ in shapes))
    if not isinstance(v, Chan):
        return None
    if v.axis != dim:
        axis = v.axis - (1 if unbind and dim < v.axis else 0)
        return Several(tuple(v.moved(axis) for _ in shapes))
    if unbind:
        prop.protect(v.segs, f"{where(node)} takes single channels apart")
        return Several(tuple(None for _ in shapes))
    sizes = [s[dim] for s in shapes]
    parts = prop.split(v.segs, sizes, node)
    _as_call(prop, node, torch.split, (x, sizes, dim))
    for k, p in enumerate(parts):
        if p:
            prop.patch(node, k, p)  # each part's kept width
    return Several(tuple(Chan(dim, p) for p in parts))


def narrow_rule(prop: Propagation, node: fx.Node) -> Any:
    """``torch.narrow(x, dim, start, length)`` (also what a channel slice ``x[:, a:b]`` becomes)."""
    x = node.args[0]
    v, src = prop.value(x), x.meta.get("mdp_shape") if isinstance(x, fx.Node) else None
    if not isinstance(v, (Chan, ParamRef)) or not isinstance(src, tuple):
        return None
    dim = _arg(node, 1, "dim") % len(src)
    start, length = _arg(node, 2, "start"), _arg(node, 3, "length")
    if isinstance(v, ParamRef):
        if v.axes[dim] is not None and node.meta["mdp_shape"][dim] != src[dim]:
            raise AnalysisError(f"{where(node)} narrows parameter {v.tensor}; not supported")
        return v
    if v.axis != dim:
        return v
    if not isinstance(start, int) or not isinstance(length, int):
        return keep_whole(prop, node, v, length if isinstance(length, int) else node.meta["mdp_shape"][dim],
                          "narrows channels by a computed amount")
    return slice_channels(prop, node, v, src[dim], start, start + length)


def slice_channels(prop: Propagation, node: fx.Node, v: Chan, width: int, start: int, stop: int) -> Chan:
    """Channels ``start:stop`` of ``v``; ``node`` becomes ``torch.narrow`` with its bounds patched."""
    before, part, after = prop.split(v.segs, [start, stop - start, width - stop], node)
    _as_call(prop, node, torch.narrow, (node.args[0], v.axis, start, stop - start))
    if before:
        prop.patch(node, 1, before)
    if part:
        prop.patch(node, 2, part)
    del after  # read by no one: its channels stay dimensions of their producer alone
    return Chan(v.axis, part)


def keep_whole(prop: Propagation, node: fx.Node, v: Chan, width: int, what: str) -> Chan:
    """Fallback: ``v``'s channels kept whole; the result a new kept-whole space of ``width`` channels."""
    reason = f"{where(node)} {what}"
    prop.protect(v.segs, reason)
    return Chan(v.axis, (RawSeg((prop.new_space(width, "channel", node.name, protected=reason),)),))


def reshape_channels(prop: Propagation, node: fx.Node, v: Chan, src: tuple[int, ...], out: tuple[int, ...],
                     ga: list[int], gb: list[int], literal: list[Any]) -> Chan:
    """A reshape of the channel axis (grouped with the source axes ``ga`` into the output axes ``gb``).

    Merging axes around the channel axis repeats the channels once per outer position and widens each by the
    inner positions; splitting the channel axis into several axes keeps as channel axis the one the inner
    repeats (``inner``) leave whole, and ties the outer pieces to each other (a channel shuffle's groups).
    """
    if len(gb) == 1:
        p = ga.index(v.axis)
        outer, inner = math.prod(src[i] for i in ga[:p]), math.prod(src[i] for i in ga[p + 1:])
        if outer * len(v.segs) > MAX_COPIES:
            return keep_whole(prop, node, Chan(gb[0], v.segs), out[gb[0]], "repeats channels too often")
        new = Chan(gb[0], tuple(s.widen(inner) for s in v.segs) * outer)
    elif len(ga) == 1:
        new = _split_axis(prop, node, v, [out[j] for j in gb], gb)
    else:
        return keep_whole(prop, node, Chan(gb[0], v.segs), out[gb[0]], "reshapes channels across axes")
    if len(literal) == len(out) and isinstance(literal[new.axis], int) and literal[new.axis] != -1:
        prop.patch(node, new.axis, new.segs)  # a literal width in the code: rewritten when slimming
    return new


def _split_axis(prop: Propagation, node: fx.Node, v: Chan, sizes: list[int], gb: list[int]) -> Chan:
    segs = prop.leaves(v.segs)
    k = 0  # the outermost axis whose trailing axes the repeats of every segment cover
    while any(s.inner % math.prod(sizes[k + 1:]) for s in segs):
        k += 1
    tail = math.prod(sizes[k + 1:])
    segs = tuple(RawSeg(s.spaces, s.inner // tail) for s in segs)
    outer = math.prod(sizes[:k])
    if outer > 1:
        parts = prop.split(segs, [sizes[k]] * outer, node)
        for p in parts[1:]:  # the pieces on the outer axes are one more axis of positions: the same channels
            prop.unify(parts[0], p, node)
        segs = parts[0]
    return Chan(gb[k], segs)


def several_items(prop: Propagation, a: Any) -> tuple[list[Any], list[Any]] | None:
    """The values and shapes of a tuple-valued node (``torch.cat(x.chunk(2))``), or None."""
    v = prop.value(a)
    shapes = a.meta.get("mdp_shape") if isinstance(a, fx.Node) else None
    if isinstance(v, Several) and isinstance(shapes, list):
        return list(v.items), list(shapes)
    return None


SPLIT_RULES = {"chunk": split_rule, "split": split_rule, "split_with_sizes": split_rule,
               "tensor_split": split_rule, "unbind": split_rule, "narrow": narrow_rule}
