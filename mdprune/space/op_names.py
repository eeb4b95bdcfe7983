"""The name of the operation an fx node calls, as the analysis rules are keyed (one place for every stage)."""

from __future__ import annotations

import operator

import torch.fx as fx

_ALIASES = {"concat": "cat", "concatenate": "cat"}


def op_name(node: fx.Node) -> str:
    """``"add"`` for ``x.add(y)``, ``torch.add`` and ``operator.add`` alike; ``""`` for nodes that call nothing
    by name (inputs, attributes, modules, the output)."""
    if node.op == "call_method":
        return node.target
    if node.op != "call_function":
        return ""
    if node.target is operator.getitem:
        return "getitem"
    name = getattr(node.target, "__name__", str(node.target))
    return _ALIASES.get(name, name)
