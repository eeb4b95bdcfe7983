"""Trace into functions registered with ``torch.fx.wrap`` (torchvision's ``_patch_merging_pad``, ...).

fx keeps such a function as one call, which the channel analysis could only refuse; traced into, its body is
made of ops that have rules (pad, slices, cat, ...). The body is traced on its own, with the call's constant
arguments fixed, and spliced into the graph in place of the call. A function that cannot be traced alone
(branches on its tensor arguments, tensors it holds, modules it calls) stays one call.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from typing import Any

import torch.fx as fx
import torch.fx._symbolic_trace as fx_trace

from .functions import has_rule
from .op_names import op_name

MAX_ROUNDS = 4  # wrapped functions calling wrapped functions: traced into this deep


def inline_wrapped(graph: fx.Graph, make_tracer: Callable[[], fx.Tracer]) -> None:
    """Replace every call to an fx-wrapped function without a rule of its own by the function's body."""
    for _ in range(MAX_ROUNDS):
        calls = [n for n in graph.nodes if n.op == "call_function" and _is_wrapped(n.target)
                 and not has_rule(op_name(n))]
        if not [n for n in calls if _inline(graph, n, make_tracer())]:
            return


def _is_wrapped(fn: Any) -> bool:
    table = getattr(fx_trace, "_wrapped_fns_to_patch", {})
    g = getattr(fn, "__globals__", None)
    return inspect.isfunction(fn) and g is not None and (id(g), fn.__name__) in table


def _inline(graph: fx.Graph, node: fx.Node, tracer: fx.Tracer) -> bool:
    """Splice the body of ``node``'s function in place of the call; False (graph unchanged) if it cannot be."""
    fn = node.target
    try:
        bound = inspect.signature(fn).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return False
    bound.apply_defaults()
    params = inspect.signature(fn).parameters
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values()):
        return False
    constants = {}
    for name, value in bound.arguments.items():
        if not isinstance(value, fx.Node):
            if _holds_node(value):
                return False
            constants[name] = value
    try:
        body = tracer.trace(fn, concrete_args=constants or None)
    except Exception:  # noqa: BLE001 - not traceable alone: it stays one call
        return False
    body = body if isinstance(body, fx.Graph) else body.graph
    if any(n.op in ("get_attr", "call_module") for n in body.nodes):
        return False
    out = next(n for n in body.nodes if n.op == "output").args[0]
    if not isinstance(out, fx.Node) and not _items_used(node, out):
        return False
    values = _bind_placeholders(body, dict(bound.arguments))
    if values is None:
        return False
    with graph.inserting_before(node):
        first = node.prev
        result = graph.graph_copy(body, values)
    _copy_meta(node, first)
    if isinstance(result, fx.Node):
        node.replace_all_uses_with(result)
    else:
        for user in list(node.users):
            user.replace_all_uses_with(result[user.args[1]])
            graph.erase_node(user)
    graph.erase_node(node)
    return True


def _holds_node(value: Any) -> bool:
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return bool(found)


def _items_used(node: fx.Node, out: Any) -> bool:
    """A function returning a tuple: every use of the call must pick one item by a literal index."""
    return isinstance(out, (tuple, list)) and all(
        u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int) for u in node.users)


def _bind_placeholders(body: fx.Graph, arguments: dict[str, Any]) -> dict[fx.Node, Any] | None:
    """Map the body's placeholders (in parameter order) to the call's nodes and constants, dropping the checks
    fx adds on constants (they hold by construction)."""
    placeholders = [n for n in body.nodes if n.op == "placeholder"]
    if len(placeholders) != len(arguments):
        return None
    values: dict[fx.Node, Any] = {}
    for ph, value in zip(placeholders, arguments.values(), strict=True):
        values[ph] = value
        if isinstance(value, fx.Node):
            continue
        for user in list(ph.users):
            checks = [user] if user.target is fx_trace._assert_is_none else \
                [*user.users, user] if user.target is operator.eq else []
            for c in checks:
                if c.users:
                    return None
                body.erase_node(c)
    return values


def _copy_meta(call: fx.Node, first: fx.Node) -> None:
    """The spliced nodes (after ``first``, before ``call``) belong to the module that made the call."""
    n = first.next
    while n is not call:
        for key in ("nn_module_stack", "stack_trace"):
            if key in call.meta:
                n.meta[key] = call.meta[key]
        n = n.next
