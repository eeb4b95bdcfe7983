"""Put a masked or slim core back into its full detector, so the detector still runs end to end.

The core's graph calls the detector's own layers by path (``detector.backbone.body.conv1``): each layer the
masked or slim core calls replaces the detector's layer at that path, and each tensor it reads directly (an
SSD L2Norm scale) the detector's tensor. Where the core's graph itself changed (a removed block's addition
replaced by its shortcut, a gate on a block's branch), the smallest detector module holding every change is
replaced by that part of the core's graph, cut out as a small ``GraphModule``. What the core does not run
(transform, anchors, box decoding, NMS, proposal selection, RoI pooling) stays the detector's own.
"""

from __future__ import annotations

import copy
from typing import Any

import torch.fx as fx
from torch import nn

from ..space import AnalysisError, PruningSpace
from ..space.trace import eliminate_dead_code
from .wrap import PREFIX


def implant(detector: nn.Module, core: fx.GraphModule, space: PruningSpace) -> nn.Module:
    """A copy of ``detector`` running ``core`` (a masked or slim model of ``space``) for its traced part.

    The copy shares the core's layers and tensors (training one trains the other; masks applied to the core
    hold in the detector).
    """
    det = copy.deepcopy(detector)
    for node in core.graph.nodes:
        if node.op == "call_module" and node.target.startswith(PREFIX):
            _set_module(det, node.target[len(PREFIX):], core.get_submodule(node.target))
        elif node.op == "get_attr" and node.target.startswith(PREFIX):
            owner, _, attr = node.target.rpartition(".")
            value = _fetch(core, node.target)
            mod = det.get_submodule(owner[len(PREFIX):])
            if isinstance(value, nn.Parameter) or attr in mod._parameters:
                setattr(mod, attr, value)
            else:
                mod.register_buffer(attr, value, persistent=attr not in mod._non_persistent_buffers_set)
    base = space.module.graph
    for path in _changed_containers(core.graph, base):
        _set_module(det, path[len(PREFIX):], _cut(core, base, path))
    return det


def _fetch(root: nn.Module, target: str) -> Any:
    owner, _, attr = target.rpartition(".")
    return getattr(root.get_submodule(owner) if owner else root, attr)


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    owner, _, attr = path.rpartition(".")
    setattr(root.get_submodule(owner) if owner else root, attr, new)


def _stack(node: fx.Node) -> list[str]:
    """The module paths whose forward ``node`` runs in, outermost first (a layer's own call excluded)."""
    paths = [v[0] for v in (node.meta.get("nn_module_stack") or {}).values()]
    if node.op == "call_module" and paths and paths[-1] == node.target:
        paths = paths[:-1]
    return paths


def _container(node: fx.Node, seen: set[str] | None = None) -> str | None:
    """The innermost module whose forward holds ``node``; a node added after tracing (a gate) takes its
    users' (or inputs') module."""
    paths = _stack(node)
    if paths or node.meta.get("nn_module_stack"):
        return paths[-1] if paths else ""
    seen = seen or set()
    seen.add(node.name)
    for other in [*node.users, *node.all_input_nodes]:
        if other.name not in seen and other.op not in ("placeholder", "output"):
            c = _container(other, seen)
            if c is not None:
                return c
    return None


def _changed_containers(graph: fx.Graph, base: fx.Graph) -> list[str]:
    """The outermost detector modules whose part of the graph differs from the traced original."""
    old = {n.name: n for n in base.nodes}
    new = {n.name: n for n in graph.nodes}
    changed: list[fx.Node] = [n for n in base.nodes if n.name not in new and n.users]  # (not dead code)
    for n in graph.nodes:
        o = old.get(n.name)
        if o is None or o.op != n.op or o.target != n.target or _shape_of(o) != _shape_of(n):
            changed.append(n)
    paths = set()
    for n in changed:
        if n.op in ("placeholder", "output"):
            raise AnalysisError(f"the core's inputs or outputs changed at {n.name}: cannot run it in the detector")
        c = _container(n)
        if not c or not c.startswith(PREFIX):
            raise AnalysisError(f"node {n.name} changed outside any detector module ({c or 'the core itself'}): "
                                "cannot put the pruned core back into the detector")
        paths.add(c)
    return sorted(p for p in paths if not any(p.startswith(q + ".") for q in paths))


