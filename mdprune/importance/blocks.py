"""Where each removable block's gate gradient is read from.

A block ``y = s(x) + f(x)`` is scored by a gate ``g`` on its branch output, ``y = s(x) + g * f(x)`` at ``g = 1``:
``dL/dg = sum(f * dL/df)``, the first-order change of the loss when the whole branch goes. Read, in this order:

- ``params``: the branch ends in a layer whose output is linear in its parameters (a convolution or linear
  layer, an affine BatchNorm/LayerNorm/GroupNorm, a LayerScale, a product with a parameter). Then
  ``sum(f * dL/df) = sum over that layer's parameters of p * dL/dp``: no gate, read from the gradients. Ops
  after that layer that are positively homogeneous of degree 1 in their single input (dropout, drop path,
  ReLU, pooling, reshapes, scaling by a constant) keep the identity (Euler: ``J(z) z = h(z)``) and are
  looked through, provided each value on the way feeds only the next op.
- ``hook``: otherwise, if the branch ends in a module (or an item of a module's tuple output, as
  ``nn.MultiheadAttention`` returns), a forward hook multiplies that output by a gate tensor of value 1 and
  autograd gives ``dL/dg``.
- ``gate``: otherwise, on a masked model (:func:`mdprune.apply.prepare_masked`), the gate the masked model
  already multiplies every branch by, made to require a gradient while probed.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..space import PruningSpace
from ..space.op_names import op_name


@dataclass(frozen=True)
class BlockProbe:
    """How block ``block``'s gate gradient is read: ``how`` is "params", "hook" or "gate" (module docstring)."""

    block: str
    how: str
    names: tuple[str, ...]  # parameter names; the module name; the gate buffer name
    index: int | None = None  # hook: the item of a tuple output that carries the branch


def _types(*paths: str) -> tuple[type, ...]:
    out = []
    for path in paths:
        module, _, name = path.rpartition(".")
        try:
            out.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):  # optional libraries
            continue
    return tuple(out)


# modules whose output is linear in their parameters (all of them), whatever the input: convolutions and linear
# layers (any subclass), and these exact types (a subclass of a norm may add an activation)
_LINEAR_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_LINEAR_IN_PARAMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm,
                     *_types("timm.layers.LayerScale", "timm.layers.LayerScale2d", "timm.layers.LayerNorm",
                             "timm.layers.LayerNorm2d"))


def _linear_in_params(m: nn.Module) -> bool:
    from ..apply.mask import MaskedLayerNorm  # the masked model's LayerNorm: still w * x_hat + b

    return isinstance(m, _LINEAR_LAYERS) or type(m) in (*_LINEAR_IN_PARAMS, MaskedLayerNorm)
# modules positively homogeneous of degree 1 in their input
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.ReLU, nn.LeakyReLU,
                 nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                 *_types("timm.layers.DropPath", "torchvision.ops.StochasticDepth"))
_PASS_FUNCTIONS = {"dropout", "drop_path", "stochastic_depth", "relu", "relu_", "leaky_relu", "contiguous",
                   "reshape", "view", "flatten", "permute", "transpose", "max_pool2d", "avg_pool2d",
                   "adaptive_avg_pool2d", "adaptive_max_pool2d", "clone"}


def block_probes(space: PruningSpace, model: nn.Module, blocks: list[str] | None = None,
                 use_params: bool = True) -> dict[str, BlockProbe | None]:
    """The probe of every removable block (or of ``blocks``) on ``model``; None where none applies.

    ``use_params=False`` skips the parameter form (hooks and gates only: the same value, to check one by the
    other).
    """
    names = blocks if blocks is not None else [b.name for b in space.removable_blocks()]
    g = space.module.graph
    nodes = {n.name: n for n in g.nodes}
    calls: dict[str, int] = {}
    for n in g.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    mods = dict(model.named_modules())
    params = dict(model.named_parameters())
    from ..apply.mask import GATES, gate_name

    gates = dict(mods[GATES].named_buffers()) if GATES in mods else {}
    out: dict[str, BlockProbe | None] = {}
    for b in names:
        end = _through(nodes[space.blocks[b].branch_node], space.module)
        probe = _probe(b, end, space.module, mods, params, calls, use_params)
        if probe is None and gate_name(b) in gates:
            probe = BlockProbe(b, "gate", (f"{GATES}.{gate_name(b)}",))
        out[b] = probe
    return out


def _through(n: fx.Node, gm: fx.GraphModule) -> fx.Node:
    """Walk back from the branch output through degree-1 homogeneous ops whose input feeds only them."""
    while True:
        x = _pass_input(n, gm)
        if x is None or len(x.users) != 1:
            return n
        n = x


