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
import operator
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from .errors import GUARD, NUMBER_GUARD, AnalysisError, where
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
                     ga: list[int], gb: list[int], literal: list[Any], statistics: list[set[int]] = ()) -> Chan:
    """A reshape of the channel axis (grouped with the source axes ``ga`` into the output axes ``gb``).

    Merging axes around the channel axis repeats the channels once per outer position and widens each by the
    inner positions; splitting the channel axis into several axes keeps as channel axis the one the inner
    repeats (``inner``) leave whole, and ties the outer pieces to each other (a channel shuffle's groups).
    Split into groups x width per group with statistics taken within each group (``statistics``: the axes
    the reductions reading the result reduce), the channel axis is the groups' instead (:func:`_by_groups`).
    """
    if len(gb) == 1:
        p = ga.index(v.axis)
        outer, inner = math.prod(src[i] for i in ga[:p]), math.prod(src[i] for i in ga[p + 1:])
        if outer * len(v.segs) > MAX_COPIES:
            return keep_whole(prop, node, Chan(gb[0], v.segs), out[gb[0]], "repeats channels too often")
        new = Chan(gb[0], tuple(s.widen(inner) for s in v.segs) * outer)
    elif len(ga) == 1:
        users = _group_count_users(node, v, literal, gb, statistics) if len(gb) == 2 else None
        new = _by_groups(prop, node, v, out[gb[0]], out[gb[1]], gb[0], users) if users is not None else \
            _split_axis(prop, node, v, [out[j] for j in gb], gb)
    else:
        new = _split_and_merge(prop, node, v, src, out, ga, gb, literal, statistics)
    lit = literal[new.axis] if len(literal) == len(out) else None
    if isinstance(lit, int) and lit != -1:
        prop.patch(node, new.axis, new.segs)  # a literal width in the code: rewritten when slimming
        if len(ga) == 1 and lit == src[v.axis]:  # one group per channel (EvoNorm's groups=C): ``C // groups``
            for u in _divisions(node, v, lit):
                prop.patch(u, 1, new.segs, keyword="other")
    elif isinstance(lit, fx.Node):
        return _computed_width(prop, node, lit, new)
    elif len(literal) == 1 and isinstance(literal[0], fx.Node):  # a whole shape: x.view(y.shape)
        q = _size_query(literal[0])
        if q is not None and not q[2] and len(q[1]) == len(out):
            sized_like(prop, node, prop.value(q[0]), new)
        else:
            _protect_all(prop, node, [new.segs], "takes its shape from a value mdprune cannot follow")
    return new


def _computed_width(prop: Propagation, node: fx.Node, lit: fx.Node, new: Chan) -> Chan:
    """A reshape whose channel-axis size is computed from shapes (``C // nh`` or ``B * C * nh`` from ``x.shape``).

    Computed from channel counts alone, it becomes a patched literal. Otherwise the slim model recomputes it
    from its own shapes: right only if it is proportional to one channel count that always keeps the same
    proportion to the reshaped channels (the same dimensions); else the channels it reads and the reshaped ones
    are kept whole.
    """
    if _channel_sizes_only(prop, lit):  # no batch or spatial size in it: a literal, patched like one
        prop.patch(node, new.axis, new.segs)
        return new
    found: list[tuple[RawSeg, ...]] = []
    factors = _channel_factors(prop, lit, found)
    if factors is None or len(factors) != 1:
        what = "sets its channel count by a value computed without any channel count" if factors == [] else \
            "sets its channel count by a value mdprune cannot follow"
        _protect_all(prop, node, [*found, new.segs], what)
    else:  # channels tied later (a residual addition) may make them proportional: checked once all are known
        prop.defer(lambda: _proportional(prop, factors[0], new.segs) or _protect_all(
            prop, node, [*found, new.segs], "sets its channel count by a value computed from other channels"))
    return new


