"""Find residual blocks: additions ``y = s(x) + f(x)`` whose branch ``f`` can be removed, leaving ``s``.

For every addition of two same-shape channel tensors, take the latest node ``x`` that both operands depend
on (the fork). The nodes strictly between the fork and the addition form the region; it is a removable
residual block when nothing outside the region reads a tensor from inside it, nothing inside reads a tensor
from outside it (parameters and shape queries aside), and the two operands' sub-regions are disjoint. Shape
checks on the region's tensors that lead only to assertions (timm's ``_assert(C % groups == 0)``) go with it.
The operand with more compute ops is the branch; the other is the shortcut (identity, or a projection).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from .op_names import op_name
from .trace import live_nodes, written_by
from .values import Chan

ADD = {"add", "iadd", "add_"}


@dataclass
class FoundBlock:
    add: str
    branch: str  # operand node of the addition on the branch side
    shortcut: str
    region: set[str]  # branch-side nodes (removed with the block)
    shortcut_kind: str
    protected: str | None = None
    checks: tuple[str, ...] = ()  # shape checks on the branch only (erased with it: they would keep it live)


def _is_tensor(n: fx.Node) -> bool:
    return isinstance(n.meta.get("mdp_shape"), tuple)


def find_blocks(gm: fx.GraphModule, info: dict[str, object], compute: set[str]) -> list[FoundBlock]:
    """Residual blocks of ``gm``. ``compute`` holds the names of nodes that are compute ops."""
    nodes = list(gm.graph.nodes)
    order = {n.name: i for i, n in enumerate(nodes)}
    ancestors: dict[str, set[str]] = {}
    for n in nodes:
        acc: set[str] = set()
        for p in n.all_input_nodes:
            acc.add(p.name)
            acc |= ancestors[p.name]
        ancestors[n.name] = acc
    by_name = {n.name: n for n in nodes}
    # a dead read (``b, n, c = x.shape`` with ``c`` unused) is no exit: the slim model drops it
    live = {n.name for n in live_nodes(gm.graph)}

    found = []
    for n in nodes:
        if n.op not in ("call_function", "call_method") or op_name(n) not in ADD or len(n.args) < 2:
            continue
        a, b = n.args[0], n.args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        if not (isinstance(info.get(a.name), Chan) and isinstance(info.get(b.name), Chan)):
            continue
        if a.meta["mdp_shape"] != b.meta["mdp_shape"] or a.meta["mdp_shape"] != n.meta["mdp_shape"]:
            continue
        blk = _block_at(n, a, b, ancestors, order, by_name, compute, live)
        if blk is not None:
            found.append(blk)
    return found


def _writers(side: set[str], by_name: dict[str, fx.Node]) -> set[str]:
    """In-place ops on a tensor of ``side`` whose own result nothing reads (NFNet's ``out.mul_(gain)``), with the
    parameters they read: part of that side, gone with it."""
    found: set[str] = set()
    for name in side:
        for u in by_name[name].users:
            base = written_by(u)
            if base is not None and base.name in side and not u.users:
                found |= {u.name} | {p.name for p in u.all_input_nodes if p.op == "get_attr"}
    return found - side


def _checks(side: set[str], by_name: dict[str, fx.Node]) -> set[str]:
    """Non-tensor nodes reading ``side`` whose whole downstream is non-tensor and ends in assertions, not in
    the output (``x.dim() == 4``, ``C % groups == 0``): checks of that side, gone with it."""
    found: set[str] = set()
    for name in side:
        for u in by_name[name].users:
            if u.name in side or u.name in found:
                continue
            down, todo = {u.name}, [u]
            while todo:
                for w in todo.pop().users:
                    if w.name not in down and w.name not in side:
                        down.add(w.name)
                        todo.append(w)
            if all(not _is_tensor(by_name[d]) and by_name[d].op in ("call_function", "call_method")
                   for d in down):
                found |= down
    return found


def _side(operand: fx.Node, fork: str, ancestors: dict[str, set[str]]) -> set[str]:
    if operand.name == fork:
        return set()
    return ({operand.name} | ancestors[operand.name]) - ancestors[fork] - {fork}


def _block_at(add: fx.Node, a: fx.Node, b: fx.Node, ancestors: dict[str, set[str]], order: dict[str, int],
              by_name: dict[str, fx.Node], compute: set[str], live: set[str]) -> FoundBlock | None:
    ca = ancestors[a.name] | {a.name}
    cb = ancestors[b.name] | {b.name}
    common = [x for x in ca & cb if _is_tensor(by_name[x]) and by_name[x].op != "get_attr"]
    if not common:
        return None
    fork = max(common, key=order.__getitem__)
    sa, sb = _side(a, fork, ancestors), _side(b, fork, ancestors)
    sa, sb = sa | _writers(sa, by_name), sb | _writers(sb, by_name)
    if sa & sb:
        return None
    region = sa | sb
    checks_a, checks_b = _checks(sa, by_name), _checks(sb, by_name)
    for name in region:  # single entry: data comes only from the fork (or parameters / shape queries)
        for p in by_name[name].all_input_nodes:
            if p.name in region or p.name == fork or p.op == "get_attr" or not _is_tensor(p):
                continue
            return None
        for u in by_name[name].users:  # single exit: only the addition reads the region
            if u.name not in region and u is not add and u.name in live and u.name not in checks_a | checks_b:
                return None
    na, nb = len(sa & compute), len(sb & compute)
    if na == nb:
        return None  # two equal branches: no shortcut to fall back on
    branch, shortcut, region_b, other, checks = (a, b, sa, nb, checks_a) if na > nb else (b, a, sb, na, checks_b)
    kind = "identity" if other == 0 else "projection"  # identity may hold element-wise ops (a dropout)
    ordered = tuple(sorted(checks, key=order.__getitem__))
    return FoundBlock(add.name, branch.name, shortcut.name, region_b, kind, checks=ordered)