def _pass_input(n: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    if n.op == "call_module":
        ok = isinstance(gm.get_submodule(n.target), _PASS_MODULES)
    elif n.op in ("call_function", "call_method"):
        name = op_name(n)
        scalars = [a for a in (*n.args[1:], *n.kwargs.values()) if not _is_tensor(a)]
        ok = name in _PASS_FUNCTIONS or (name in ("mul", "truediv") and len(n.args) == 2
                                         and all(isinstance(a, (int, float)) for a in scalars))
    else:
        return None
    tensors = [a for a in (*n.args, *n.kwargs.values()) if _is_tensor(a)]
    if not ok or len(tensors) != 1 or not n.args or n.args[0] is not tensors[0]:
        return None
    return tensors[0]


def _is_tensor(a: Any) -> bool:
    return isinstance(a, fx.Node) and isinstance(a.meta.get("mdp_shape"), tuple)


def _probe(b: str, end: fx.Node, gm: fx.GraphModule, mods: dict[str, nn.Module], params: dict[str, Any],
           calls: dict[str, int], use_params: bool) -> BlockProbe | None:
    if end.op == "call_module" and calls.get(end.target) == 1 and end.target in mods:
        m = mods[end.target]
        names = tuple(f"{end.target}.{k}" for k, _ in m.named_parameters())
        if use_params and _linear_in_params(m) and names and \
                all(k in params and params[k].requires_grad for k in names):
            return BlockProbe(b, "params", names)
        return BlockProbe(b, "hook", (end.target,))
    if end.op == "call_function" and end.target is operator.getitem and isinstance(end.args[1], int):
        src = end.args[0]
        items = [u.args[1] for u in src.users if u.op == "call_function" and u.target is operator.getitem]
        if (isinstance(src, fx.Node) and src.op == "call_module" and calls.get(src.target) == 1
                and src.target in mods and len(items) == len(src.users) and items.count(end.args[1]) == 1):
            return BlockProbe(b, "hook", (src.target,), end.args[1])
    if use_params and end.op in ("call_function", "call_method") and op_name(end) == "mul" and len(end.args) == 2:
        attrs = [a for a in end.args if isinstance(a, fx.Node) and a.op == "get_attr"]
        if len(attrs) == 1 and len(attrs[0].users) == 1 and attrs[0].target in params \
                and params[attrs[0].target].requires_grad and sum(isinstance(a, fx.Node) for a in end.args) == 2:
            return BlockProbe(b, "params", (attrs[0].target,))
    return None


class GateHooks:
    """Forward hooks that put a gate of value 1 on the probed modules' outputs, and the masked model's gates
    made to require a gradient; :meth:`take` reads ``dL/dg`` since the last call."""

    def __init__(self, model: nn.Module, probes: list[BlockProbe]):
        self.gates: dict[str, list[torch.Tensor]] = {p.block: [] for p in probes if p.how == "hook"}
        self.handles = []
        for p in probes:
            if p.how == "hook":
                self.handles.append(model.get_submodule(p.names[0]).register_forward_hook(self._hook(p)))
        buffers = dict(model.named_buffers())
        self.buffers = {p.block: buffers[p.names[0]] for p in probes if p.how == "gate"}
        for t in self.buffers.values():
            t.requires_grad_(True)

    def _hook(self, p: BlockProbe):
        def hook(module: nn.Module, args: Any, out: Any) -> Any:
            if not torch.is_grad_enabled():
                return None
            value = out if p.index is None else out[p.index]
            gate = torch.ones((), dtype=value.dtype, device=value.device, requires_grad=True)
            self.gates[p.block].append(gate)
            if p.index is None:
                return value * gate
            items = list(out)
            items[p.index] = value * gate
            return type(out)(items) if type(out) in (tuple, list) else tuple(items)
        return hook

    def take(self, block: str) -> torch.Tensor | None:
        """``dL/dg`` of ``block`` summed over the backward passes since the last call (None if none)."""
        if block in self.buffers:
            t = self.buffers[block]
            g, t.grad = t.grad, None
            return g
        gates, self.gates[block] = self.gates[block], []
        grads = [g.grad for g in gates if g.grad is not None]
        return torch.stack(grads).sum() if grads else None

    def close(self) -> None:
        """Remove the hooks; the masked model's gates stop requiring a gradient."""
        for h in self.handles:
            h.remove()
        self.handles = []
        for t in self.buffers.values():
            t.requires_grad_(False)
            t.grad = None