def guard(prop: Propagation, node: fx.Node) -> None:
    """``torch._assert(cond, msg)``. A guard the tracer wrote where it fixed a branch or a number to the example's
    shapes (``if C > 64:``, ``int(C ** .5)``): the channel counts its condition reads are kept whole, since a slim
    model's other count would fail it."""
    msg = node.args[1] if len(node.args) > 1 else node.kwargs.get("assert_msg")
    if msg not in (GUARD, NUMBER_GUARD):
        return
    found: list[tuple[RawSeg, ...]] = []
    _channel_factors(prop, node.args[0], found)
    _protect_all(prop, node, found, "is a branch or number the trace fixed for this width")


def sized_like(prop: Propagation, node: fx.Node, other: Any, new: Chan) -> None:
    """``reshape_as(other)``: the slim model takes ``other``'s width, right only if it has the same channels."""
    if isinstance(other, Chan) and other.axis == new.axis:
        prop.defer(lambda: _proportional(prop, other.segs, new.segs) or _protect_all(
            prop, node, [other.segs, new.segs], "takes its shape from a tensor with other channels"))
    else:
        _protect_all(prop, node, [new.segs], "takes its shape from a tensor without these channels")


def _protect_all(prop: Propagation, node: fx.Node, segs: list[tuple[RawSeg, ...]], what: str) -> bool:
    for s in segs:  # all kept whole: the computed size stays right
        prop.protect(s, f"{where(node)} {what}")
    return True


def _channel_factors(prop: Propagation, a: Any, found: list[tuple[RawSeg, ...]]) -> list[tuple[RawSeg, ...]] | None:
    """The channel counts the size ``a`` is a product (or quotient) of, None if one is used otherwise; every
    channel count read on the way is added to ``found``."""
    if not isinstance(a, fx.Node):
        return []
    q = _size_query(a)
    if q is not None:
        tensor, axes, single = q
        v = prop.value(tensor)
        if not isinstance(v, Chan) or v.axis not in axes:
            return []
        found.append(v.segs)
        return [v.segs] if single else None
    if isinstance(a.meta.get("mdp_shape"), (tuple, list)):  # a tensor's values, not a size
        return []
    if a.target in (operator.mul, operator.floordiv, operator.truediv) and len(a.args) == 2 and not a.kwargs:
        x, y = (_channel_factors(prop, b, found) for b in a.args)
        if x is not None and y is not None and (a.target is operator.mul or y == []):
            return x + y
        return None
    parts = [_channel_factors(prop, x, found) for x in a.all_input_nodes]
    return [] if all(p == [] for p in parts) else None


def _channel_sizes_only(prop: Propagation, a: Any) -> bool:
    """Whether the size ``a`` is computed from channel counts and constants alone (``C // heads`` with ``C`` read
    from ``x.shape``): under any plan the reshape's channel axis then has the kept width of the channels it holds,
    so the slim model can take it as a literal (PVT's ``sr(x).reshape(B, C, -1)``, Twins' ``C // heads``) and
    the channels it was read from need not be kept whole. A batch or spatial size in it (``B * C``) would vary
    with the input: not a literal."""
    if not isinstance(a, fx.Node):
        return isinstance(a, int)
    q = _size_query(a)
    if q is not None:
        v = prop.value(q[0])
        return q[2] and isinstance(v, Chan) and q[1] == (v.axis,)
    arith = (operator.mul, operator.floordiv, operator.add, operator.sub)
    return a.op == "call_function" and a.target in arith and not a.kwargs and len(a.args) == 2 and all(
        _channel_sizes_only(prop, b) for b in a.args)


