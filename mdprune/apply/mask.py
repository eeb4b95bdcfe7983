"""Masked application, for training-time pruning: pruned slices held at zero, removed blocks gated off.

The masked model has the dense shapes, so its optimizer and checkpoints stay valid while the plan changes.
It computes exactly what the slim model of the same plan computes: pruned slices are zeroed on both the
producing and the consuming side, LayerNorms over pruned features normalise over the kept ones only, and
the branch of a removed block is multiplied by a gate of 0.
"""

from __future__ import annotations

import operator
import re
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..layers.masked_norm import KeepMask, masked_rms_norm
from ..layers.registry import layer_kind
from ..space import Plan, PruningSpace
from ..space.functions import NODE_KEY
from .indices import Positions

GATES = "mdprune_gates"
NORM_CALLS = "mdprune_norms"  # masked layer_norm calls (norm modules traced into)


class MaskedLayerNorm(nn.LayerNorm):
    """LayerNorm over the kept features only; pruned features come out as zero."""

    def __init__(self, ln: nn.LayerNorm):
        super().__init__(ln.normalized_shape, ln.eps, ln.elementwise_affine, bias=ln.bias is not None,
                         device=_device(ln), dtype=_dtype(ln))
        self.load_state_dict(ln.state_dict())
        self.register_buffer("keep", torch.ones(ln.normalized_shape, device=_device(ln)))
        self.full = True

    def set_keep(self, keep: torch.Tensor) -> None:
        self.keep.copy_(keep.to(self.keep))
        self.full = bool(keep.all())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.full:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return masked_layer_norm(x, self.keep, self.weight, self.bias, self.eps)


class MaskedLayerNormAct(MaskedLayerNorm):
    """A masked norm + drop + activation module (timm's ``LayerNormAct``): the same drop and act after the norm."""

    def __init__(self, ln: nn.LayerNorm):
        super().__init__(ln)
        self.drop = getattr(ln, "drop", None) or nn.Identity()
        self.act = getattr(ln, "act", None) or nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def _masked_norm_module(ln: nn.Module) -> nn.Module:
    """The masked model's stand-in for a norm over pruned features: its layer kind's ``masked``, or for a
    LayerNorm (timm's norm + act included) a :class:`MaskedLayerNorm`."""
    kind = layer_kind(ln)
    if kind is not None and kind.masked is not None:
        return kind.masked(ln)
    if not isinstance(ln, nn.LayerNorm):
        raise TypeError(f"{type(ln).__name__} normalises over pruned features, but its layer kind gives no masked "
                        "stand-in (register_layer(..., masked=...))")
    has_post = any(isinstance(getattr(ln, a, None), nn.Module) for a in ("drop", "act"))
    return MaskedLayerNormAct(ln) if has_post else MaskedLayerNorm(ln)


