"""Channel coupling: walk the traced graph once and find which tensor slices must be pruned together.

Every op that creates channels (a convolution, a linear layer, an attention module, a model input) opens a
new *space*; ops that tie channels together (residual additions, depthwise convolutions, BatchNorm, cat on a
non-channel axis, broadcasting with a parameter) merge spaces in a union-find. Each parameter axis that
pruning changes is *bound* to the segments of the channels it touches. At the end every union-find root is
one :class:`~mdprune.space.space.Dimension`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from .attention import attention_adapter
from .errors import AnalysisError, Problem, owner, where
from .functions import function_rule
from .layouts import Layouts
from .modules import module_rule
from .values import Chan, ParamRef, RawSeg, Several


@dataclass
class SpaceInfo:
    size: int
    kind: str
    name: str
    protected: list[str] = field(default_factory=list)
    normalized: bool = False
    parts: tuple[int, ...] = ()  # a refined space: the spaces it was split into (see layouts.py) ...
    concat: bool = False  # ... laid end to end, or (False) as a row-major product
    repeat: int = 1  # each element appears this many times side by side in an op (a width per group: groups)
    origin: int = -1  # the space whose creation this one dates from (a part: its parent's); names the class


@dataclass
class RawOp:
    name: str
    kind: str
    roles: dict[str, tuple[RawSeg, ...]]
    fixed: dict[str, Any]
    nodes: tuple[str, ...]  # fx nodes the op belongs to (for block membership)


@dataclass
class RawPatch:
    node: str
    arg_index: int
    segs: tuple[RawSeg, ...]
    keyword: str | None = None


class Propagation(Layouts):
    """Runs the channel rules over ``gm``'s graph. Rules call back into :meth:`new_space`, :meth:`bind`, ..."""

    def __init__(self, gm: fx.GraphModule, ignored: tuple[str, ...] = ()):
        self.gm = gm
        self.ignored = ignored
        self.parent: list[int] = []
        self.spaces: list[SpaceInfo] = []
        self.bindings: dict[str, dict[int, tuple[RawSeg, ...]]] = {}
        self.roles: dict[str, dict[int, str]] = {}
        self.tensor_node: dict[str, str] = {}  # tensor -> node that uses it (call_module or get_attr)
        self.ops: list[RawOp] = []
        self.patches: list[RawPatch] = []
        self.param_patches: list[tuple[fx.Node, int, str, int]] = []  # (node, literal index, tensor, its axis)
        self.unpruned_params: list[tuple[str, fx.Node, int | None]] = []  # (tensor, where, axis; None: all) used
        # where channels cannot follow
        self.contractions: dict[str, tuple[tuple[RawSeg, ...], tuple[int, ...]]] = {}  # q @ k^T: q/k columns
        self.normalized: dict[str, tuple[RawSeg, ...]] = {}
        self.attention: dict[str, dict[str, int]] = {}
        self.info: dict[str, Any] = {}
        self.batch = 1
        self.problems: list[Problem] = []  # what the analysis could not follow (each treated as opaque)
        self.opaque_nodes: set[str] = set()  # nodes to treat as opaque without trying their rule
        self.failed: set[str] = set()  # nodes treated as opaque, and values that lost their channels there

    # ---- union-find --------------------------------------------------------------------------------------
    def new_space(self, size: int, kind: str, name: str, protected: str | None = None) -> int:
        i = len(self.parent)
        self.parent.append(i)
        self.spaces.append(SpaceInfo(size, kind, name, [protected] if protected else [], origin=i))
        return i

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def _union(self, a: int, b: int, node: fx.Node | None) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        sa, sb = self.spaces[ra], self.spaces[rb]
        if sa.size != sb.size:
            raise AnalysisError(
                f"{where(node) if node is not None else 'mdprune'} ties channels of sizes {sa.size} ({sa.name}) "
                f"and {sb.size} ({sb.name})")
        keep, drop = (ra, rb) if ra < rb else (rb, ra)
        self.parent[drop] = keep
        k, d = self.spaces[keep], self.spaces[drop]
        k.protected += d.protected
        k.normalized = k.normalized or d.normalized
        k.kind = _merge_kind(k.kind, d.kind)
        k.repeat = math.gcd(k.repeat, d.repeat)
        if d.origin < k.origin:  # the earliest created space names the group
            k.name, k.origin = d.name, d.origin
        if d.parts and k.parts:  # both refined: their refinements must agree
            self.unify(_parts_layout(k), _parts_layout(d), node)
        elif d.parts:
            k.parts, k.concat = d.parts, d.concat
        if k.parts:
            self.push(keep)

    def protect(self, segs: tuple[RawSeg, ...], reason: str) -> None:
        for s in self.leaves(segs):
            for i in s.spaces:
                self.spaces[self.find(i)].protected.append(reason)

    def roots(self, segs: tuple[RawSeg, ...]) -> tuple[tuple[tuple[int, ...], int], ...]:
        """``segs`` as unrefined union-find roots (to compare layouts)."""
        return tuple((s.spaces, s.inner) for s in self.leaves(segs))

    def size(self, i: int) -> int:
        return self.spaces[self.find(i)].size

    def width(self, segs: tuple[RawSeg, ...]) -> int:
        return sum(math.prod(self.size(i) for i in s.spaces) * s.inner for s in segs)

    # ---- records made by the rules -----------------------------------------------------------------------
    def bind(self, tensor: str, axis: int, segs: tuple[RawSeg, ...], node: fx.Node, role: str) -> None:
        """Record that ``tensor``'s axis ``axis`` is made of ``segs`` (tying it if bound already).

        ``role`` says how the axis relates to the channels: ``out`` (an op producing them), ``in`` (an op
        consuming them), ``affine`` (a per-channel scale or shift: BatchNorm, LayerScale), ``norm`` (LayerNorm),
        ``stat`` (running statistics) or ``param`` (a free parameter such as a position embedding).
        """
        self.roles.setdefault(tensor, {}).setdefault(axis, role)
        axes = self.bindings.setdefault(tensor, {})
        if axis in axes:
            self.unify(axes[axis], segs, node)
        else:
            axes[axis] = segs
        self.tensor_node.setdefault(tensor, node.name)

    def add_op(self, name: str, kind: str, roles: dict[str, tuple[RawSeg, ...]], fixed: dict[str, Any],
               node: fx.Node) -> None:
        self.ops.append(RawOp(name, kind, roles, fixed, (node.name,)))

    def patch(self, node: fx.Node, arg_index: int, segs: tuple[RawSeg, ...], keyword: str | None = None) -> None:
        """A literal of ``node`` that equals the width of ``segs``: entry ``arg_index`` of its shape arguments, or
        (``keyword``) the argument of that name, given at position ``arg_index`` or as a keyword."""
        self.patches.append(RawPatch(node.name, arg_index, segs, keyword))

    # ---- walking -----------------------------------------------------------------------------------------
    def value(self, a: Any) -> Any:
        """Analysis value of an fx argument (None for constants and channel-free tensors)."""
        if isinstance(a, fx.Node):
            return self.info.get(a.name)
        return None

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.info[node.name] = self._visit(node)
        for node, index, tensor, axis in self.param_patches:  # a parameter's width written in a literal shape:
            segs = self.bindings.get(tensor, {}).get(axis)  # patched once the axis is known to carry channels
            if segs is not None:
                self.patch(node, index, segs)
        for tensor, node, axis in self.unpruned_params:
            for ax, segs in self.bindings.get(tensor, {}).items():
                if axis is None or ax == axis:
                    self.protect(segs, f"{where(node)} uses {tensor} where channels cannot follow")

    def _visit(self, node: fx.Node) -> Any:
        """The node's value; a node mdprune cannot follow is recorded in ``problems`` and treated as opaque
        (its channels kept whole), so one analysis finds every problem of a model. A failure caused by an earlier
        one (its input lost its channels there) is not listed again."""
        after_failure = any(a.name in self.failed for a in node.all_input_nodes)
        if node.name in self.opaque_nodes:
            self.failed.add(node.name)
            return self._opaque(node, node.meta.get("mdp_shape"), f"unsupported {where(node)}")
        try:
            value = self._rule(node)
        except Exception as e:  # noqa: BLE001 - every failure becomes a named problem
            text = str(e) if isinstance(e, AnalysisError) else \
                f"{where(node)}: mdprune's rule failed ({type(e).__name__}: {e})"
            if not after_failure:
                self.problems.append(Problem(text, owner(node) or None, node.name))
            self.failed.add(node.name)
            return self._opaque(node, node.meta.get("mdp_shape"), f"unsupported {where(node)}")
        if value is None and after_failure:  # e.g. a field of an unsupported op's tuple: still no channels
            self.failed.add(node.name)
        return value

    def _rule(self, node: fx.Node) -> Any:
        shape = node.meta.get("mdp_shape")
        if node.op == "placeholder":
            return self._input(node, shape)
        if node.op == "get_attr":
            return ParamRef(node.target, tuple(range(len(shape)))) if isinstance(shape, tuple) else None
        if node.op == "output":
            self._output(node.args[0])
            return None
        if node.op == "call_module":
            m = self.gm.get_submodule(node.target)
            if node.target in self.ignored:
                return self._opaque(node, shape)
            adapter = attention_adapter(m)
            if adapter is not None:
                return adapter.analyse(self, node, m)
            rule = module_rule(m)
            if rule is None:
                raise AnalysisError(f"mdprune cannot analyse {where(node)} of type {type(m).__name__}: it does not "
                                    "know how this layer treats channels")
            return rule(self, node, m)
        fn = getattr(node.target, "autograd_function", None) if node.op == "call_function" else None
        if fn is not None:  # a custom autograd Function, kept as one call (its backward is its own)
            return self._opaque(node, shape, f"custom autograd function {fn.__name__} ({where(node)})")
        return function_rule(self, node)

    def _input(self, node: fx.Node, shape: Any) -> Any:
        if not isinstance(shape, tuple) or len(shape) < 2:
            return None
        self.batch = shape[0]
        axis = 1 if len(shape) == 4 else len(shape) - 1
        name = "input" if not self.info else f"input.{node.name}"
        sid = self.new_space(shape[axis], "input", name, protected="model input")
        return Chan(axis, (RawSeg((sid,)),))

    def _output(self, out: Any) -> None:
        for v in _flatten(out):
            info = self.value(v)
            for c in _chans(info):
                self.protect(c.segs, "model output")

    def _opaque(self, node: fx.Node, shape: Any, reason: str | None = None) -> Any:
        """An ignored layer (or an op kept as it is): every channel entering or leaving it is kept whole."""
        reason = reason or f"ignored layer {node.target}"
        for a in _flatten((node.args, node.kwargs)):
            v = self.value(a)
            for c in _chans(v):
                self.protect(c.segs, reason)
            if isinstance(v, ParamRef):  # a tensor used as it is: keep what is bound of it whole
                for segs in self.bindings.get(v.tensor, {}).values():
                    self.protect(segs, reason)
        label = node.target if node.op == "call_module" else node.name

        def out(s: Any) -> Any:
            if not isinstance(s, tuple) or len(s) < 2:
                return None
            axis = 1 if len(s) == 4 else len(s) - 1
            sid = self.new_space(s[axis], "channel", f"{label}:out", reason)
            return Chan(axis, (RawSeg((sid,)),))

        if isinstance(shape, list):
            return Several(tuple(out(s) for s in shape))
        return out(shape)


_KIND_ORDER = ("embed", "heads", "qk", "v", "mlp", "channel", "linear", "input")


def _parts_layout(info: SpaceInfo) -> tuple[RawSeg, ...]:
    return tuple(RawSeg((p,)) for p in info.parts) if info.concat else (RawSeg(info.parts),)


def _merge_kind(a: str, b: str) -> str:
    return a if _KIND_ORDER.index(a) <= _KIND_ORDER.index(b) else b


def _flatten(x: Any) -> list[Any]:
    if isinstance(x, (list, tuple)):
        return [y for v in x for y in _flatten(v)]
    if isinstance(x, dict):
        return [y for v in x.values() for y in _flatten(v)]
    return [x]


def _chans(info: Any) -> list[Chan]:
    if isinstance(info, Chan):
        return [info]
    if isinstance(info, Several):
        return [c for i in info.items for c in _chans(i)]
    return []
