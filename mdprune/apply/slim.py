"""Slim application: rebuild the model with smaller ordinary modules and without removed blocks."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..layers.norm import resize_norm
from ..layers.registry import layer_kind
from ..space import Plan, PruningSpace
from ..space.trace import eliminate_dead_code
from .attention import slim_attention
from .indices import Positions


def load_dense_weights(space: PruningSpace, model: nn.Module | None) -> fx.GraphModule:
    """A copy of the traced model, with the weights of ``model`` (dense, masked or not) if given."""
    gm = copy.deepcopy(space.module)
    if model is not None:
        src = model.state_dict()
        own = gm.state_dict()
        made = {k for k in own if k.rpartition(".")[2].startswith("_tensor_constant")}  # by the tracer, not weights
        missing = [k for k in own if k not in src and k not in made]
        if missing:
            raise ValueError(f"the model given has no weights for {missing[:5]} ...; is it the analysed model?")
        gm.load_state_dict({k: src[k] if k in src else own[k] for k in own})
    return gm


def slim(space: PruningSpace, plan: Plan, model: nn.Module | None = None) -> fx.GraphModule:
    """The slim model of ``plan``: an ordinary ``nn.Module`` (a ``torch.fx.GraphModule``) with smaller layers.

    Args:
        space: the pruning space of the dense model.
        plan: what to keep; validated against ``space``.
        model: where to take weights from (the dense model, or its masked version after training);
            by default the weights of the analysed model.
    """
    plan.validate(space)
    gm = load_dense_weights(space, model)
    pos = Positions(space, plan)
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}

    replaced: dict[str, fx.Node] = {}
    erased: set[str] = set()
    for b in sorted(plan.removed, key=lambda b: list(nodes).index(space.blocks[b].add_node)):
        blk = space.blocks[b]  # a removed block leaves its shortcut (itself maybe a removed block's)
        shortcut = nodes[blk.shortcut_node]
        shortcut = replaced.get(shortcut.name, shortcut)
        add = nodes[blk.add_node]
        users = list(add.users)
        add.replace_all_uses_with(shortcut)
        graph.erase_node(add)
        replaced[add.name] = shortcut
        for u in users:  # an in-place op on the sum would now overwrite the shortcut's tensor
            _not_inplace(gm, u)
        for c in reversed(blk.checks):  # assertions on the branch's shapes would keep the branch live
            if c not in erased:  # (one check may read two removed branches)
                graph.erase_node(nodes[c])
                erased.add(c)
    eliminate_dead_code(graph)

    with torch.no_grad():
        done: set[str] = set()  # a module called several times (a detector head shared by levels): sliced once
        taken: set[str] = set()  # so is a tensor also read as an attribute (``self.proj.weight.dtype``)
        for node in graph.nodes:
            if node.op == "call_module" and node.target not in done:
                done.add(node.target)
                m = gm.get_submodule(node.target)
                new = _slim_module(space, pos, node.target, m, taken)
                if new is not m:
                    _set_submodule(gm, node.target, new)
            elif node.op == "get_attr" and node.target in space.tensors and node.target not in taken:
                taken.add(node.target)
                _set_tensor(gm, node.target, _take(space, pos, node.target, _get_tensor(gm, node.target)))

    for p in space.patches:
        node = nodes.get(p.node)
        if node is not None and node.graph is graph:
            _patch_literal(node, p.arg_index, pos.axis(p.segs).numel(), p.keyword)
    gm.delete_all_unused_submodules()
    _delete_unused_tensors(gm)
    gm.recompile()
    gm.meta["mdprune"] = {
        "source": space.source,
        "plan": plan.to_dict(),
        "input_shapes": [list(s) for s in space.input_shapes],
        "options": space.options,
    }
    return gm


def _delete_unused_tensors(gm: fx.GraphModule) -> None:
    """Drop parameters and buffers nothing reads any more: those a removed block held on a module that stays
    only as the parent of a kept one (e.g. a ConvNeXt block's ``gamma`` beside its identity shortcut)."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    fetched = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for path, m in gm.named_modules():
        parts = path.split(".")
        if path and any(".".join(parts[:i]) in called for i in range(1, len(parts) + 1)):
            continue  # a called module reads its own tensors
        for name, _ in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            if (f"{path}.{name}" if path else name) not in fetched:
                delattr(m, name)


def _not_inplace(gm: fx.GraphModule, node: fx.Node) -> None:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if getattr(m, "inplace", False):
            m.inplace = False
    elif node.kwargs.get("inplace"):
        node.kwargs = {**node.kwargs, "inplace": False}
    elif node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_") \
            and not node.target.endswith("__"):
        node.target = node.target[:-1]  # relu_ -> relu


def _get_tensor(root: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(root.get_submodule(owner) if owner else root, attr)


def _take(space: PruningSpace, pos: Positions, name: str, t: torch.Tensor) -> torch.Tensor:
    """The kept part of tensor ``name`` (every pruned axis indexed by its kept positions)."""
    out = t.detach()
    for axis, segs in space.tensors[name].axes.items():
        out = out.index_select(axis, pos.axis(segs).to(out.device))
    if isinstance(t, nn.Parameter):
        return nn.Parameter(out.clone(), requires_grad=t.requires_grad)
    return out.clone()


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    mod = root.get_submodule(owner) if owner else root
    if isinstance(value, nn.Parameter):
        setattr(mod, attr, value)
    else:
        mod.register_buffer(attr, value, persistent=attr not in mod._non_persistent_buffers_set)


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    owner, _, attr = path.rpartition(".")
    setattr(root.get_submodule(owner) if owner else root, attr, new)


def _slim_module(space: PruningSpace, pos: Positions, path: str, m: nn.Module, taken: set[str]) -> nn.Module:
    if path in space.attention:
        return slim_attention(space, pos, path, m)
    names = [f"{path}.{n}" for n, _ in m.named_parameters()] + [f"{path}.{n}" for n, _ in m.named_buffers()]
    bound = [n for n in names if n in space.tensors]
    if not bound and path not in space.normalized:  # (a LayerNorm without weights still changes size)
        return m
    new = copy.deepcopy(m)
    for name in bound:
        if name in taken:
            continue
        taken.add(name)
        local = name[len(path) + 1:]
        _set_tensor(new, local, _take(space, pos, name, _get_tensor(new, local)))
    _resize(new, m, space, pos, path)
    return new


def _resize(new: nn.Module, old: nn.Module, space: PruningSpace, pos: Positions, path: str) -> None:
    """Update the size attributes of a module whose tensors were sliced: its layer kind knows how."""
    kind = layer_kind(old)
    if path in space.normalized and (kind is None or kind.resize in (None, resize_norm)):
        # a LayerNorm over pruned features: its width is the plan's (it may hold no tensor)
        resize_norm(new, old, int(pos.axis(space.normalized[path]).numel()))
        return
    if kind is None:
        raise TypeError(f"mdprune does not know how to resize module '{path}' of type {type(new).__name__}")
    if kind.resize is not None:  # (None: its size lives in its tensors only)
        kind.resize(new, old)


def _patch_literal(node: fx.Node, index: int, value: int, keyword: str | None = None) -> None:
    args: list[Any] = list(node.args)
    if keyword is not None:  # a named argument (``groups=C``), positional or not
        if len(args) > index:
            args[index] = value
            node.args = tuple(args)
        else:
            node.kwargs = {**node.kwargs, keyword: value}
        return
    if isinstance(args[1], (tuple, list)):  # a shape given as one sequence (reshape, layer_norm)
        shape = list(args[1])
        shape[index] = value
        args[1] = type(args[1])(shape)
    else:
        args[1 + index] = value
    node.args = tuple(args)
