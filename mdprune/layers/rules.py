"""What a channel rule needs: its input's channels, new channel spaces, tensor bindings and latency ops.

A rule is called as ``rule(prop, node, module)`` while the analysis walks the traced graph: ``node`` is the
module's call (``node.target`` its path in the model), ``prop`` the running analysis. It returns the value of
the layer's output (a :class:`Chan`: the axis that carries channels and what they are made of) after recording,
through these helpers, which tensor axes follow which channels and what the layer costs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch.fx as fx

from ..space.errors import AnalysisError, where
from ..space.values import Chan, ParamRef, RawSeg
from .registry import latency_op, layer_kind

if TYPE_CHECKING:
    from ..space.channels import Propagation

Segs = tuple[RawSeg, ...]


def input_shape(node: fx.Node, index: int = 0) -> tuple[int, ...]:
    """The shape of the node's argument ``index`` as the example input ran (a tensor argument's)."""
    return node.args[index].meta["mdp_shape"]


def output_shape(node: fx.Node) -> tuple[int, ...]:
    """The shape of the node's output as the example input ran."""
    return node.meta["mdp_shape"]


def chan_input(prop: Propagation, node: fx.Node, what: str) -> tuple[Chan, tuple[int, ...]]:
    """The channel value of a node's first argument, with its shape; an error if it has none."""
    arg = node.args[0]
    v = prop.value(arg)
    if not isinstance(v, Chan):
        raise AnalysisError(f"{where(node)}: cannot tell which axis of its input carries {what}")
    return v, arg.meta["mdp_shape"]


def chan_or_fixed_input(prop: Propagation, node: fx.Node, what: str, axis: int, positions_elsewhere: bool = False
                        ) -> tuple[Chan, tuple[int, ...]]:
    """The input's channels; for a tensor the model computes without any (relative coordinates fed to a position
    MLP, a Fourier position encoding, attention scores), or a buffer, its ``axis`` is a fixed width: kept whole,
    while the layer's outputs stay prunable. With ``positions_elsewhere`` (a layer that treats every other axis
    as positions: a convolution), channels found on another axis are kept whole and the input read as fixed."""
    arg = node.args[0]
    shape = arg.meta.get("mdp_shape") if isinstance(arg, fx.Node) else None
    v = prop.value(arg)
    if isinstance(v, ParamRef):  # a buffer of coordinates, a table: read whole
        prop.unpruned_params.append((v.tensor, node, None))
        v = None
    if positions_elsewhere and isinstance(v, Chan) and isinstance(shape, tuple) and v.axis != axis % len(shape):
        # (BAT's per-channel transforms end with channels on the last axis, where a 1x1 conv sees width): kept
        # whole, the tensor never changes, so the layer reads it as fixed
        prop.protect(v.segs, f"{where(node)} reads them on axis {v.axis}, where it expects positions")
        v = None
    if v is None and isinstance(shape, tuple) and arg.name not in prop.failed:
        reason = f"{where(node)} reads a tensor without channels (computed in the model)"
        sid = prop.new_space(shape[axis], "input", f"{node.target}:in", reason)
        return Chan(axis % len(shape), (RawSeg((sid,)),)), shape
    return chan_input(prop, node, what)


def require_axis(node: fx.Node, x: Chan, axis: int, shape: tuple[int, ...], what: str = "channels") -> None:
    """An error naming the layer unless ``x``'s channels sit on ``axis`` (negative counts from the end)."""
    if x.axis != axis % len(shape):
        raise AnalysisError(f"{where(node)} expects {what} on axis {axis}, but they are on axis {x.axis}")


def input_channels(prop: Propagation, node: fx.Node, axis: int | None = None, what: str = "channels") -> Chan:
    """The channels of the layer's (first) input; with ``axis``, an error unless they sit on that axis."""
    x, shape = chan_input(prop, node, what)
    if axis is not None:
        require_axis(node, x, axis, shape, what)
    return x


def new_channels(prop: Propagation, node: fx.Node, size: int, kind: str = "channel",
                 protected: str | None = None) -> Segs:
    """Open a new channel space of ``size`` elements, named after the layer: the channels a layer creates
    (a convolution's or linear layer's outputs). ``kind`` picks the default pruning step and importance
    criterion (``"channel"``, ``"linear"``, ``"mlp"``, ...); ``protected`` (a reason) keeps it whole."""
    return (RawSeg((prop.new_space(size, kind, str(node.target), protected),)),)


def bind(prop: Propagation, node: fx.Node, tensor: str, axis: int, segs: Segs, role: str) -> None:
    """Record that axis ``axis`` of the layer's tensor ``tensor`` (a parameter or buffer name within the module,
    e.g. ``"weight"``) is made of the channels ``segs``: masks zero those slices, the slim model keeps the kept
    positions, and parameter counts follow. Binding an axis twice ties its channels.

    ``role`` says how the axis relates to the channels, and so where importance is read: ``"out"`` (the layer
    produces them), ``"in"`` (it consumes them), ``"affine"`` (a per-channel scale or shift: a channel's gate
    gradient is read here first), ``"norm"`` (a LayerNorm's), ``"stat"`` (running statistics, never read) or
    ``"param"`` (a free parameter).
    """
    prop.bind(f"{node.target}.{tensor}", axis, segs, node, role)


def add_op(prop: Propagation, node: fx.Node, roles: dict[str, Chan | Segs], fixed: dict[str, Any],
           kind: str | None = None) -> None:
    """Record the layer's latency op: ``roles`` maps each role of its :class:`~mdprune.layers.LatencyOp` to the
    channels that set that width; ``fixed`` holds what else sets its cost (JSON values, given back to its
    ``build`` and ``macs``; ``batch`` defaults to the analysed batch size). Ops of one kind with equal ``fixed``
    share their latency table entries. ``kind`` defaults to the layer's registered kind."""
    if kind is None:
        lk = layer_kind(prop.gm.get_submodule(str(node.target)))
        if lk is None or lk.latency is None:
            raise AnalysisError(f"{where(node)}: its layer kind has no latency op (register_layer(latency=...))")
        kind = lk.name
    op = latency_op(kind)
    if op is not None and set(roles) != set(op.roles):
        raise AnalysisError(f"{where(node)}: its {kind!r} op has roles {list(op.roles)}, not {list(roles)}")
    segs = {r: v.segs if isinstance(v, Chan) else v for r, v in roles.items()}
    fixed = dict(fixed)
    fixed.setdefault("batch", prop.batch)
    prop.add_op(str(node.target), kind, segs, fixed, node)


def tokens_and_batch(prop: Propagation, in_shape: tuple[int, ...]) -> tuple[int, int]:
    """Rows per image and images of a tensor whose last axis is features (a linear layer's input)."""
    rows = math.prod(in_shape[:-1])
    batch = prop.batch if prop.batch and rows % prop.batch == 0 else 1
    return rows // batch, batch