class MaskedLayerNormCall(nn.Module):
    """A ``layer_norm`` function call (inside a norm module that was traced into) over the kept features only."""

    def __init__(self, width: int, device: torch.device | None = None):
        super().__init__()
        self.register_buffer("keep", torch.ones(width, device=device))
        self.full = True

    set_keep = MaskedLayerNorm.set_keep

    def forward(self, x: torch.Tensor, normalized_shape: Any, weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
        if self.full:
            return F.layer_norm(x, normalized_shape, weight, bias, eps)
        return masked_layer_norm(x, self.keep, weight, bias, eps)


class MaskedRMSNormCall(KeepMask):
    """An ``rms_norm`` function call (a norm traced into, or the user's own code) over the kept features only."""

    def forward(self, x: torch.Tensor, normalized_shape: Any, weight: torch.Tensor | None = None,
                eps: float | None = None) -> torch.Tensor:
        return masked_rms_norm(x, self.keep, weight, eps)


def masked_layer_norm(x: torch.Tensor, keep: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      eps: float) -> torch.Tensor:
    """Layer norm over the last axis restricted to the features ``keep`` marks; the others come out as zero."""
    m = keep.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum(-1, keepdim=True) / n
    xc = (x - mean) * m
    y = xc * torch.rsqrt((xc * xc).sum(-1, keepdim=True) / n + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y * m


def _device(m: nn.Module) -> torch.device | None:
    p = next(m.parameters(), None)
    return p.device if p is not None else None


def _dtype(m: nn.Module) -> torch.dtype | None:
    p = next(m.parameters(), None)
    return p.dtype if p is not None else None


def gate_name(block: str) -> str:
    return re.sub(r"\W", "_", block)


def prepare_masked(space: PruningSpace, model: nn.Module | None = None) -> fx.GraphModule:
    """A copy of the traced model ready for masks: a gate on every block branch, masked LayerNorms.

    Weights come from ``model`` if given (same parameter names as the analysed model).
    """
    from .slim import load_dense_weights

    gm = load_dense_weights(space, model)
    gates = nn.Module()
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    device = next(gm.parameters()).device
    for b in space.blocks.values():
        gates.register_buffer(gate_name(b.name), torch.ones((), device=device))
    gm.add_submodule(GATES, gates)
    for b in space.blocks.values():
        branch, add = nodes[b.branch_node], nodes[b.add_node]
        with graph.inserting_before(add):
            g = graph.get_attr(f"{GATES}.{gate_name(b.name)}")
            gated = graph.call_function(operator.mul, (branch, g))
        add.replace_input_with(branch, gated)
    calls = nn.Module()
    for path in space.normalized:
        if path.startswith(NODE_KEY):
            _mask_call(nodes[path[len(NODE_KEY):]], calls, device)
            continue
        owner, _, attr = path.rpartition(".")
        parent = gm.get_submodule(owner) if owner else gm
        setattr(parent, attr, _masked_norm_module(gm.get_submodule(path)))
    if len(calls._modules):
        gm.add_submodule(NORM_CALLS, calls)
    gm.recompile()
    return gm


def _mask_call(node: fx.Node, calls: nn.Module, device: torch.device) -> None:
    """Turn a ``layer_norm`` (``rms_norm``) call into a call of a :class:`MaskedLayerNormCall`
    (:class:`MaskedRMSNormCall`): same node, same name."""
    rms = getattr(node.target, "__name__", "") == "rms_norm"
    names = ("input", "normalized_shape", "weight", "eps") if rms else ("input", "normalized_shape", "weight", "bias",
                                                                         "eps")
    a = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    ns = a["normalized_shape"]
    width = ns if isinstance(ns, int) else ns[-1]
    calls.add_module(node.name, MaskedRMSNormCall(width, device) if rms else MaskedLayerNormCall(width, device))
    node.op, node.target = "call_module", f"{NORM_CALLS}.{node.name}"
    node.args, node.kwargs = tuple(a.get(n) for n in names[:-1]) + (a.get("eps", None if rms else 1e-5),), {}


def _norm_module(model: nn.Module, path: str) -> nn.Module:
    if path.startswith(NODE_KEY):
        return model.get_submodule(f"{NORM_CALLS}.{path[len(NODE_KEY):]}")
    return model.get_submodule(path)


def tensor_masks(space: PruningSpace, plan: Plan) -> dict[str, dict[int, torch.Tensor]]:
    """For every tensor the plan prunes: axis -> boolean mask over that axis (True where kept)."""
    pos = Positions(space, plan)
    masks: dict[str, dict[int, torch.Tensor]] = {}
    for t in space.tensors.values():
        axes = {axis: pos.axis_mask(segs) for axis, segs in t.axes.items()}
        axes = {a: m for a, m in axes.items() if not m.all()}
        if axes:
            masks[t.name] = axes
    return masks


def zero_pruned_(t: torch.Tensor, axes: dict[int, torch.Tensor]) -> None:
    """Zero, in place, every slice of ``t`` that an axis mask drops."""
    for axis, keep in axes.items():
        view = [1] * t.dim()
        view[axis] = -1
        t.mul_(keep.view(view) if keep.dtype == t.dtype and keep.device == t.device else
               keep.to(device=t.device, dtype=t.dtype).view(view))


@torch.no_grad()
def apply_masks_(model: fx.GraphModule, space: PruningSpace, plan: Plan) -> dict[str, dict[int, torch.Tensor]]:
    """Zero what ``plan`` prunes in a model made by :func:`prepare_masked`; set gates and LayerNorm masks.

    Returns the tensor masks, each on its tensor's device (copied there once, not on every hold), so a
    training loop can hold gradients and optimizer state at zero too.
    """
    plan.validate(space)
    named = dict(model.named_parameters()) | dict(model.named_buffers())
    masks = {name: {a: m.to(named[name].device, non_blocking=True) for a, m in axes.items()}
             for name, axes in tensor_masks(space, plan).items()}
    for name, axes in masks.items():
        zero_pruned_(named[name], axes)
    removed = set(plan.removed)
    gates = model.get_submodule(GATES)
    for b in space.blocks:
        getattr(gates, gate_name(b)).fill_(0.0 if b in removed else 1.0)
    pos = Positions(space, plan)
    for path, segs in space.normalized.items():
        _norm_module(model, path).set_keep(pos.axis_mask(segs))
    return masks


def masked(space: PruningSpace, plan: Plan, model: nn.Module | None = None) -> fx.GraphModule:
    """A masked copy of the model for ``plan`` (dense shapes; equal in output to the slim model)."""
    gm = prepare_masked(space, model)
    apply_masks_(gm, space, plan)
    return gm
