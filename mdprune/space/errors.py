"""The error mdprune raises for models it cannot prune safely, and how it names the place."""

from __future__ import annotations

import torch.fx as fx


class AnalysisError(RuntimeError):
    """A model (or part of one) that mdprune cannot prune safely. The message names the module and the op."""


def where(n: fx.Node) -> str:
    """Human-readable location of a node: its module path and what it calls."""
    if n.op == "call_module":
        return f"module '{n.target}'"
    stack = n.meta.get("nn_module_stack") or {}
    module = next(reversed(stack.values()))[0] if stack else ""
    target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
    return f"op '{target}' (node {n.name}) in module '{module or '<top level>'}'"