def _shape_of(node: fx.Node) -> Any:
    """A node's arguments with nodes replaced by their names (to compare two graphs); a value from outside the
    node's module is its module's input, whatever computed it (the caller passes it)."""
    c = _container(node)

    def name(a: fx.Node) -> Any:
        inner = c is not None and _container(a) is not None and (_container(a) + ".").startswith(c + ".")
        return ("node", a.name) if inner or a.op == "get_attr" else ("input",)

    return fx.node.map_aggregate((node.args, node.kwargs), lambda a: name(a) if isinstance(a, fx.Node) else a)


def _inside(node: fx.Node, path: str) -> bool:
    c = _container(node)
    return c is not None and (c == path or c.startswith(path + "."))


def _cut(gm: fx.GraphModule, base: fx.Graph, path: str) -> nn.Module:
    """Module ``path``'s part of ``gm``'s graph as a module of its own (one tensor in, one out)."""
    inside_b = [n for n in base.nodes if n.op not in ("placeholder", "output") and _inside(n, path)]
    names = {n.name for n in inside_b}
    outs = [n for n in inside_b if any(u.name not in names for u in n.users)]
    ins_b = {a.name for n in inside_b for a in n.all_input_nodes if a.name not in names and a.op != "get_attr"}
    if len(ins_b) != 1 or len(outs) != 1:
        raise AnalysisError(f"module {path} takes {len(ins_b)} input(s) and gives {len(outs)} output(s) in the "
                            "traced graph: cannot replace it by its pruned part")
    inside = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output") and (_inside(n, path)
                                                                                         or n.name in names)]
    graph = fx.Graph()
    x = graph.placeholder("x")
    result = _replacement(outs[0], names, {n.name: n for n in gm.graph.nodes}) if inside else None
    if result is None or result not in inside:  # nothing of it left: a removed block, whose output is its input
        graph.output(x)
        return fx.GraphModule(nn.Module(), graph, class_name="Removed")
    own = {n.name for n in inside}
    ins = {a.name for n in inside for a in n.all_input_nodes if a.name not in own and a.op != "get_attr"}
    if len(ins) != 1:
        raise AnalysisError(f"module {path}'s pruned part reads {len(ins)} inputs: cannot replace it")
    env: dict[str, fx.Node] = {next(iter(ins)): x}

    def arg(a: fx.Node) -> fx.Node:
        if a.name not in env:  # a tensor read directly (a gate)
            env[a.name] = graph.get_attr(a.target)
        return env[a.name]

    for n in inside:
        env[n.name] = graph.node_copy(n, arg)
        if n is result:
            break
    graph.output(env[result.name])
    cut = fx.GraphModule(gm, graph, class_name="Pruned")
    eliminate_dead_code(cut.graph)
    cut.recompile()
    return cut


def _replacement(out_b: fx.Node, names: set[str], nodes: dict[str, fx.Node]) -> fx.Node:
    """The node of the new graph that the module's users read where they read ``out_b`` before: itself if it is
    still there (only a removed block's addition is replaced), else what its users read in its place."""
    if out_b.name in nodes:
        return nodes[out_b.name]
    for u in out_b.users:
        if u.name in names or u.name not in nodes:
            continue
        old = fx.node.map_aggregate((u.args, u.kwargs), lambda a: a)
        new = nodes[u.name]
        found = _pair(old, (new.args, new.kwargs), out_b)
        if found is not None:
            return found
    raise AnalysisError(f"cannot tell what replaced the output of {out_b.name} in the pruned graph")


def _pair(old: Any, new: Any, target: fx.Node) -> fx.Node | None:
    if isinstance(old, fx.Node):
        return new if old is target and isinstance(new, fx.Node) else None
    if isinstance(old, (tuple, list)) and isinstance(new, (tuple, list)) and len(old) == len(new):
        for a, b in zip(old, new, strict=True):
            r = _pair(a, b, target)
            if r is not None:
                return r
    if isinstance(old, dict) and isinstance(new, dict):
        for k in old:
            r = _pair(old[k], new.get(k), target)
            if r is not None:
                return r
    return None
