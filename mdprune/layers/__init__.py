"""Layer kinds: one module per family (conv, linear, norm, passthrough, recurrent, ...), each holding its channel
rule, slim resize and latency op; :func:`register_layer` teaches mdprune a layer of your own.

Attention modules are matched by structure rather than by type, so they keep their own home:
``mdprune/space/attention.py`` (adapters: channels and latency op) and ``mdprune/apply/attention.py`` (slim).
"""

from ..space.errors import AnalysisError
from ..space.functions import mark_normalized
from ..space.values import Chan, RawSeg
from .masked_norm import MaskedRMSNorm
from .registry import ChannelRule, LatencyOp, LayerKind, latency_op, layer_kind, register_layer
from .rules import add_op, bind, input_channels, input_shape, new_channels, output_shape, require_axis

__all__ = ["AnalysisError", "Chan", "ChannelRule", "LatencyOp", "LayerKind", "MaskedRMSNorm", "RawSeg", "add_op",
           "bind", "input_channels", "input_shape", "latency_op", "layer_kind", "mark_normalized", "new_channels",
           "output_shape", "register_layer", "require_axis"]
