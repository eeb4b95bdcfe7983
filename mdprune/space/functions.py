"""Channel rules for functions and tensor methods in the traced graph (add, cat, flatten, reshape, ...).

Each rule maps the analysis values of a node's inputs to the value of its output. An op that touches
channels and has no rule is an error that names it: mdprune never guesses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .conv_calls import CONV_RULES
from .einsum import EINSUM_RULES
from .errors import AnalysisError, where
from .op_names import op_name
from .splits import MAX_COPIES, SPLIT_RULES, keep_whole, reshape_channels, several_items, sized_like, slice_channels
from .values import Chan, ParamRef, RawSeg, Several

if TYPE_CHECKING:
    from .channels import Propagation

# Element-wise, shape-preserving ops: channels map to themselves.
UNARY = {
    "relu", "relu_", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh",
    "leaky_relu", "elu", "mish", "softplus", "dropout", "contiguous", "clone", "detach", "float", "half",
    "bfloat16", "to", "type_as", "neg", "abs", "exp", "sqrt", "rsqrt", "square", "pow", "sigmoid_",
    "clamp", "clamp_min", "clamp_max", "identity",
}
BINARY = {"add", "iadd", "add_", "sub", "isub", "sub_", "mul", "imul", "mul_", "truediv", "div", "div_"}
# Spatial ops on NCHW tensors: channels stay on axis 1.
SPATIAL = {
    "adaptive_avg_pool2d", "adaptive_max_pool2d", "avg_pool2d", "max_pool2d", "interpolate",
    "upsample", "upsample_bilinear", "upsample_nearest",
    "adaptive_avg_pool3d", "adaptive_max_pool3d", "avg_pool3d", "max_pool3d",
}
REDUCE = {"mean", "sum", "amax", "amin", "nanmean", "var", "std", "prod", "logsumexp", "nansum", "norm"}
_KEEPDIM_AT = {"var": 3, "std": 3, "norm": 3}  # (input, dim | p, unbiased | dim, keepdim); others (input, dim, keepdim)
# Ops that never produce tensors carrying channels (shape queries, checks).
SHAPE = {"size", "dim", "numel", "getattr", "eq", "ne", "lt", "le", "gt", "ge", "_assert", "len",
         "floordiv", "mod", "is_floating_point"}


def _arg(node: fx.Node, i: int, key: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key, default)


def _shape(a: Any) -> tuple[int, ...] | None:
    if isinstance(a, fx.Node):
        s = a.meta.get("mdp_shape")
        return s if isinstance(s, tuple) else None
    return None


def _touches_channels(prop: Propagation, node: fx.Node) -> bool:
    found = []

    def visit(a: Any) -> Any:
        v = prop.value(a)
        if isinstance(v, (Chan, ParamRef, Several)):
            found.append(a)
        return a

    fx.node.map_arg((node.args, node.kwargs), visit)
    return bool(found)


def has_rule(name: str) -> bool:
    """Whether mdprune has a channel rule for the function or method ``name``."""
    return name in _RULES or name in UNARY or name in SHAPE


def function_rule(prop: Propagation, node: fx.Node) -> Any:
    """Analysis value of a call_function / call_method node."""
    name = op_name(node)
    rule = _RULES.get(name)
    if rule is not None:
        return rule(prop, node)
    if name in UNARY:
        return prop.value(node.args[0])
    if name in SHAPE:
        return None
    return unknown(prop, node)


def unknown(prop: Propagation, node: fx.Node) -> None:
    """An op without a rule: fine if it never sees channels (positions, masks, shapes), else an error."""
    if _touches_channels(prop, node):
        raise AnalysisError(f"mdprune does not know how {where(node)} treats channels")


# ---- helpers shared with module rules ------------------------------------------------------------------------

def elementwise_along(prop: Propagation, node: fx.Node, arg: Any, dim: int | None) -> Any:
    """An op that mixes values along ``dim`` (softmax, ...): fine unless ``dim`` is the channel axis."""
    v = prop.value(arg)
    shape = _shape(arg)
    if isinstance(v, Chan) and dim is not None and dim % len(shape) == v.axis:  # (VOLO's outlook weights)
        prop.protect(v.segs, f"{where(node)} mixes values across them (dim={dim})")
        return v
    if isinstance(v, ParamRef):  # mixed along ``dim``: those entries are no longer the parameter's own
        mixed = range(len(v.axes)) if dim is None else [dim % len(v.axes)]
        return ParamRef(v.tensor, tuple(None if i in mixed else a for i, a in enumerate(v.axes)))
    return v


def flatten_value(prop: Propagation, node: fx.Node, arg: Any, start: int, end: int) -> Any:
    v, shape = prop.value(arg), _shape(arg)
    if not isinstance(v, (Chan, ParamRef)):
        return None
    n = len(shape)
    start, end = start % n, end % n
    if isinstance(v, ParamRef):
        if any(shape[i] != 1 for i in range(start, end + 1) if v.axes[i] is not None):
            raise AnalysisError(f"{where(node)} flattens parameter {v.tensor}; not supported")
        axes = v.axes[:start] + (None,) + v.axes[end + 1:]
        return ParamRef(v.tensor, axes)
    if v.axis < start:
        return v
    if v.axis > end:
        return v.moved(v.axis - (end - start))
    outer, inner = math.prod(shape[start:v.axis]), math.prod(shape[v.axis + 1:end + 1])
    if outer * len(v.segs) > MAX_COPIES:  # positions folded in front of the channels: one copy each
        return keep_whole(prop, node, Chan(start, v.segs), math.prod(shape[start:end + 1]),
                          "repeats channels too often")
    return Chan(start, tuple(s.widen(inner) for s in v.segs) * outer)


NODE_KEY = "node:"  # prefix of a ``PruningSpace.normalized`` key that names a function call, not a module


def mark_normalized(prop: Propagation, key: str, segs: tuple[RawSeg, ...]) -> None:
    """Record a LayerNorm over the channels ``segs`` (``key``: its module, or ``NODE_KEY`` + its node's name)."""
    prop.normalized[key] = segs
    for s in segs:
        for i in s.spaces:
            prop.spaces[prop.find(i)].normalized = True


def _norm_dims(d: Any, n: int) -> list[int]:
    if d is None:
        return list(range(n))
    if isinstance(d, int):
        return [d % n]
    return [x % n for x in d]


# ---- rules -------------------------------------------------------------------------------------------------

def _binary(prop: Propagation, node: fx.Node) -> Any:
    a, b = node.args[0], _arg(node, 1, "other")
    return _combine(prop, node, prop.value(a), _shape(a), prop.value(b), _shape(b), node.meta.get("mdp_shape"))


def _addcmul(prop: Propagation, node: fx.Node) -> Any:
    """``torch.addcmul(input, t1, t2)`` / ``addcdiv``: ``input + value * t1 (* or /) t2``, two element-wise
    combinations (ResMLP's affine ``addcmul(beta, alpha, x)``)."""
    a, t1, t2 = node.args[0], _arg(node, 1, "tensor1"), _arg(node, 2, "tensor2")
    s1, s2 = _shape(t1), _shape(t2)
    s12 = tuple(torch.broadcast_shapes(s1, s2)) if s1 is not None and s2 is not None else (s1 or s2)
    v12 = _combine(prop, node, prop.value(t1), s1, prop.value(t2), s2, s12)
    return _combine(prop, node, prop.value(a), _shape(a), v12, s12, node.meta.get("mdp_shape"))


def _combine(prop: Propagation, node: fx.Node, va: Any, sa: Any, vb: Any, sb: Any, out: Any) -> Any:
    """The value of an element-wise combination of ``va`` (shape ``sa``) and ``vb`` (shape ``sb``)."""
    if isinstance(va, Chan) and isinstance(vb, Chan):
        ra, rb = len(sa) - va.axis, len(sb) - vb.axis  # channel axes counted from the right
        if ra != rb:  # one side's channels meet the other's broadcast axis: track those, keep the others whole
            for keep, other, so, r in ((va, vb, sb, ra), (vb, va, sa, rb)):
                if r > len(so) or so[-r] == 1:
                    prop.protect(other.segs, f"{where(node)} combines them along an axis of other channels")
                    return keep.moved(len(out) - r)
            raise AnalysisError(f"{where(node)} combines tensors whose channels are on different axes")
        if sa[va.axis] != sb[vb.axis] and 1 in (sa[va.axis], sb[vb.axis]):  # one channel broadcast to all
            one, many = (va, vb) if sa[va.axis] == 1 else (vb, va)
            prop.protect(one.segs, f"{where(node)} broadcasts a single channel against channels")
            return many.moved(len(out) - (len(sa) - va.axis))
        prop.unify(va.segs, vb.segs, node)
        return va.moved(len(out) - (len(sa) - va.axis))
    if isinstance(vb, Chan):
        va, vb, sa, sb = vb, va, sb, sa
    if isinstance(va, Chan):
        back = len(sa) - va.axis  # channel axis counted from the right
        if sb is not None and back <= len(sb) and sb[-back] != 1:
            j = len(sb) - back
            if isinstance(vb, ParamRef) and vb.axes[j] is not None:
                prop.bind(vb.tensor, vb.axes[j], va.segs, node, "param")
            else:  # a tensor without channels along that axis (attention scores, a literal): kept whole
                prop.protect(va.segs, f"{where(node)} combines them with a tensor whose entries are not channels")
        return va.moved(len(out) - back)
    if isinstance(va, ParamRef) or isinstance(vb, ParamRef):
        p = va if isinstance(va, ParamRef) else vb
        s = sa if isinstance(va, ParamRef) else sb
        other = sb if isinstance(va, ParamRef) else sa
        if other is None and s == out:  # parameter times a number: still the same parameter view
            return p
        if isinstance(va, ParamRef) and isinstance(vb, ParamRef):
            return _parameter_sum(prop, node, va, sa, vb, sb, out)
        prop.unpruned_params.append((p.tensor, node, None))  # added to a tensor without channels (a bias on
        return None  # attention scores): the result has none; the parameter must stay whole (checked at the end)
    return None


def _parameter_sum(prop: Propagation, node: fx.Node, va: ParamRef, sa: tuple[int, ...], vb: ParamRef,
                   sb: tuple[int, ...], out: tuple[int, ...]) -> Chan:
    """Two parameters combined element-wise (Hiera's ``pos_embed + pos_embed_win``): the one axis along which
    both hold their own entries becomes channels of their own, with both parameters bound to them. Along no
    axis or several (an outer product of coordinates and learned frequencies, ``a + b`` of two matrices) the
    result has no channels and both parameters are kept whole."""
    shared = []
    for j in range(len(out)):
        ja, jb = j - (len(out) - len(sa)), j - (len(out) - len(sb))
        if (ja >= 0 and jb >= 0 and out[j] > 1 and sa[ja] == sb[jb] == out[j]
                and va.axes[ja] is not None and vb.axes[jb] is not None):
            shared.append((j, ja, jb))
    if len(shared) != 1:
        prop.unpruned_params += [(va.tensor, node, None), (vb.tensor, node, None)]
        return None
    j, ja, jb = shared[0]
    segs = (RawSeg((prop.new_space(out[j], "channel", f"{va.tensor}+{vb.tensor}"),)),)
    prop.bind(va.tensor, va.axes[ja], segs, node, "param")
    prop.bind(vb.tensor, vb.axes[jb], segs, node, "param")
    return Chan(j, segs)


def _cat(prop: Propagation, node: fx.Node) -> Any:
    tensors = _arg(node, 0, "tensors")
    dim = _arg(node, 1, "dim", 0)
    items = several_items(prop, tensors)  # torch.cat(x.chunk(2)): a tuple-valued node
    vals, shapes = items if items is not None else ([prop.value(t) for t in tensors], [_shape(t) for t in tensors])
    n = len(shapes[0])
    dim %= n
    chans = [(v, s) for v, s in zip(vals, shapes, strict=True) if isinstance(v, Chan)]
    if not chans:
        if any(isinstance(v, ParamRef) for v in vals):
            raise AnalysisError(f"{where(node)} concatenates parameters; not supported")
        return None
    axis = chans[0][0].axis
    if any(v.axis != axis for v, _ in chans):  # channels on different axes: nothing to line up
        what = "concatenates tensors whose channels lie on different axes"
        for v, _ in chans[1:]:
            prop.protect(v.segs, f"{where(node)} {what}")
        return keep_whole(prop, node, chans[0][0], node.meta["mdp_shape"][axis], what)
    if axis == dim:
        return Chan(dim, tuple(s for v, sh in zip(vals, shapes, strict=True)
                               for s in _cat_part(prop, node, v, sh, dim)))
    return _tie_inputs(prop, node, vals, chans[0][0])


def _tie_inputs(prop: Propagation, node: fx.Node, vals: list[Any], first: Chan) -> Chan:
    """Inputs joined along another axis than their channels' (``cat``, ``stack``): the same channels in all."""
    for v in vals:
        if isinstance(v, Chan):
            if v is not first:
                prop.unify(first.segs, v.segs, node)
        elif isinstance(v, ParamRef) and v.axes[first.axis] is not None:
            prop.bind(v.tensor, v.axes[first.axis], first.segs, node, "param")
        else:  # a tensor made in the code (its width a literal): keep the channels whole
            prop.protect(first.segs, f"{where(node)} joins channels with a tensor mdprune cannot follow")
    return first


def _stack(prop: Propagation, node: fx.Node) -> Any:
    """``torch.stack(tensors, dim)``: a new axis at ``dim``; every input holds the same channels (CrossViT's
    heads averaged over branches)."""
    tensors = _arg(node, 0, "tensors")
    items = several_items(prop, tensors)
    vals, shapes = items if items is not None else ([prop.value(t) for t in tensors], [_shape(t) for t in tensors])
    dim = _arg(node, 1, "dim", 0) % (len(shapes[0]) + 1)
    chans = [v for v in vals if isinstance(v, Chan)]
    if not chans:
        if any(isinstance(v, ParamRef) for v in vals):
            raise AnalysisError(f"{where(node)} stacks parameters; not supported")
        return None
    axis = chans[0].axis
    if any(v.axis != axis for v in chans):
        raise AnalysisError(f"{where(node)} stacks tensors whose channels lie on different axes")
    return _tie_inputs(prop, node, vals, chans[0]).moved(axis + (1 if dim <= axis else 0))


def _cat_part(prop: Propagation, node: fx.Node, v: Any, shape: tuple[int, ...], dim: int) -> tuple[RawSeg, ...]:
    """The segments one input adds to a concatenation along channels (a new space for a channel-free input)."""
    if isinstance(v, Chan):
        return v.segs
    if isinstance(v, ParamRef) and v.axes[dim] is not None:  # a parameter's own channels: a dimension of its own
        sid = prop.new_space(shape[dim], "channel", f"{v.tensor}")
        prop.bind(v.tensor, v.axes[dim], (RawSeg((sid,)),), node, "param")
        return (RawSeg((sid,)),)
    reason = f"{where(node)} concatenates channels made in the code (their number is a literal)"
    return (RawSeg((prop.new_space(shape[dim], "channel", node.name, protected=reason),)),)


def _flatten(prop: Propagation, node: fx.Node) -> Any:
    return flatten_value(prop, node, node.args[0], _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))


