"""Build one op in isolation, at given widths, ready to time: what a latency table entry measures."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# The role order of each op kind: a table entry's key lists widths in this order.
ROLES: dict[str, tuple[str, ...]] = {"conv2d": ("in", "out"), "linear": ("in", "out"),
                                     "attention": ("heads", "qk", "v"), "node": ("width",)}

_EPILOGUE: dict[str, Callable[[int], nn.Module]] = {
    "bn2d": nn.BatchNorm2d, "bn1d": nn.BatchNorm1d, "relu": lambda _: nn.ReLU(inplace=True),
    "relu6": lambda _: nn.ReLU6(inplace=True), "gelu": lambda _: nn.GELU(), "silu": lambda _: nn.SiLU(),
    "hardswish": lambda _: nn.Hardswish(), "sigmoid": lambda _: nn.Sigmoid(), "tanh": lambda _: nn.Tanh(),
}


def _fill(m: nn.Module) -> nn.Module:
    """Random weights and statistics: values do not matter for speed, but denormals and NaNs would."""
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
        for name, b in m.named_buffers():
            if b.is_floating_point():
                b.uniform_(0.5, 1.5) if name.endswith("running_var") else b.normal_(0, 0.1)
    return m.eval()


def _conv(fixed: dict[str, Any], w: dict[str, int], batch: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    cin, cout = w["in"], w["out"]
    if fixed["depthwise"]:
        groups = cin
        if cin != cout:
            raise ValueError(f"a depthwise convolution keeps in == out widths, got {cin} and {cout}")
    else:
        groups = fixed["groups"]
    conv = nn.Conv2d(cin, cout, fixed["kernel"], fixed["stride"], fixed["padding"], fixed["dilation"], groups,
                     bias=fixed["bias"])
    layers = [conv] + [_EPILOGUE[e](cout) for e in fixed.get("epilogue", ())]
    return nn.Sequential(*layers), (torch.randn(batch, cin, *fixed["in_hw"]),)


def _linear(fixed: dict[str, Any], w: dict[str, int], batch: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    lin = nn.Linear(w["in"], w["out"], bias=fixed["bias"])
    layers = [lin] + [_EPILOGUE[e](w["out"]) for e in fixed.get("epilogue", ())]
    shape = (batch, w["in"]) if fixed.get("rank", 3) == 2 else (batch, fixed["tokens"], w["in"])
    return nn.Sequential(*layers), (torch.randn(shape),)


class AttentionCore(nn.Module):
    """The part of :class:`mdprune.PrunedAttention` between the projections: softmax(q k^T) v, merged heads.

    Takes q, k, v as the projections lay them out, (batch, tokens, heads, width), so the strided views and any
    copies the attention kernel makes of them are timed as in the slim model; with ``bias`` also an additive
    (1, heads, tokens, tokens) bias (relative position bias, window masks), with ``rope`` a rotary embedding of
    q and k (its (tokens, 2 x width) sin and cos), in that order after v.
    """

    def __init__(self, bias: bool = False, rope: bool = False):
        super().__init__()
        self.bias, self.rope = bias, rope

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        (b, n, h, _), dv = q.shape, v.shape[-1]
        rest = list(extra)
        bias = rest.pop(0) if self.bias else None
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.rope:
            q, k = _rotate(q, rest[0]), _rotate(k, rest[0])
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return o.transpose(1, 2).reshape(b, n, h * dv)


def _rotate(t: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    sin, cos = rope.chunk(2, -1)
    rot = torch.stack([-t[..., 1::2], t[..., ::2]], -1).reshape(t.shape)
    return t * cos + rot * sin


def _attention(fixed: dict[str, Any], w: dict[str, int], batch: int
               ) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    n, b = fixed["tokens"], batch * fixed.get("windows", 1)  # windowed attention: windows x images
    nk = fixed.get("tokens_kv", n)  # keys and values from more tokens than the queries (LeViT's downsampling)
    bias, rope = bool(fixed.get("bias")), bool(fixed.get("rope"))
    inputs = [torch.randn(b, n, w["heads"], w["qk"]), torch.randn(b, nk, w["heads"], w["qk"]),
              torch.randn(b, nk, w["heads"], w["v"])]
    if bias:
        inputs.append(torch.randn(1, w["heads"], n, nk))
    if rope:
        inputs.append(torch.randn(n, 2 * w["qk"]))
    return AttentionCore(bias, rope), tuple(inputs)


class NodeReplay(nn.Module):
    """Re-runs one recorded graph node (a function, a tensor method or a small module) on given tensors."""

    def __init__(self, fixed: dict[str, Any], width: int):
        super().__init__()
        self.call, self.args, self.kwargs = fixed["call"], fixed["args"], fixed["kwargs"]
        if self.call == "module":
            self.module = _node_module(fixed["target"], fixed["config"], width)
        elif self.call == "function":
            mod, _, name = fixed["target"].rpartition(".")
            self.fn = getattr(importlib.import_module(mod), name)
        else:
            self.method = fixed["target"]

    def forward(self, *tensors: torch.Tensor) -> Any:
        it = iter(tensors)
        args = [next(it) if _is_tensor(a) else _tuple(a) for a in self.args]
        kwargs = {k: next(it) if _is_tensor(v) else _tuple(v) for k, v in self.kwargs.items()}
        if self.call == "module":
            return self.module(*args, **kwargs)
        if self.call == "function":
            return self.fn(*args, **kwargs)
        return getattr(args[0], self.method)(*args[1:], **kwargs)


def _is_tensor(a: Any) -> bool:
    return isinstance(a, dict) and "shape" in a


def _tuple(a: Any) -> Any:
    return tuple(_tuple(x) for x in a) if isinstance(a, list) else a


def _node_module(kind: str, config: dict[str, Any], width: int) -> nn.Module:
    cfg = {k: _tuple(v) for k, v in config.items()}
    if kind in ("BatchNorm2d", "BatchNorm1d"):
        return getattr(nn, kind)(width, **cfg)
    if kind == "LayerNorm":
        return nn.LayerNorm(width, **cfg)
    return getattr(nn, kind)(**cfg)


def _node(fixed: dict[str, Any], w: dict[str, int], batch: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    inputs = []
    for a in [*fixed["args"], *fixed["kwargs"].values()]:
        if _is_tensor(a):
            shape = [w["width"] if d == -1 else d for d in a["shape"]]
            if a["batched"]:
                shape[0] = batch
            inputs.append(torch.randn(shape))
    return NodeReplay(fixed, w["width"]), tuple(inputs)


_BUILDERS = {"conv2d": _conv, "linear": _linear, "attention": _attention, "node": _node}


def op_module(kind: str, fixed: dict[str, Any], widths: dict[str, int], batch: int, device: str = "cpu",
              dtype: torch.dtype = torch.float32) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """An op of ``kind`` with signature ``fixed`` at ``widths``, and inputs of batch ``batch``."""
    if kind not in _BUILDERS:
        raise ValueError(f"no latency builder for op kind {kind!r}")
    module, inputs = _BUILDERS[kind](fixed, widths, batch)
    module = _fill(module).to(device=device, dtype=dtype)
    return module, tuple(x.to(device=device, dtype=dtype) for x in inputs)
