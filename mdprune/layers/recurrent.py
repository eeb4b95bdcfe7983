"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``; Sequencer's token mixers): the input features prune,
the hidden state is kept whole.

The input features are axis 1 of every layer-0 ``weight_ih`` (both directions). The hidden width would have to
follow through the gates, the recurrence and every later layer's input; it is kept whole, so the output
(``directions x hidden`` features on the last axis) is a fixed width. The latency op is the layer at its input
width, and its MACs are the two products per step and direction (PyTorch's FlopCounterMode counts none for a
CPU LSTM, whose kernel is fused, and every one for GRU and RNN).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn

from ..space.values import Chan, Several
from .registry import LatencyOp, LayerKind, builtin
from .rules import add_op, bind, input_channels, new_channels, tokens_and_batch

if TYPE_CHECKING:
    from ..space.channels import Propagation

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def recurrent_channels(prop: Propagation, node: fx.Node, m: nn.RNNBase) -> Several:
    x = input_channels(prop, node, -1, "features")
    shape = node.args[0].meta["mdp_shape"]
    for suffix in ("", "_reverse") if m.bidirectional else ("",):
        bind(prop, node, f"weight_ih_l0{suffix}", 1, x.segs, "in")
    directions = 2 if m.bidirectional else 1
    out = new_channels(prop, node, directions * m.hidden_size, "channel",
                       protected=f"hidden state of {node.target} (recurrent widths are kept whole)")
    seq_axis = 1 if m.batch_first and len(shape) == 3 else 0
    sequences = 1 if len(shape) == 2 else shape[1 - seq_axis]
    per_image, batch = tokens_and_batch(prop, (sequences, shape[-1]))
    fixed = {"mode": m.mode, "hidden": m.hidden_size, "layers": m.num_layers, "bidirectional": m.bidirectional,
             "bias": m.bias, "seq": shape[seq_axis], "per_image": per_image, "batch": batch}
    add_op(prop, node, {"in": x}, fixed)
    return Several((Chan(len(shape) - 1, out), None))


def resize_recurrent(new: nn.RNNBase, old: nn.RNNBase) -> None:
    new.input_size = new.weight_ih_l0.shape[1]
    new._init_flat_weights()  # the kernel reads the flat list, not the attributes


def build_recurrent(fixed: dict[str, Any], w: dict[str, int], batch: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    cls = {"LSTM": nn.LSTM, "GRU": nn.GRU}.get(fixed["mode"], nn.RNN)
    extra = {"nonlinearity": "relu" if fixed["mode"] == "RNN_RELU" else "tanh"} if cls is nn.RNN else {}
    layer = cls(w["in"], fixed["hidden"], fixed["layers"], bias=fixed["bias"], batch_first=True,
                bidirectional=fixed["bidirectional"], **extra)
    return layer, (torch.randn(batch * fixed["per_image"], fixed["seq"], w["in"]),)


def recurrent_macs(f: dict[str, Any], w: dict[str, int]) -> int:
    d, h = (2 if f["bidirectional"] else 1), f["hidden"]
    steps = f["batch"] * f["per_image"] * f["seq"]
    return sum(d * steps * _GATES[f["mode"]] * h * ((w["in"] if layer == 0 else d * h) + h)
               for layer in range(f["layers"]))


RECURRENT = builtin(LayerKind("recurrent", (nn.LSTM, nn.GRU, nn.RNN), recurrent_channels, resize_recurrent,
                              LatencyOp(("in",), build_recurrent, recurrent_macs),
                              accepts=lambda m: getattr(m, "proj_size", 0) == 0))