def _shape_args(node: fx.Node) -> list[Any]:
    if node.target in ("reshape_as", "view_as"):
        return []  # the shape comes from another tensor: no literal to patch
    rest = list(node.args[1:]) or [node.kwargs.get("shape", node.kwargs.get("size"))]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        return list(rest[0])
    return rest


def _groups(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair the non-1 axes of shapes ``a`` and ``b`` into groups with equal products (a reshape's map)."""
    ia = [i for i, s in enumerate(a) if s != 1]
    ib = [i for i, s in enumerate(b) if s != 1]
    groups, i, j = [], 0, 0
    while i < len(ia) and j < len(ib):
        ga, gb, pa, pb = [ia[i]], [ib[j]], a[ia[i]], b[ib[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                ga.append(ia[i])
                pa *= a[ia[i]]
                i += 1
            else:
                gb.append(ib[j])
                pb *= b[ib[j]]
                j += 1
        groups.append((ga, gb))
    return groups


def _reshape(prop: Propagation, node: fx.Node) -> Any:
    v, src = prop.value(node.args[0]), _shape(node.args[0])
    out = node.meta.get("mdp_shape")
    if not isinstance(v, (Chan, ParamRef)):
        return None
    groups = _groups(src, out)
    if isinstance(v, ParamRef):
        axes: list[int | None] = [None] * len(out)
        literal = _shape_args(node)
        for ga, gb in groups:
            if all(v.axes[i] is None for i in ga):  # axes the parameter does not own (a gathered table's rows)
                continue
            if len(ga) != 1 or len(gb) != 1:
                raise AnalysisError(f"{where(node)} reshapes parameter {v.tensor} across axes; not supported")
            axes[gb[0]] = v.axes[ga[0]]
            if v.axes[ga[0]] is not None and len(literal) == len(out) and literal[gb[0]] == out[gb[0]] != 1:
                prop.param_patches.append((node, gb[0], v.tensor, v.axes[ga[0]]))  # scale.view(320, 1, 1)
        return ParamRef(v.tensor, tuple(axes))
    if src[v.axis] == 1:  # one channel (a detector's centre-ness map): kept, and no channel axis after
        prop.protect(v.segs, f"{where(node)} reshapes a single-channel axis")
        return None
    ga, gb = next((ga, gb) for ga, gb in groups if v.axis in ga)
    new = reshape_channels(prop, node, v, src, out, ga, gb, _shape_args(node), _statistics(node))
    if node.target in ("reshape_as", "view_as"):
        sized_like(prop, node, prop.value(node.args[1]), new)
    return new


def _integer_index(node: fx.Node, index: Any, src: tuple[int, ...]) -> bool:
    """Whether ``index`` picks along one axis (integer indices, or a 1-d mask): the output then has the
    index's axes in place of that one. A mask over several axes consumes them all: not followed."""
    shape = index.meta.get("mdp_shape") if isinstance(index, fx.Node) else None
    rank = len(shape) if isinstance(shape, tuple) else (1 if isinstance(index, list) else None)
    out = node.meta.get("mdp_shape")
    return rank is not None and isinstance(out, tuple) and len(out) == len(src) - 1 + rank


def _gather_param(prop: Propagation, node: fx.Node, v: ParamRef, axis: int) -> ParamRef:
    """``table[:, index]``: a parameter's entries picked along ``axis`` by an index tensor (a relative position
    bias table). The picked axis becomes the index's axes, which carry no channels; the table's other axes
    follow as before, and the picked one is kept whole."""
    out = node.meta["mdp_shape"]
    new = len(out) - (len(v.axes) - 1)
    prop.unpruned_params.append((v.tensor, node, v.axes[axis]))
    return ParamRef(v.tensor, v.axes[:axis] + (None,) * new + v.axes[axis + 1:])


def _permute_value(v: Any, order: list[int]) -> Any:
    if isinstance(v, Chan):
        return v.moved(order.index(v.axis))
    if isinstance(v, ParamRef):
        return ParamRef(v.tensor, tuple(v.axes[i] for i in order))
    return None


def _transpose(prop: Propagation, node: fx.Node) -> Any:
    src = _shape(node.args[0])
    if src is None:
        return None
    n = len(src)
    d0, d1 = _arg(node, 1, "dim0") % n, _arg(node, 2, "dim1") % n
    order = list(range(n))
    order[d0], order[d1] = order[d1], order[d0]
    return _permute_value(prop.value(node.args[0]), order)


def _permute(prop: Propagation, node: fx.Node) -> Any:
    src = _shape(node.args[0])
    dims = node.args[1:] if len(node.args) > 2 or isinstance(node.args[1], int) else node.args[1]
    dims = dims or node.kwargs.get("dims")
    return _permute_value(prop.value(node.args[0]), [d % len(src) for d in dims])


def _unsqueeze(prop: Propagation, node: fx.Node) -> Any:
    v, out = prop.value(node.args[0]), node.meta["mdp_shape"]
    d = _arg(node, 1, "dim") % len(out)
    if isinstance(v, Chan):
        return v.moved(v.axis + (1 if d <= v.axis else 0))
    if isinstance(v, ParamRef):
        return ParamRef(v.tensor, v.axes[:d] + (None,) + v.axes[d:])
    return None


def _squeeze(prop: Propagation, node: fx.Node) -> Any:
    v, src = prop.value(node.args[0]), _shape(node.args[0])
    if not isinstance(v, (Chan, ParamRef)):
        return None
    dims = _arg(node, 1, "dim")
    gone = [i for i in _norm_dims(dims, len(src)) if src[i] == 1]
    if isinstance(v, Chan):
        if v.axis in gone:
            raise AnalysisError(f"{where(node)} squeezes the channel axis")
        return v.moved(v.axis - sum(1 for g in gone if g < v.axis))
    return ParamRef(v.tensor, tuple(a for i, a in enumerate(v.axes) if i not in gone))


def _expand(prop: Propagation, node: fx.Node) -> Any:
    v, src, out = prop.value(node.args[0]), _shape(node.args[0]), node.meta["mdp_shape"]
    lead = len(out) - len(src)
    if isinstance(v, Chan):
        return v.moved(v.axis + lead)
    if isinstance(v, ParamRef):
        return ParamRef(v.tensor, (None,) * lead + v.axes)
    return None


def _getitem(prop: Propagation, node: fx.Node) -> Any:
    base, idx = node.args
    v = prop.value(base)
    if isinstance(v, Several):
        return Several(tuple(v.items[idx])) if isinstance(idx, slice) else v.items[idx]
    if not isinstance(v, (Chan, ParamRef)):
        return None
    src = _shape(base)
    idx = idx if isinstance(idx, tuple) else (idx,)
    tensors = [k for k, i in enumerate(idx) if isinstance(i, (fx.Node, torch.Tensor, list))]
    simple = len(tensors) == 1 and Ellipsis not in idx and all(
        i == slice(None) for k, i in enumerate(idx) if k != tensors[0]) and _integer_index(node, idx[tensors[0]], src)
    if simple and isinstance(v, ParamRef):
        return _gather_param(prop, node, v, tensors[0])
    if simple and isinstance(v, Chan) and tensors[0] != v.axis and len(idx) <= len(src):
        added = len(node.meta["mdp_shape"]) - len(src)  # the index's axes replace the one it picks along
        return v.moved(v.axis if v.axis < tensors[0] else v.axis + added)
    if tensors:
        raise AnalysisError(f"{where(node)} indexes channels with a tensor; not supported")
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in idx:
        if i is Ellipsis:
            expanded += [slice(None)] * (len(src) - n_real)
        else:
            expanded.append(i)
    expanded += [slice(None)] * (len(src) - sum(1 for i in expanded if i is not None))
    axes_out: list[int | None] = []  # for each output axis: the source axis (None: added)
    k, cut = 0, None
    for i in expanded:
        if i is None:
            axes_out.append(None)
            continue
        if isinstance(i, slice):
            axes_out.append(k)
            if isinstance(v, Chan) and k == v.axis and i != slice(None):
                cut = i
        elif isinstance(v, Chan) and k == v.axis:
            prop.protect(v.segs, f"{where(node)} picks single channels")
            return None
        k += 1
    if isinstance(v, ParamRef):
        return ParamRef(v.tensor, tuple(None if a is None else v.axes[a] for a in axes_out))
    axis = axes_out.index(v.axis)
    if cut is None:
        return v.moved(axis)
    if not all(isinstance(b, (int, type(None))) for b in (cut.start, cut.stop, cut.step)):
        return keep_whole(prop, node, v.moved(axis), node.meta["mdp_shape"][axis], "slices channels at computed "
                          "positions")
    start, stop, step = cut.indices(src[v.axis])
    if (start, stop, step) == (0, src[v.axis], 1):
        return v.moved(axis)
    if step != 1 or any(i is not cut and i != slice(None) for i in expanded):  # more than a channel range
        return keep_whole(prop, node, v.moved(axis), node.meta["mdp_shape"][axis], "slices channels with a step "
                          "or along with other axes")
    return slice_channels(prop, node, v, src[v.axis], start, max(start, stop))


def _reduced_dims(node: fx.Node, rank: int) -> list[int]:
    """The axes a reduction node (``mean``, ``var``, ``norm``, ...) reduces over its input of ``rank`` axes."""
    name = op_name(node)
    dim = _arg(node, 2 if name == "norm" else 1, "dim")
    if name == "norm" and not isinstance(dim, (int, tuple, list)):
        dim = None
    return _norm_dims(dim, rank)


def _statistics(node: fx.Node, depth: int = 3) -> list[set[int]]:
    """The axes that the reductions reading ``node`` reduce, directly or through up to ``depth`` element-wise
    ops and casts (``x.float().var((2, 3, 4))``): where a reshape's statistics are taken."""
    shape, found, todo = node.meta.get("mdp_shape"), [], [(node, 0)]
    if not isinstance(shape, tuple):
        return []
    while todo:
        n, d = todo.pop()
        for u in n.users:
            if u.op not in ("call_function", "call_method") or u.args[:1] != (n,):
                continue
            if op_name(u) in REDUCE:
                found.append(set(_reduced_dims(u, len(shape))))
            elif d < depth and u.meta.get("mdp_shape") == shape and op_name(u) in UNARY | BINARY:
                todo.append((u, d + 1))
    return found


def _reduce(prop: Propagation, node: fx.Node) -> Any:
    """A reduction (``mean``, ``var``, ...). Over other axes the channels stay; over the channels (a norm written
    out, a channel sum) they are kept whole: the statistic then stays the dense one."""
    v, src = prop.value(node.args[0]), _shape(node.args[0])
    if not isinstance(v, (Chan, ParamRef)) or not isinstance(src, tuple):
        return None
    name = op_name(node)
    dims = _reduced_dims(node, len(src))
    keep = _arg(node, _KEEPDIM_AT.get(name, 2), "keepdim", False)
    if isinstance(v, ParamRef):  # its reduced axes are kept whole; the others still index it
        for d in dims:
            if v.axes[d] is not None:
                prop.unpruned_params.append((v.tensor, node, v.axes[d]))
        if all(a is None for i, a in enumerate(v.axes) if i not in dims):
            return None
        return ParamRef(v.tensor, tuple(None if i in dims else a for i, a in enumerate(v.axes) if keep
                                        or i not in dims))
    if v.axis in dims:
        prop.protect(v.segs, f"{where(node)} reduces over them")
        return None
    return v if keep else v.moved(v.axis - sum(1 for d in dims if d < v.axis))


def _max_min(prop: Propagation, node: fx.Node) -> Any:
    """``x.max(dim)`` / ``min``: values and indices, reduced like ``amax``; ``x.max()`` a scalar; ``max(x, y)``
    element-wise."""
    other = _arg(node, 1, "dim")
    if isinstance(other, fx.Node) and isinstance(other.meta.get("mdp_shape"), tuple):
        return _binary(prop, node)
    v = _reduce(prop, node)
    if other is None and "dim" not in node.kwargs:
        return v
    return Several((v, v))


def _pad(prop: Propagation, node: fx.Node) -> Any:
    """``F.pad``: channels unchanged unless their axis is padded; padding them adds kept-whole channels."""
    v, src, out = prop.value(node.args[0]), _shape(node.args[0]), node.meta.get("mdp_shape")
    if isinstance(v, ParamRef):
        raise AnalysisError(f"{where(node)} pads parameter {v.tensor}; not supported")
    if not isinstance(v, Chan):
        return None
    pad, mode = _arg(node, 1, "pad"), _arg(node, 2, "mode", "constant")
    k = 2 * (len(src) - 1 - v.axis)  # the channel axis's (before, after) pair, counted from the last axis
    pair = tuple(pad[k:k + 2]) if isinstance(pad, (tuple, list)) else None
    if pair is not None and (len(pair) < 2 or pair == (0, 0)):
        return v
    if pair is None or not all(isinstance(p, int) and p >= 0 for p in pair) or mode != "constant":
        return keep_whole(prop, node, v, out[v.axis], "pads the channel axis")
    reason = f"{where(node)} pads channels (the padding is a literal width)"
    extra = [(RawSeg((prop.new_space(n, "channel", f"{node.name}:pad", protected=reason),)),) if n else ()
             for n in pair]
    return Chan(v.axis, extra[0] + v.segs + extra[1])


def _roll(prop: Propagation, node: fx.Node) -> Any:
    """``torch.roll``: channels unchanged when rolled along other axes only."""
    v, src = prop.value(node.args[0]), _shape(node.args[0])
    if isinstance(v, ParamRef):
        raise AnalysisError(f"{where(node)} rolls parameter {v.tensor}; not supported")
    if not isinstance(v, Chan):
        return None
    dims = _arg(node, 2, "dims")
    if dims is None or (isinstance(dims, (tuple, list)) and not dims):
        return keep_whole(prop, node, v, src[v.axis], "rolls the flattened tensor, channels included")
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not all(isinstance(d, int) for d in dims):
        return keep_whole(prop, node, v, src[v.axis], "rolls along computed axes")
    if v.axis in [d % len(src) for d in dims]:
        return keep_whole(prop, node, v, src[v.axis], "rolls the channels")
    return v


def _spatial(prop: Propagation, node: fx.Node) -> Any:
    v = prop.value(node.args[0])
    if isinstance(v, ParamRef) and len(v.axes) == 4:  # pooled or resized positions are no longer its entries
        return ParamRef(v.tensor, v.axes[:2] + (None, None))
    rank, shape = {"2d": 4, "3d": 5}.get(op_name(node)[-2:]), _shape(node.args[0])  # (interpolate: any rank)
    if isinstance(v, Chan) and (v.axis != 1 or len(shape) < 3 or (rank is not None and len(shape) != rank)):
        raise AnalysisError(f"{where(node)} expects channels on axis 1 (NCHW, NCTHW)")
    return v


def _normalize(prop: Propagation, node: fx.Node) -> Any:
    """``F.normalize``: a p-norm (p > 0) over the channels is blind to zeroed channels, so pruning them is exact
    (SSD's L2Norm); over other axes each channel is normalised alone."""
    p, v = _arg(node, 1, "p", 2.0), prop.value(node.args[0])
    if isinstance(p, (int, float)) and p > 0 and not isinstance(v, ParamRef):
        return v
    return elementwise_along(prop, node, node.args[0], _arg(node, 2, "dim", 1))


def _softmax(prop: Propagation, node: fx.Node) -> Any:
    return elementwise_along(prop, node, node.args[0], _arg(node, 1, "dim"))


# ---- attention written out: q @ k.transpose(-2, -1), softmax, @ v; F.scaled_dot_product_attention ----------------
# The per-head widths are channels (a reshape into heads ties the heads' columns): q and k are contracted over the
# same q/k columns (pruned alike, the product is unchanged), and the values' columns pass to the output. Heads
# are kept; the softmax scale written in the code (or made explicit for scaled_dot_product_attention) stays the
# dense one, as MDP prescribes.

def _matmul(prop: Propagation, node: fx.Node) -> Any:
    a, b = node.args[0], _arg(node, 1, "other")
    va, vb, sa, sb = prop.value(a), prop.value(b), _shape(a), _shape(b)
    if isinstance(va, ParamRef) or isinstance(vb, ParamRef):
        if isinstance(va, Chan) or isinstance(vb, Chan):
            return _by_parameter(prop, node, va, vb, sa, sb)
        if _bound_somewhere(prop, va, vb):
            return _fail(node, "multiplies a parameter bound to channels by another")
        for v in (va, vb):  # a product without channels (Gemma 4's one-hot position lookup): its parameters
            if isinstance(v, ParamRef):  # stay whole, and its cost is a fixed op
                prop.unpruned_params.append((v.tensor, node, None))
        if isinstance(sa, tuple) and isinstance(sb, tuple) and len(sa) >= 2 and len(sb) >= 2:
            _fixed_matmul(prop, node, sa, sb, node.meta["mdp_shape"])
        return None
    if not isinstance(sa, tuple) or not isinstance(sb, tuple) or len(sa) < 2 or len(sb) < 2:
        return None if not (isinstance(va, Chan) or isinstance(vb, Chan)) else _fail(node, "multiplies a vector")
    fa = len(sa) - va.axis if isinstance(va, Chan) else 0  # 1: contracted, 2: rows, more: a batch axis
    fb = len(sb) - vb.axis if isinstance(vb, Chan) else 0  # 2: contracted, 1: columns, more: a batch axis
    out = node.meta["mdp_shape"]

    def whole(v: Chan, what: str) -> None:  # what cannot be followed is kept whole, exactly
        prop.protect(v.segs, f"{where(node)} {what}")

    batched = _batched_over_channels(prop, node, va, vb, fa, fb, sa, sb, out)
    if batched is not None:
        return batched
    if fa > 2:
        whole(va, "multiplies matrices batched over them")
        fa = 0
    if fb > 2:
        whole(vb, "multiplies matrices batched over them")
        fb = 0
    if (fa == 1) != (fb == 2):  # channels contracted with what is not channels
        whole(va if fa == 1 else vb, "contracts them with a tensor whose entries are not channels")
        fa, fb = (0, fb) if fa == 1 else (fa, 0)
    if fa == 1:
        prop.unify(va.segs, vb.segs, node)
        prop.contractions[node.name] = (va.segs, sa)
        _matmul_op(prop, node, va.segs, sa, sb, out, a_axis=-1, b_axis=-2)
        return None
    if fa and fb:  # a matrix of channels by channels (cross-covariance attention)
        whole(va, "makes a matrix of channels by channels")
        whole(vb, "makes a matrix of channels by channels")
        fb = 0
    if fb == 1:
        if not _attention_core(prop, node, a, vb.segs, sb):
            _matmul_op(prop, node, vb.segs, sa, sb, out, b_axis=-1, out_axis=-1)
        return Chan(len(out) - 1, vb.segs)
    if fa == 2:
        _matmul_op(prop, node, va.segs, sa, sb, out, a_axis=-2, out_axis=-2)
        return Chan(len(out) - 2, va.segs)
    _fixed_matmul(prop, node, sa, sb, out)
    return None


def _fixed_matmul(prop: Propagation, node: fx.Node, sa: tuple[int, ...], sb: tuple[int, ...],
                  out: tuple[int, ...]) -> None:
    """A product without channels: its latency op and MACs, at a width that never changes."""
    width = prop.new_space(sa[-1], "channel", f"{node.name}:k", protected=f"{where(node)}: a product without "
                           "channels")
    _matmul_op(prop, node, (RawSeg((width,)),), sa, sb, out, a_axis=-1, b_axis=-2)


def _batched_over_channels(prop: Propagation, node: fx.Node, va: Any, vb: Any, fa: int, fb: int,
                           sa: tuple[int, ...], sb: tuple[int, ...], out: tuple[int, ...]) -> Chan | None:
    """Channels on a batch axis only (one matrix product per channel, BAT's per-channel transforms): they pass
    through, tied to the other operand's channels on the same axis, or broadcast against its size 1 there.
    None when that is not the case (the caller keeps them whole)."""
    if not (fa > 2 or fb > 2) or 0 < fa <= 2 or 0 < fb <= 2 or (fa > 2 and fb > 2 and fa != fb):
        return None
    f = max(fa, fb)
    if fa > 2 and fb > 2:
        prop.unify(va.segs, vb.segs, node)
    else:
        other = sb if fa > 2 else sa  # no channels: it must broadcast along theirs
        if len(other) >= f and other[-f] != 1:
            return None
    segs = va.segs if fa > 2 else vb.segs
    _matmul_op(prop, node, segs, sa, sb, out, a_axis=-fa if fa > 2 else None, b_axis=-fb if fb > 2 else None,
               out_axis=-f)
    return Chan(len(out) - f, segs)


def _by_parameter(prop: Propagation, node: fx.Node, va: Any, vb: Any, sa: Any, sb: Any) -> Any:
    """A written-out linear map: channels times a parameter (SwiftFormer's ``q @ self.w_g``, BoTNet's relative
    logits ``q @ rel.T``). Channels contracted with the parameter bind its axis; its other axis is kept whole
    and the product has no channels. Channels on the other axis pass through (a parameter mixing tokens)."""
    x, sx, left = (va, sa, True) if isinstance(va, Chan) else (vb, sb, False)
    w, sw = (vb, sb) if left else (va, sa)
    out = node.meta["mdp_shape"]
    if not isinstance(sx, tuple) or not isinstance(sw, tuple) or len(sx) < 2 or len(sw) < 2:
        return _fail(node, "multiplies channels by a parameter vector")
    place = len(sx) - x.axis  # left: 1 contracted, 2 rows; right: 2 contracted, 1 columns
    if place > 2:
        return _fail(node, "multiplies matrices batched over channels by a parameter")
    if (place == 1) == left:  # contracted with the parameter's axis
        axis = w.axes[len(sw) - 2] if left else w.axes[len(sw) - 1]
        if axis is None:
            return _fail(node, "contracts channels with a parameter's broadcast axis")
        prop.bind(w.tensor, axis, x.segs, node, "in")
        other = w.axes[len(sw) - 1] if left else w.axes[len(sw) - 2]
        prop.unpruned_params.append((w.tensor, node, other))  # its other axis: kept whole wherever it is bound
        _matmul_op(prop, node, x.segs, sa, sb, out, a_axis=-1, b_axis=-2)
        return None
    for ax in w.axes:  # the parameter only mixes what is not channels
        if ax is not None:
            prop.unpruned_params.append((w.tensor, node, ax))
    _matmul_op(prop, node, x.segs, sa, sb, out, **({"a_axis": -2, "out_axis": -2} if left
                                                    else {"b_axis": -1, "out_axis": -1}))
    return Chan(len(out) - place, x.segs)


def _matmul_op(prop: Propagation, node: fx.Node, segs: tuple[RawSeg, ...], sa: tuple[int, ...],
               sb: tuple[int, ...], out: tuple[int, ...], a_axis: int | None = None, b_axis: int | None = None,
               out_axis: int | None = None) -> None:
    """A written-out product's latency op and MACs, the width ``segs`` at the axes named (-1 in the shapes)."""
    def tpl(shape: tuple[int, ...], axis: int | None) -> list[int]:
        s = list(shape)
        if axis is not None:
            s[axis] = -1
        return s
    per_image = bool(prop.batch) and sa[0] % prop.batch == 0 and len(sa) > 2 and len(out) > 2
    fixed = {"a": tpl(sa, a_axis), "b": tpl(sb, b_axis), "out": tpl(out, out_axis),
             "k": -1 if a_axis == -1 else sa[-1], "per_image": per_image, "batch": prop.batch}
    prop.add_op(node.name, "matmul", {"width": segs}, fixed, node)


def _bound_somewhere(prop: Propagation, *values: Any) -> bool:
    return any(isinstance(v, ParamRef) and any(ax in prop.bindings.get(v.tensor, {}) for ax in v.axes
                                               if ax is not None) for v in values)


def _attention_core(prop: Propagation, node: fx.Node, probs: Any, v_segs: tuple[RawSeg, ...],
                    v_shape: tuple[int, ...]) -> bool:
    """``probs @ v`` where ``probs`` comes (through softmax, scaling, dropout, a bias) from a q @ k^T product:
    the attention op of the latency tables, at the query and key counts and heads of this call."""
    seen, n = probs, 0
    while isinstance(seen, fx.Node) and seen.name not in prop.contractions and n < 8:
        seen = next((x for x in seen.all_input_nodes if x.meta.get("mdp_shape") == seen.meta.get("mdp_shape")),
                    None)
        n += 1
    if not isinstance(seen, fx.Node) or seen.name not in prop.contractions:
        return False
    qk, q_shape = prop.contractions[seen.name]
    prop.ops = [o for o in prop.ops if not (o.name == seen.name and o.kind == "matmul")]  # in the core's op
    _core_op(prop, node, qk, v_segs, q_shape, v_shape, bias=n > 0 and _has_add(probs, seen))
    return True


def _has_add(end: fx.Node, start: fx.Node) -> bool:
    node = end
    while node is not start and isinstance(node, fx.Node):
        if op_name(node) in ("add", "iadd", "add_"):
            return True
        node = node.args[0] if node.args else None
    return False


def _core_op(prop: Propagation, node: fx.Node, qk: tuple[RawSeg, ...], v: tuple[RawSeg, ...],
             q_shape: tuple[int, ...], kv_shape: tuple[int, ...], bias: bool) -> None:
    heads = q_shape[-3] if len(q_shape) >= 3 else 1
    rows = math.prod(q_shape[:-3]) if len(q_shape) > 3 else (q_shape[0] if len(q_shape) == 3 else 1)
    if len(q_shape) == 3:  # (batch x heads, tokens, width): heads folded into the batch
        heads, rows = 1, q_shape[0]
    fixed: dict[str, Any] = {"tokens": q_shape[-2], "tokens_kv": kv_shape[-2], "batch": rows}
    if prop.batch and rows != prop.batch and rows % prop.batch == 0:
        fixed["windows"] = rows // prop.batch
    if bias:
        fixed["bias"] = True
    for segs, kind in ((qk, "qk"), (v, "v")):  # their pruning steps and importance criteria: attention's
        for sid in {prop.find(i) for seg in segs for i in seg.spaces}:
            if prop.spaces[sid].kind in ("mlp", "linear", "channel"):
                prop.spaces[sid].kind = kind
    h = prop.new_space(heads, "heads", f"{node.name}:heads", protected=f"{where(node)}: heads of attention "
                       "written out (kept)")
    prop.add_op(node.name, "attention", {"heads": (RawSeg((h,)),), "qk": qk, "v": v}, fixed, node)


def _sdpa(prop: Propagation, node: fx.Node) -> Any:
    """``F.scaled_dot_product_attention(q, k, v)``: q and k contracted over the same columns, v's to the output;
    the default scale ``1 / sqrt(q width)`` is written into the call, so the slim model keeps the dense one."""
    q, k, v = node.args[0], _arg(node, 1, "key"), _arg(node, 2, "value")
    vals = [prop.value(t) for t in (q, k, v)]
    if not any(isinstance(x, Chan) for x in vals):
        return None
    shapes = [_shape(t) for t in (q, k, v)]
    if not all(isinstance(x, Chan) and x.axis == len(s) - 1 for x, s in zip(vals, shapes, strict=True)):
        return _fail(node, "attends with channels on other axes than q's, k's and v's last")
    mask = prop.value(_arg(node, 3, "attn_mask"))
    if isinstance(mask, Chan):  # a bias computed per head by a layer (a position MLP's outputs): kept whole
        prop.protect(mask.segs, f"{where(node)} adds them to attention scores")
    if isinstance(mask, ParamRef):  # learnt attention biases passed as the mask: kept whole
        prop.unpruned_params.append((mask.tensor, node, None))
    prop.unify(vals[0].segs, vals[1].segs, node)
    dense_scale = shapes[0][-1] ** -0.5
    if len(node.args) > 6 and node.args[6] is None:
        node.args = (*node.args[:6], dense_scale, *node.args[7:])
        prop.gm.recompile()
    elif len(node.args) <= 6 and node.kwargs.get("scale") is None:
        node.kwargs = {**node.kwargs, "scale": dense_scale}
        prop.gm.recompile()
    _core_op(prop, node, vals[0].segs, vals[2].segs, shapes[0], shapes[1],
             bias=_arg(node, 3, "attn_mask") is not None)
    return Chan(len(node.meta["mdp_shape"]) - 1, vals[2].segs)


def _repeat(prop: Propagation, node: fx.Node) -> Any:
    """``x.repeat(*sizes)`` and ``x.tile(sizes)``: channels unchanged where their axis is not repeated (new
    leading axes shift it). A parameter repeated along an axis of its own (a window's position embedding tiled
    over the windows) keeps that axis whole."""
    v, src = prop.value(node.args[0]), _shape(node.args[0])
    sizes = list(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) \
        else list(node.args[1:])
    if op_name(node) == "tile" and src is not None and len(sizes) < len(src):  # tile pads its sizes with 1s
        sizes = [1] * (len(src) - len(sizes)) + sizes
    if isinstance(v, ParamRef):
        axes = list(v.axes)
        for k, (n, a, width) in enumerate(zip(sizes[len(sizes) - len(v.axes):], v.axes, src or (), strict=False)):
            if n != 1 and a is not None and width != 1:
                prop.unpruned_params.append((v.tensor, node, a))
                axes[k] = None
        return ParamRef(v.tensor, (None,) * (len(sizes) - len(v.axes)) + tuple(axes))
    if not isinstance(v, Chan) or src is None:
        return None
    lead = len(sizes) - len(src)
    axis = v.axis + lead
    if sizes[axis] != 1:
        return keep_whole(prop, node, v.moved(axis), node.meta["mdp_shape"][axis], "repeats the channel axis")
    return v.moved(axis)


def _repeat_interleave(prop: Propagation, node: fx.Node) -> Any:
    """``x.repeat_interleave(n, dim)``: channels unchanged unless their axis is the one repeated."""
    v, src = prop.value(node.args[0]), _shape(node.args[0])
    dim = _arg(node, 2, "dim")
    if isinstance(v, ParamRef):
        return _fail(node, f"repeats parameter {v.tensor}")
    if not isinstance(v, Chan) or src is None:
        return None
    if dim is None or dim % len(src) == v.axis:
        out = node.meta["mdp_shape"]
        axis = v.axis if dim is not None else 0
        return keep_whole(prop, node, v.moved(axis), out[axis], "repeats the channel axis")
    return v


def _fold(prop: Propagation, node: fx.Node) -> Any:
    """``F.fold``, the inverse of unfold: (N, C x kh x kw, L) -> (N, C, H, W); channels widened by the patch
    come back narrowed by it, others are kept whole."""
    v = prop.value(node.args[0])
    if not isinstance(v, Chan):
        return None if not isinstance(v, ParamRef) else _fail(node, "folds a parameter")
    k = _arg(node, 2, "kernel_size")
    k = math.prod(k) if isinstance(k, (tuple, list)) else k * k
    out = node.meta["mdp_shape"]
    if v.axis != 1 or not all(s.inner % k == 0 for s in v.segs):
        return keep_whole(prop, node, v, out[1], "folds patches of channels it cannot separate")
    return Chan(1, tuple(RawSeg(s.spaces, s.inner // k) for s in v.segs))


def _unfold(prop: Propagation, node: fx.Node) -> Any:
    """``x.unfold(dim, size, step)`` (sliding windows along ``dim``, appended as a last axis; HaloNet's
    neighbourhoods): channels stay on their axis unless they are the windowed one. ``F.unfold`` (im2col, a
    function of the same name): channel-major patches, each channel widened by its patch, as ``nn.Unfold``."""
    v, src = prop.value(node.args[0]), _shape(node.args[0])
    if isinstance(v, ParamRef):
        return _fail(node, "unfolds a parameter")
    if not isinstance(v, Chan):
        return None
    out = node.meta["mdp_shape"]
    if node.op == "call_function":  # F.unfold(input, kernel_size, ...)
        k = _arg(node, 1, "kernel_size")
        if v.axis != 1 or not isinstance(k, (int, tuple, list)):
            return keep_whole(prop, node, v, out[1], "unfolds patches it cannot follow")
        return v.widened(math.prod(k) if isinstance(k, (tuple, list)) else k * k)
    dim = _arg(node, 1, "dimension")
    if not isinstance(dim, int):
        return keep_whole(prop, node, v, out[v.axis], "unfolds along a computed axis")
    if dim % len(src) == v.axis:
        return keep_whole(prop, node, v, out[v.axis], "unfolds the channels into windows")
    return v


def _setitem(prop: Propagation, node: fx.Node) -> Any:
    """``x[index] = value`` on a tensor without channels (ConViT's relative position indices, written from
    constants): nothing to follow. Writing into channels or writing channels somewhere is not supported."""
    target, _, value = node.args
    if isinstance(prop.value(target), (Chan, Several)) or isinstance(prop.value(value), (Chan, Several)):
        return _fail(node, "assigns into a tensor's items where channels are involved")
    return None


def _fail(node: fx.Node, what: str) -> Any:
    raise AnalysisError(f"{where(node)} {what}; not supported")


_RULES: dict[str, Callable[[Propagation, fx.Node], Any]] = {
    **dict.fromkeys(BINARY, _binary),
    **dict.fromkeys(SPATIAL, _spatial),
    **dict.fromkeys(REDUCE, _reduce),
    "max": _max_min,
    "min": _max_min,
    "cat": _cat,
    "stack": _stack,
    "addcmul": _addcmul,
    "addcdiv": _addcmul,
    "flatten": _flatten,
    "reshape": _reshape,
    "reshape_as": _reshape,
    "view": _reshape,
    "view_as": _reshape,
    "pad": _pad,
    "roll": _roll,
    "transpose": _transpose,
    "swapaxes": _transpose,
    "permute": _permute,
    "unsqueeze": _unsqueeze,
    "squeeze": _squeeze,
    "expand": _expand,
    "expand_as": _expand,
    "getitem": _getitem,
    "setitem": _setitem,
    "softmax": _softmax,
    "normalize": _normalize,
    "repeat": _repeat,
    "tile": _repeat,
    "fold": _fold,
    "unfold": _unfold,
    "repeat_interleave": _repeat_interleave,
    "matmul": _matmul,
    "bmm": _matmul,
    "scaled_dot_product_attention": _sdpa,
    "log_softmax": _softmax,
}
_RULES.update(SPLIT_RULES)
_RULES.update(CONV_RULES)
_RULES.update(EINSUM_RULES)


# ---- norms called as functions (inside a norm module mdprune traces into) -------------------------------------

# argument names of the norm functions, in order (torch.batch_norm orders its tensors unlike F.batch_norm)
_NORM_ARGS: dict[Any, tuple[str, ...]] = {
    F.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps"),
    torch.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps", "cudnn_enable"),
    **({F.rms_norm: ("input", "normalized_shape", "weight", "eps"),
        torch.rms_norm: ("input", "normalized_shape", "weight", "eps")} if hasattr(F, "rms_norm") else {}),
    F.group_norm: ("input", "num_groups", "weight", "bias", "eps"),
    torch.group_norm: ("input", "num_groups", "weight", "bias", "eps", "cudnn_enabled"),
    F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    torch.batch_norm: ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
                       "cudnn_enabled"),
}


def _norm_args(prop: Propagation, node: fx.Node) -> dict[str, Any] | None:
    """The norm call's arguments by name, its first two made positional (so a literal can be patched);
    None for a function of that name mdprune does not know."""
    names = _NORM_ARGS.get(node.target)
    if names is None:
        unknown(prop, node)
        return None
    args = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    if len(node.args) < 2:
        node.args = (args[names[0]], args[names[1]])
        node.kwargs = {k: v for k, v in node.kwargs.items() if k not in names[:2]}
    return args


def _bind_param(prop: Propagation, node: fx.Node, arg: Any, segs: tuple[RawSeg, ...], role: str) -> None:
    """Bind a norm's per-channel tensor argument (a parameter or buffer, maybe cast) to the channels ``segs``."""
    if arg is None:
        return
    v = prop.value(arg)
    if not isinstance(v, ParamRef) or len(v.axes) != 1 or v.axes[0] is None:
        raise AnalysisError(f"{where(node)} takes a per-channel tensor ({getattr(arg, 'name', arg)}) that is not "
                            "a parameter or buffer of the model; not supported")
    prop.bind(v.tensor, v.axes[0], segs, node, role)


def _norm_input(prop: Propagation, node: fx.Node, a: dict[str, Any], axis: int) -> Chan | None:
    v = prop.value(a["input"])
    if isinstance(v, Chan):
        if v.axis != axis % len(_shape(a["input"])):
            raise AnalysisError(f"{where(node)} expects channels on axis {axis}, but they are on axis {v.axis}")
        return v
    if v is not None or _touches_channels(prop, node):
        raise AnalysisError(f"{where(node)} normalises a tensor mdprune cannot follow")
    return None


def _layer_norm(prop: Propagation, node: fx.Node) -> Any:
    if (a := _norm_args(prop, node)) is None:
        return None
    x, shape, ns = prop.value(a["input"]), _shape(a["input"]), a["normalized_shape"]
    if not isinstance(ns, (int, tuple, list)) or not all(isinstance(d, int) for d in ([ns] if isinstance(ns, int)
                                                                                       else ns)):
        raise AnalysisError(f"{where(node)} computes its normalized_shape at run time; not supported")
    k = 1 if isinstance(ns, int) else len(ns)
    if isinstance(x, Chan) and x.axis < len(shape) - k:  # normalises each channel on its own
        if any(isinstance(prop.value(a.get(t)), Chan) for t in ("weight", "bias")):
            raise AnalysisError(f"{where(node)} scales by a tensor carrying channels; not supported")
        return x
    if (x := _norm_input(prop, node, a, -1)) is None:
        return None
    if k != 1:
        raise AnalysisError(f"{where(node)} normalises over the channels and {k - 1} more axes; not supported")
    for t in ("weight", "bias"):
        _bind_param(prop, node, a.get(t), x.segs, "norm")
    prop.patch(node, 0, x.segs)  # the literal normalized_shape: rewritten when slimming
    mark_normalized(prop, NODE_KEY + node.name, x.segs)
    return x


def _group_norm(prop: Propagation, node: fx.Node) -> Any:
    if (a := _norm_args(prop, node)) is None or (x := _norm_input(prop, node, a, 1)) is None:
        return None
    groups, channels = a["num_groups"], _shape(a["input"])[1]
    for t in ("weight", "bias"):
        _bind_param(prop, node, a.get(t), x.segs, "affine")
    if groups == channels and isinstance(groups, int):  # each channel normalised alone
        prop.patch(node, 0, x.segs)  # the literal num_groups follows the width
    else:
        prop.protect(x.segs, f"{where(node)}: group_norm with {groups} groups of {channels} channels")
    return x


def _batch_norm(prop: Propagation, node: fx.Node) -> Any:
    if (a := _norm_args(prop, node)) is None or (x := _norm_input(prop, node, a, 1)) is None:
        return None
    stack = node.meta.get("nn_module_stack") or {}
    owner = next(reversed(stack.values()))[1] if stack else None
    if isinstance(owner, type) and issubclass(owner, torch.nn.modules.batchnorm._BatchNorm) \
            and not isinstance(a.get("training"), fx.Node):
        raise AnalysisError(
            f"{where(node)}: {owner.__name__} is a BatchNorm with its own forward, which mdprune had to trace "
            "in eval mode; the traced copy would never use batch statistics in training")
    for t, role in (("weight", "affine"), ("bias", "affine"), ("running_mean", "stat"), ("running_var", "stat")):
        _bind_param(prop, node, a.get(t), x.segs, role)
    return x


_RULES.update({"layer_norm": _layer_norm, "rms_norm": _layer_norm, "group_norm": _group_norm,
               "batch_norm": _batch_norm})
