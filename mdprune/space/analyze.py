"""``analyze``: trace a model and describe its pruning space (dimensions, blocks, ops)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .blocks import FoundBlock, find_blocks
from .channels import Propagation, RawOp
from .epilogue import epilogue
from .errors import AnalysisError, Problem
from .nodes import node_op
from .space import MAX_CHOICES, Block, Dimension, Op, Patch, PruningSpace, Seg, TensorAxes, default_step
from .trace import fetch, record_shapes, trace
from .values import RawSeg


def analyze(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    steps: Mapping[str, int] | None = None,
    ignored_layers: Iterable[str] = (),
    source: Mapping[str, Any] | None = None,
    max_choices: int = MAX_CHOICES,
    unsupported: str = "error",
) -> PruningSpace:
    """Describe what can be pruned in ``model``.

    Args:
        model: any ``nn.Module`` that torch.fx can trace (torchvision and timm CNNs and ViTs work as they are).
        example_inputs: a tensor (or tuple of tensors) the model accepts; sets batch, spatial size and tokens.
        steps: pruning step (alignment) per dimension kind (``"channel"``, ``"embed"``, ``"mlp"``, ``"heads"``,
            ``"qk"``, ``"v"``, ``"linear"``) or per dimension name. By default a kind's base step
            (``DEFAULT_STEPS``) doubled until a dimension has at most ``max_choices`` widths.
        max_choices: the most widths a dimension offers by default (16).
        ignored_layers: names of modules to keep whole: traced as opaque, every channel they touch is kept.
        source: how to rebuild the base model for :func:`mdprune.load` (``{"name": ..., "kwargs": {...}}``);
            taken from the model if it was made by :func:`mdprune.create_model`.
        unsupported: what to do with modules and ops mdprune cannot follow: ``"error"`` (default) raises one
            AnalysisError listing all of them; ``"keep"`` keeps each one's module whole, as ``ignored_layers``
            would (an op in the model's own forward: the channels through it), and warns with the list.

    Raises:
        AnalysisError: for the ops and layers mdprune cannot prune safely, all of them, naming module and op.
    """
    if unsupported not in ("error", "keep"):
        raise ValueError(f"unsupported must be 'error' or 'keep', not {unsupported!r}")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    gm, prop, ignored = _propagate(model, inputs, tuple(ignored_layers), unsupported == "keep")
    for op in prop.ops:
        node = next(n for n in gm.graph.nodes if n.name == op.nodes[0])
        fusable = op.kind in ("conv2d", "conv1d", "conv_transpose2d", "linear")  # a norm and activation after
        if fusable and node.op == "call_module" and node.target == op.name:
            op.fixed["epilogue"], covered = epilogue(gm, node)
            op.nodes = op.nodes + covered
    compute = {op.nodes[0] for op in prop.ops}
    covered = {n for op in prop.ops for n in op.nodes}
    for node in gm.graph.nodes:
        if node.name not in covered and (d := node_op(prop, gm, node)) is not None:
            name = node.target if node.op == "call_module" else node.name
            prop.ops.append(RawOp(name, "node", {"width": d["segs"]}, d["fixed"], (node.name,)))
    found = find_blocks(gm, prop.info, compute)
    steps = dict(steps or {})
    if source is None:
        source = getattr(model, "_mdprune_source", None)
    space = _assemble(gm, prop, found, compute, steps, ignored, inputs, source, max_choices)
    if unsupported == "keep":
        space.options["unsupported"] = "keep"
    return space


def _propagate(model: nn.Module, inputs: tuple[torch.Tensor, ...], ignored: tuple[str, ...], keep: bool
               ) -> tuple[fx.GraphModule, Propagation, tuple[str, ...]]:
    """Trace and run the channel rules; every problem found is raised at once, or (``keep``) its module ignored
    and the analysis repeated until none is left (ops in the model's own forward: kept as opaque nodes)."""
    user, kept, opaque = ignored, [], set()
    problems: list[Problem] = []
    while True:
        try:
            gm = trace(model, user + tuple(kept), n_inputs=len(inputs), example_inputs=inputs)
        except AnalysisError as e:
            new = [p.module for p in e.problems if p.module and p.module not in kept]
            if not keep or not new:
                raise
            problems += e.problems
            kept += new
            continue
        record_shapes(gm, inputs)
        prop = Propagation(gm, user + tuple(kept))
        prop.opaque_nodes = opaque
        prop.run()
        if not prop.problems:
            break
        if not keep:
            raise AnalysisError("", prop.problems, type(model).__name__)
        problems += prop.problems
        new = list(dict.fromkeys(p.module for p in prop.problems if p.module and p.module not in kept))
        nodes = {p.node for p in prop.problems if p.node} - opaque
        if not new and not nodes:  # nothing left to keep whole (cannot happen: opaque nodes never fail)
            raise AnalysisError("", prop.problems, type(model).__name__)
        kept += new
        opaque = set() if new else opaque | nodes
    if problems:
        warnings.warn(_kept_warning(problems, kept, type(model).__name__), stacklevel=3)
    return gm, prop, user + tuple(kept)


def _kept_warning(problems: list[Problem], kept: list[str], model: str) -> str:
    lines = list(dict.fromkeys(f"  - {p.message}" for p in problems))
    parts = [f"{len(kept)} module(s) whole ({', '.join(kept)})"] if kept else []
    if n := len({p.node for p in problems if p.module is None}):
        parts.append(f"the channels through {n} op(s) of its own forward")
    return f"mdprune keeps {' and '.join(parts)} in {model} unpruned, because it cannot follow:\n" + "\n".join(lines)


def _assemble(gm: fx.GraphModule, prop: Propagation, found: list[FoundBlock], compute: set[str],
              steps: dict[str, int], ignored: tuple[str, ...], inputs: tuple[torch.Tensor, ...],
              source: Mapping[str, Any] | None, max_choices: int) -> PruningSpace:
    nodes = {n.name: n for n in gm.graph.nodes}
    state = dict(gm.state_dict(keep_vars=True))

    # dimensions: one per unrefined union-find root, named after its first producer
    roots = prop.finish([*(s for axes in prop.bindings.values() for s in axes.values()),
                         *(s for o in prop.ops for s in o.roles.values()), *(p.segs for p in prop.patches),
                         *prop.normalized.values()])
    embeds = [r for r in roots if prop.spaces[r].normalized]
    names: dict[int, str] = {}
    used: set[str] = set()
    for r in roots:
        base = "embed" if len(embeds) == 1 and r == embeds[0] else prop.spaces[r].name
        name, k = base, 2
        while name in used:
            name, k = f"{base}#{k}", k + 1
        used.add(name)
        names[r] = name

    def seg(s: RawSeg) -> Seg:
        return Seg(tuple(names[prop.find(i)] for i in s.spaces), s.inner)

    def segs(ss: tuple[RawSeg, ...]) -> tuple[Seg, ...]:
        return tuple(seg(s) for s in prop.leaves(ss))  # refined spaces: their parts

    # blocks
    blocks: dict[str, Block] = {}
    tensor_block: dict[str, str] = {}
    node_block: dict[str, str] = {}
    calls: dict[str, set[str]] = {}  # module -> the nodes that call it (a module may be called twice)
    for n in nodes.values():
        if n.op == "call_module":
            calls.setdefault(n.target, set()).add(n.name)
    block_names = _block_names(found, nodes, compute)
    by_add = {fb.add: name for fb, name in zip(found, block_names, strict=True)}
    for fb, name in zip(found, block_names, strict=True):
        modules = sorted({nodes[n].target for n in fb.region if nodes[n].op == "call_module"
                          and calls[nodes[n].target] <= fb.region})
        tensors = [k for k in state if any(k.startswith(m + ".") for m in modules)]
        tensors += [nodes[n].target for n in fb.region if nodes[n].op == "get_attr"
                    and all(u.name in fb.region or u.name in fb.checks for u in nodes[n].users)]  # (else shared)
        protected = None
        if any(m == i or m.startswith(i + ".") for m in modules for i in ignored):
            protected = "holds an ignored layer"
        shared = sorted(m for m in {nodes[n].target for n in fb.region if nodes[n].op == "call_module"} - set(modules)
                        if any(k.startswith(m + ".") for k in state))  # (a shared ReLU holds nothing: no matter)
        if protected is None and shared:  # removing every call would drop the module: counts could not follow
            protected = f"calls {shared[0]}, which other parts of the model call too"
        outer = next((by_add[o.add] for o in found if o is not fb and fb.add in o.region), None)
        if protected is None and outer is not None:  # its tensors and ops are counted with the outer block
            protected = f"nested in block {outer}"
        blocks[name] = Block(name, modules, tensors, fb.shortcut_kind, fb.add, fb.branch, fb.shortcut, protected,
                             fb.checks)
        for t in tensors:
            tensor_block[t] = name
        for n in (*fb.region, fb.add):  # the addition goes with its branch
            node_block[n] = name

    tensors: dict[str, TensorAxes] = {}
    for t, axes in prop.bindings.items():
        shape = tuple(state[t].shape) if t in state else tuple(fetch(gm, t).shape)  # (a non-persistent buffer)
        tensors[t] = TensorAxes(t, shape, {a: segs(s) for a, s in axes.items()}, tensor_block.get(t),
                                dict(prop.roles[t]))

    dims: dict[str, Dimension] = {}
    for r in roots:
        info, name = prop.spaces[r], names[r]
        kind = "embed" if info.normalized else info.kind
        step = steps.get(name, steps.get(kind, default_step(kind, info.size, max_choices, info.repeat)))
        reasons = list(dict.fromkeys(info.protected))
        dims[name] = Dimension(name, kind, info.size, step, protected="; ".join(reasons) or None)
    for d in dims.values():  # a dimension lies in a block when all its tensors do
        owners = {t.block for t in tensors.values() for ss in t.axes.values() for s in ss if d.name in s.dims}
        if len(owners) == 1:
            d.block = owners.pop()

    ops = [Op(o.name, o.kind, {r: segs(s) for r, s in o.roles.items()}, o.fixed, node_block.get(o.nodes[0]))
           for o in prop.ops]
    return PruningSpace(
        module=gm,
        dims=dims,
        blocks=blocks,
        ops=ops,
        tensors=tensors,
        patches=[Patch(p.node, p.arg_index, segs(p.segs), p.keyword) for p in prop.patches],
        normalized={m: segs(s) for m, s in prop.normalized.items()},
        attention={m: {"kind": a["kind"], **{k: names[prop.find(a[k])] for k in ("heads", "qk", "v")}}
                   for m, a in prop.attention.items()},
        input_shapes=[tuple(x.shape) for x in inputs],
        source=dict(source) if source is not None else None,
        options={"steps": steps, "ignored_layers": list(ignored), "max_choices": max_choices},
    )


def _block_names(found: list[FoundBlock], nodes: dict[str, Any], compute: set[str]) -> list[str]:
    """Name each block by the module path its branch lives in (e.g. ``layer1.0``, ``blocks.3.mlp``)."""
    order = list(nodes)
    regions = [sorted(fb.region, key=order.index) for fb in found]
    prefixes = [_common_prefix([nodes[n].target for n in r if nodes[n].op == "call_module"]) for r in regions]
    names = []
    for i, (region, pre) in enumerate(zip(regions, prefixes, strict=True)):
        name = pre or f"block{i}"
        if prefixes.count(pre) > 1:  # several branches in one module: name each by its first compute op
            first = next(nodes[n].target for n in region if n in compute)
            rest = first[len(pre) + 1:] if pre else first
            name = f"{pre}.{rest.split('.')[0]}" if pre else rest.split(".")[0]
        names.append(name)
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out


def _common_prefix(mods: list[str]) -> str:
    if not mods:
        return ""
    parts = [m.split(".") for m in mods]
    common = os.path.commonprefix(parts)
    return ".".join(common)

