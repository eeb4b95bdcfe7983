"""The pruning space: what can be pruned in a model, as plain data.

A model is described by
- dimensions: sets of tensor slices kept or removed together (a channel group, the heads of one attention
  module, its q/k width, its v width, an MLP hidden width, the embedding width);
- blocks: residual branches ``y = s(x) + f(x)`` whose branch ``f`` can be removed, leaving the shortcut ``s``;
- ops: the compute ops (convolutions, linear layers, attention cores) with the dimensions that set their widths.

Every tensor axis that pruning changes is described by a tuple of :class:`Seg`: consecutive runs of positions,
each the row-major product of one or more dimensions, each element repeated ``inner`` times (a flatten of
trailing axes). This one description drives masking, slimming and the parameter and MAC counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .coverage import coverage

if TYPE_CHECKING:
    import torch.fx as fx

# Dimension kinds and their smallest pruning steps (alignment). The step of a dimension is this base step
# doubled until the dimension has at most MAX_CHOICES widths: hardware runs widths in blocks (measured here, a
# 3x3 convolution at batch 8 costs the same for 33..64 output channels as for 64), so coarse aligned widths
# lose little, and few enough choices let the latency tables measure every one instead of interpolating.
DEFAULT_STEPS: dict[str, int] = {
    "channel": 8,  # convolution output channel groups
    "linear": 8,  # hidden width of fully connected layers on flat features
    "embed": 16,  # transformer embedding width (residual stream)
    "mlp": 16,  # transformer MLP hidden width
    "heads": 1,  # attention heads
    "qk": 8,  # query/key width per head
    "v": 8,  # value width per head
}
MAX_CHOICES = 16


def default_step(kind: str, size: int, max_choices: int = MAX_CHOICES, repeat: int = 1) -> int:
    """The kind's base step, doubled until ``size`` has at most ``max_choices`` widths.

    ``repeat``: how many times the dimension's width is taken in the ops using it (a grouped convolution's
    width per group: its group count); the base step shrinks so that the op's width stays aligned, and halves
    until the width per group has a choice at all.
    """
    base = DEFAULT_STEPS.get(kind, 1)
    step = base // math.gcd(base, repeat)
    while repeat > 1 and 1 < size <= step:
        step //= 2
    while size / step > max_choices and step < size:
        step *= 2
    return step


@dataclass(frozen=True)
class Seg:
    """A run of positions along a tensor axis: the row-major product of ``dims``, each element ``inner`` wide."""

    dims: tuple[str, ...]
    inner: int = 1


@dataclass
class Dimension:
    """A set of tensor slices pruned together. Keeping k elements keeps exactly k of ``size``."""

    name: str
    kind: str
    size: int
    step: int
    block: str | None = None  # the removable block holding every slice of this dimension, if any
    protected: str | None = None  # why it cannot be pruned; None if prunable

    @property
    def prunable(self) -> bool:
        return self.protected is None and len(self.widths()) > 1

    def widths(self) -> list[int]:
        """Widths a plan may keep: multiples of ``step`` up to ``size``, and ``size`` itself."""
        if self.protected is not None:
            return [self.size]
        ws = list(range(self.step, self.size, self.step))
        return ws + [self.size]


@dataclass
class Block:
    """A residual branch that can be removed, leaving its shortcut (identity or a projection)."""

    name: str
    modules: list[str]  # modules of the branch (removed with it)
    tensors: list[str]  # parameters and buffers of the branch
    shortcut: str  # "identity" or "projection"
    add_node: str  # the fx node that sums shortcut and branch
    branch_node: str  # the fx node that carries the branch output into the sum
    shortcut_node: str  # the fx node that carries the shortcut into the sum
    protected: str | None = None
    checks: tuple[str, ...] = ()  # shape checks on the branch's tensors (assertions): erased with the branch

    @property
    def removable(self) -> bool:
        return self.protected is None


@dataclass
class Op:
    """A compute op whose latency depends on the widths of a few dimensions.

    ``roles`` maps a role ("in", "out" for convolutions and linear layers; "heads", "qk", "v" for attention
    cores; "width" for node ops) to the segments that make up that width. ``fixed`` holds everything else
    that sets its cost.
    """

    name: str
    kind: str  # "conv2d", "linear", "attention", or "node" (pooling, norms, activations, additions)
    roles: dict[str, tuple[Seg, ...]]
    fixed: dict[str, Any]
    block: str | None = None

    def dims(self) -> list[str]:
        """Names of the dimensions that drive this op, in role order, without repeats."""
        out: list[str] = []
        for segs in self.roles.values():
            for seg in segs:
                out.extend(d for d in seg.dims if d not in out)
        return out

    def widths(self, sizes: dict[str, int]) -> dict[str, int]:
        """Width of every role given the kept size of every dimension."""
        return {role: segs_width(segs, sizes) for role, segs in self.roles.items()}

    def macs(self, sizes: dict[str, int]) -> int:
        """Multiply-accumulates of one forward pass at the given dimension sizes."""
        from ..layers.registry import latency_op  # lazy: the layer kinds import the analysis

        w = self.widths(sizes)
        f = self.fixed
        op = latency_op(self.kind)  # convolutions, linear layers, registered layers: their layer kind counts
        if op is not None:
            return op.macs(f, w) if op.macs is not None else 0
        if self.kind == "attention":
            n = f["tokens"]  # queries; keys and values: tokens_kv (fewer queries than keys: LeViT's subsample)
            return f["batch"] * w["heads"] * n * f.get("tokens_kv", n) * (w["qk"] + w["v"])
        if self.kind == "node":
            return 0  # element-wise, pooling, norms: memory-bound, no multiply-accumulates counted
        raise ValueError(f"unknown op kind {self.kind!r}")


@dataclass
class TensorAxes:
    """A parameter or buffer whose axes pruning changes. ``axes`` maps an axis to its segments."""

    name: str
    shape: tuple[int, ...]
    axes: dict[int, tuple[Seg, ...]]
    block: str | None = None
    roles: dict[int, str] = field(default_factory=dict)  # axis -> out, in, affine, norm, stat or param

    def shape_for(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(
            segs_width(self.axes[i], sizes) if i in self.axes else n for i, n in enumerate(self.shape)
        )


def segs_width(segs: tuple[Seg, ...], sizes: dict[str, int]) -> int:
    """Number of positions of an axis made of ``segs`` when each dimension keeps ``sizes[dim]`` elements."""
    return sum(math.prod(sizes[d] for d in s.dims) * s.inner for s in segs)


@dataclass
class Patch:
    """A literal in the traced code that equals a pruned width (e.g. ``x.view(B, 512 * 7 * 7)``)."""

    node: str
    arg_index: int  # position in the flattened shape arguments (or of the argument ``keyword``)
    segs: tuple[Seg, ...]
    keyword: str | None = None  # a named argument (``groups``) rather than a shape entry


@dataclass
class PruningSpace:
    """Everything mdprune knows about a model's prunable structure. Built by :func:`mdprune.analyze`."""

    module: fx.GraphModule  # the traced model; masks and slim models are built from it
    dims: dict[str, Dimension]
    blocks: dict[str, Block]
    ops: list[Op]
    tensors: dict[str, TensorAxes]
    patches: list[Patch] = field(default_factory=list)
    normalized: dict[str, tuple[Seg, ...]] = field(default_factory=dict)  # LayerNorm module -> its axis
    attention: dict[str, dict[str, str]] = field(default_factory=dict)  # attention module -> its dims
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    source: dict[str, Any] | None = None  # how to rebuild the base model: {"name": ..., "kwargs": ...}
    options: dict[str, Any] = field(default_factory=dict)  # analysis options (steps, ignored layers)

    # ---- sizes -------------------------------------------------------------------------------------------
    def dense_sizes(self) -> dict[str, int]:
        return {name: d.size for name, d in self.dims.items()}

    def prunable_dims(self) -> list[Dimension]:
        return [d for d in self.dims.values() if d.prunable]

    def removable_blocks(self) -> list[Block]:
        return [b for b in self.blocks.values() if b.removable]

    # ---- counts ------------------------------------------------------------------------------------------
    def count_params(self, sizes: dict[str, int] | None = None, removed: set[str] | frozenset = frozenset()
                     ) -> int:
        """Parameters of the model when dimensions keep ``sizes`` and the blocks in ``removed`` are gone."""
        sizes = sizes or self.dense_sizes()
        total = 0
        owners = self._param_blocks
        for name, p in self.module.named_parameters():
            if owners.get(name, set()) & set(removed):  # a removed branch holding every use of it (branches
                continue  # may overlap: EdgeNeXt's split convolutions and the attention after them)
            t = self.tensors.get(name)
            if t is None:
                total += p.numel()
            elif t.block not in removed:
                total += math.prod(t.shape_for(sizes))
        return total

    def count_macs(self, sizes: dict[str, int] | None = None, removed: set[str] | frozenset = frozenset()) -> int:
        """Multiply-accumulates of the compute ops (convolutions, linear layers, attention)."""
        sizes = sizes or self.dense_sizes()
        return sum(op.macs(sizes) for op in self.ops if op.block not in removed)

    @property
    def _param_blocks(self) -> dict[str, set[str]]:
        """Each parameter's blocks: those whose branch holds every use of it (several where branches overlap)."""
        out: dict[str, set[str]] = {}
        for b in self.blocks.values():
            for t in b.tensors:
                out.setdefault(t, set()).add(b.name)
        return out

    def coverage(self) -> dict[str, Any]:
        """Share of parameters and MACs a plan can change, and what is kept whole and why."""
        return coverage(self)

    # ---- text --------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        kinds: dict[str, int] = {}
        for d in self.prunable_dims():
            kinds[d.kind] = kinds.get(d.kind, 0) + 1
        return {
            "dimensions": len(self.dims),
            "prunable_dimensions": len(self.prunable_dims()),
            "prunable_by_kind": kinds,
            "blocks": len(self.blocks),
            "removable_blocks": len(self.removable_blocks()),
            "ops": len(self.ops),
            "params": self.count_params(),
            "macs": self.count_macs(),
        }