def _size_query(a: fx.Node) -> tuple[fx.Node, tuple[int, ...], bool] | None:
    """``a`` as (tensor, the axes whose sizes it holds, whether it is one size) if it reads a tensor's shape."""
    if a.op == "call_function" and a.target is getattr and a.args[1:] == ("shape",) or \
            a.op == "call_method" and a.target == "size":
        t = a.args[0]
        shape = t.meta.get("mdp_shape") if isinstance(t, fx.Node) else None
        if not isinstance(shape, tuple):
            return None
        dim = a.args[1] if len(a.args) > 1 else a.kwargs.get("dim")
        if isinstance(dim, int):
            return t, (dim % len(shape),), True
        return t, tuple(range(len(shape))), False
    if a.op == "call_function" and a.target is operator.getitem and isinstance(a.args[0], fx.Node):
        base, idx = _size_query(a.args[0]), a.args[1]
        if base is None or base[2]:
            return None
        if isinstance(idx, int):
            return base[0], (base[1][idx],), True
        if isinstance(idx, slice):
            return base[0], tuple(base[1][idx]), False
    return None


def _proportional(prop: Propagation, a: tuple[RawSeg, ...], b: tuple[RawSeg, ...]) -> bool:
    """Whether the widths of ``a`` and ``b`` keep the same ratio under every plan."""
    pa, pb = _width_terms(prop, a), _width_terms(prop, b)
    if pa.keys() != pb.keys() or not pa:
        return False
    k0 = next(iter(pa))
    return all(pa[k] * pb[k0] == pb[k] * pa[k0] for k in pa)


def _width_terms(prop: Propagation, segs: tuple[RawSeg, ...]) -> dict[tuple[int, ...], int]:
    """The width of ``segs`` as a polynomial in the sizes of its prunable spaces: monomial -> coefficient."""
    terms: dict[tuple[int, ...], int] = {}
    for s in prop.leaves(segs):
        roots = [prop.find(i) for i in s.spaces]
        free = tuple(sorted(r for r in roots if not prop.spaces[r].protected and prop.spaces[r].size > 1))
        const = math.prod(prop.spaces[r].size for r in roots if r not in free) * s.inner
        terms[free] = terms.get(free, 0) + const
    return terms


def _split_and_merge(prop: Propagation, node: fx.Node, v: Chan, src: tuple[int, ...], out: tuple[int, ...],
                     ga: list[int], gb: list[int], literal: list[Any], statistics: list[set[int]]) -> Chan:
    """A reshape that splits some axes and merges others (MobileViT's unfold ``(B, C, H, W) -> (B*C*nh, ph, nw,
    pw)``, a GroupNorm written as ``x.view(B, G, -1)``): seen as splitting every axis into the common factors of
    both shapes, then merging factors."""
    factors = _common_factors([src[i] for i in ga], [out[j] for j in gb])
    if factors is None:  # e.g. (2, 3) -> (3, 2): no common factors
        return keep_whole(prop, node, Chan(gb[0], v.segs), out[gb[0]], "reshapes channels across axes")
    spans_a, spans_b = _spans([src[i] for i in ga], factors), _spans([out[j] for j in gb], factors)
    lo, hi = spans_a[ga.index(v.axis)]
    on = [gb[next(q for q, (b_lo, b_hi) in enumerate(spans_b) if b_lo <= f < b_hi)] for f in (lo, hi - 1)]
    users = _group_count_users(node, v, literal, on, statistics) if hi - lo == 2 and on[0] != on[1] else None
    if users is not None:
        split = _by_groups(prop, node, v, factors[lo], factors[lo + 1], lo, users)
    else:
        split = _split_axis(prop, node, v, factors[lo:hi], list(range(lo, hi))) if hi - lo > 1 else Chan(lo, v.segs)
    c = split.axis  # the factor that carries the channels
    q = next(k for k, (b_lo, b_hi) in enumerate(spans_b) if b_lo <= c < b_hi)
    outer, inner = math.prod(factors[spans_b[q][0]:c]), math.prod(factors[c + 1:spans_b[q][1]])
    if outer * len(split.segs) > MAX_COPIES:
        return keep_whole(prop, node, Chan(gb[q], split.segs), out[gb[q]], "repeats channels too often")
    return Chan(gb[q], tuple(s.widen(inner) for s in split.segs) * outer)


