"""The error mdprune raises for models it cannot prune safely, and how it names the place."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch.fx as fx

# the messages of the guards the tracer writes where it fixed a shape-dependent branch or number to the example's
GUARD = "mdprune traced this model for the example input's shapes, and this shape-dependent branch now goes the " \
    "other way"
NUMBER_GUARD = "mdprune traced this model for the example input's shapes, and a number computed from them (int(), " \
    "float()) now differs"


@dataclass(frozen=True)
class Problem:
    """One place mdprune cannot follow: what and where, and the module to keep whole (None: the model itself)."""

    message: str
    module: str | None
    node: str | None = None  # the fx node, while the analysis runs


class AnalysisError(RuntimeError):
    """A model (or part of one) that mdprune cannot prune safely. The message names the module and the op.

    ``problems`` lists every unsupported place found in the model (empty for errors not tied to a place);
    ``str(e)`` gives the ways out as Python arguments, :meth:`for_cli` as command-line flags.
    """

    def __init__(self, message: str, problems: Sequence[Problem] = (), model: str = "the model"):
        self.problems = list(problems)
        self.model = model
        self.message = message
        super().__init__(self._text(cli=False))

    def _text(self, cli: bool) -> str:
        if not self.problems:
            return _cli(self.message) if cli else self.message
        if len(self.problems) == 1:
            head = self.problems[0].message
        else:
            head = f"mdprune cannot follow {len(self.problems)} places in {self.model}:\n" + "\n".join(
                f"  - {p.message}" for p in self.problems)
        return (_cli(head) if cli else head) + "\n" + ways_out(self.problems, cli)

    def for_cli(self) -> str:
        """The message with the command line's ways out (``--ignore MODULE``, ``--keep-unsupported``)."""
        return self._text(cli=True)


def ways_out(problems: Sequence[Problem], cli: bool) -> str:
    """What the user can do about ``problems``: keep their modules whole, by name or automatically."""
    modules = list(dict.fromkeys(p.module for p in problems if p.module))
    lines = []
    if modules:
        named = " ".join(f"--ignore {m}" for m in modules) if cli else f"ignored_layers={modules}"
        these = "this module" if len(modules) == 1 else "these modules"
        lines.append(f"Ways out: keep {these} (and every channel they touch) unpruned with {named}, or "
                     + ("--keep-unsupported" if cli else "unsupported='keep'") + " to keep every unsupported "
                     "module whole automatically (with a warning listing them).")
    if any(p.module is None for p in problems):
        lines.append(("Ops in the model's own forward cannot be kept whole by name; " if modules else
                      "Ways out: these ops are in the model's own forward, so no module can be kept whole; ") +
                     ("--keep-unsupported" if cli else "unsupported='keep'") +
                     " keeps every channel through them unpruned, or move them into a submodule.")
    return "\n".join(lines)


def _cli(text: str) -> str:
    """Python's ``ignored_layers=['m']`` as the command line's ``--ignore m``."""
    text = re.sub(r"ignored_layers=\['([^']*)'\]", r"--ignore \1", text)
    return text.replace("ignored_layers", "--ignore")


def where(n: fx.Node) -> str:
    """Human-readable location of a node: its module path and what it calls."""
    if n.op == "call_module":
        return f"module '{n.target}'"
    module = owner(n)
    target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
    return f"op '{target}' (node {n.name}) in module '{module or '<top level>'}'"


def owner(n: fx.Node) -> str:
    """The innermost module whose forward made node ``n`` ('' for the model's own forward)."""
    if n.op == "call_module":
        return str(n.target)
    stack = n.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""