def _group_count_users(node: fx.Node, v: Chan, literal: list[Any], axes: list[int],
                       statistics: list[set[int]]) -> list[fx.Node] | None:
    """Whether the channels split into groups (output axis ``axes[0]``) x width per group (``axes[1]``) are
    split for statistics within each group (a reduction over the width per group, not over the groups: EvoNorm,
    a GroupNorm written out); then the nodes the slim model must compute with the kept group count (``C //
    groups``, ``C % groups``: the width per group and its check), else None. A width per group computed
    otherwise than from the channel count: None (the width per group must stay what it is)."""
    if not any(axes[1] in r and axes[0] not in r for r in statistics):
        return None
    lit = literal[axes[1]] if len(literal) == len(node.meta["mdp_shape"]) else None
    if not isinstance(lit, fx.Node):
        return [] if isinstance(lit, int) else None  # a literal width per group (or -1) stays right
    c, g = lit.args if lit.target is operator.floordiv and len(lit.args) == 2 else (None, None)
    q = _size_query(c) if isinstance(c, fx.Node) and isinstance(g, int) else None
    if q is None or q[0] is not node.args[0] or q[1] != (v.axis,):
        return None
    return _divisions(node, v, g)


def _divisions(node: fx.Node, v: Chan, g: int) -> list[fx.Node]:
    """``C // g`` and ``C % g`` with ``C`` the reshape input's channel count read from its shape."""
    x, counts = node.args[0], []
    for u in x.users:
        q = _size_query(u)
        if q is not None and not q[2]:
            counts += [w for w in u.users if _size_query(w) == (x, (v.axis,), True)]
        elif q == (x, (v.axis,), True):
            counts.append(u)
    return [u for c in counts for u in c.users if u.target in (operator.floordiv, operator.mod) and u.args == (c, g)]


def whole_groups(prop: Propagation, node: fx.Node, segs: tuple[RawSeg, ...], groups: int, width: int, name: str,
                 reason: str) -> int:
    """``segs`` seen as ``groups`` x ``width`` per group (group-major), whole groups pruned and the width per
    group kept whole for ``reason``; returns the groups' space."""
    g = prop.new_space(groups, "channel", f"{name}:groups")
    prop.spaces[g].repeat = width
    prop.unify(segs, (RawSeg((g, prop.new_space(width, "channel", name, protected=reason)),),), node)
    return g


def _by_groups(prop: Propagation, node: fx.Node, v: Chan, groups: int, width: int, axis: int,
               users: list[fx.Node]) -> Chan:
    """Channels as ``groups`` x ``width`` per group (group-major) with statistics taken within each group: whole
    groups are pruned (the kept groups' statistics do not change), the width per group is kept; the channel
    axis is the groups' (``axis``). ``users`` compute with the group count (``C // groups``): patched."""
    g = whole_groups(prop, node, v.segs, groups, width, node.name,
                     f"{where(node)} takes statistics within groups of {width} channels")
    for u in users:
        prop.patch(u, 1, (RawSeg((g,)),), keyword="other")
    return Chan(axis, (RawSeg((g,)),))


def _common_factors(a: list[int], b: list[int]) -> list[int] | None:
    """The coarsest sizes both ``a`` and ``b`` are row-major products of consecutive runs of, or None."""
    ends = sorted({math.prod(a[i:]) for i in range(len(a))} | {math.prod(b[i:]) for i in range(len(b))} | {1})
    if any(y % x for x, y in zip(ends, ends[1:], strict=False)):
        return None
    return [y // x for x, y in zip(ends, ends[1:], strict=False)][::-1]


def _spans(sizes: list[int], factors: list[int]) -> list[tuple[int, int]]:
    """For each axis of ``sizes``: the range of ``factors`` it is made of."""
    spans, k = [], 0
    for n in sizes:
        start, acc = k, 1
        while acc < n:
            acc *= factors[k]
            k += 1
        spans.append((start, k))
    return spans


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
               "tensor_split": split_rule, "unbind": split_rule, "narrow": narrow_rule,
               "_assert": guard}  # (a guard reads computed sizes as the reshape rules do)
