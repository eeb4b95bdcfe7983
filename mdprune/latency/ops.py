"""Build one op in isolation, at given widths, ready to time: what a latency table entry measures."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.registry import latency_op, latency_ops
from .backends import tensors_in

# The role order of each op kind: a table entry's key lists widths in this order. Convolutions, linear layers
# and the kinds users register keep theirs (and their builders) with their layer kind (mdprune/layers).
_ROLES: dict[str, tuple[str, ...]] = {"attention": ("heads", "qk", "v"), "node": ("width",)}


class _Roles(Mapping[str, tuple[str, ...]]):
    """Op kind -> its roles: attention and node ops here, the others from the layer registry."""

    def __getitem__(self, kind: str) -> tuple[str, ...]:
        if kind in _ROLES:
            return _ROLES[kind]
        op = latency_op(kind)
        if op is None:
            raise KeyError(kind)
        return op.roles

    def __iter__(self) -> Iterator[str]:
        return iter({**dict.fromkeys(latency_ops()), **dict.fromkeys(_ROLES)})

    def __len__(self) -> int:
        return len(set(latency_ops()) | set(_ROLES))


ROLES: Mapping[str, tuple[str, ...]] = _Roles()


def _fill(m: nn.Module) -> nn.Module:
    """Random weights and statistics: values do not matter for speed, but denormals and NaNs would."""
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
        for name, b in m.named_buffers():
            if b.is_floating_point():
                b.uniform_(0.5, 1.5) if name.endswith("running_var") else b.normal_(0, 0.1)
    return m.eval()


class AttentionCore(nn.Module):
    """The part of :class:`mdprune.PrunedAttention` between the projections: softmax(q k^T) v, merged heads.

    Takes q, k, v as the projections lay them out, (batch, tokens, heads, width), so the strided views and any
    copies the attention kernel makes of them are timed as in the slim model; with ``bias`` also an additive
    (1, heads, tokens, tokens) bias (relative position bias, window masks), with ``rope`` a rotary embedding of
    q and k (its (tokens, 2 x width) sin and cos), with ``cosine`` Swin V2's cosine attention (a (heads, 1, 1)
    logit scale), in that order after v.
    """

    def __init__(self, bias: bool = False, rope: bool = False, cosine: bool = False):
        super().__init__()
        self.bias, self.rope, self.cosine = bias, rope, cosine

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        (b, n, h, _), dv = q.shape, v.shape[-1]
        rest = list(extra)
        bias = rest.pop(0) if self.bias else None
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.rope:
            rope = rest.pop(0)
            q, k = _rotate(q, rope), _rotate(k, rope)
        if self.cosine:
            q, k = F.normalize(q, dim=-1) * rest.pop(0).clamp(max=4.6).exp(), F.normalize(k, dim=-1)
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
    bias, rope, cosine = bool(fixed.get("bias")), bool(fixed.get("rope")), bool(fixed.get("cosine"))
    inputs = [torch.randn(b, n, w["heads"], w["qk"]), torch.randn(b, nk, w["heads"], w["qk"]),
              torch.randn(b, nk, w["heads"], w["v"])]
    if bias:
        inputs.append(torch.randn(1, w["heads"], n, nk))
    if rope:
        inputs.append(torch.randn(n, 2 * w["qk"]))
    if cosine:
        inputs.append(torch.randn(w["heads"], 1, 1))
    return AttentionCore(bias, rope, cosine), tuple(inputs)


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


_BUILDERS = {"attention": _attention, "node": _node}


def op_module(kind: str, fixed: dict[str, Any], widths: dict[str, int], batch: int, device: str = "cpu",
              dtype: torch.dtype = torch.float32) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """An op of ``kind`` with signature ``fixed`` at ``widths``, and inputs of batch ``batch``.

    Built directly on ``device`` (weights and random inputs drawn there: no host-side random numbers copied
    over, which at a large batch costs far more than timing on a GPU), then cast to ``dtype``.
    """
    op = latency_op(kind)
    build = op.build if op is not None else _BUILDERS.get(kind)
    if build is None:
        raise ValueError(f"no latency builder for op kind {kind!r}")
    with torch.device(device):
        module, inputs = build(fixed, widths, batch)
        module = _fill(module).to(device=device, dtype=dtype)
    return module, tuple(x.to(device=device, dtype=dtype) for x in inputs)


def op_bytes(kind: str, fixed: dict[str, Any], widths: dict[str, int], batch: int,
             dtype: torch.dtype = torch.float32) -> tuple[int, int]:
    """Memory of one op point, from a build on the ``meta`` device (nothing allocated): what stays allocated
    while its chunk is measured (weights and inputs), and what one call adds while it runs (its outputs).
    A builder that cannot run on ``meta`` is sized by its weights and inputs, the output taken as large as
    its largest input."""
    size = torch.empty((), dtype=dtype).element_size()
    try:
        module, inputs = op_module(kind, fixed, widths, batch, "meta", dtype)
    except Exception:  # noqa: BLE001 - sizing must not stop a build: the caller measures such a point alone
        return -1, -1
    held = sum(t.numel() for t in [*module.parameters(), *module.buffers(), *inputs]) * size
    try:
        with torch.no_grad():
            out = module(*inputs)
        running = sum(t.numel() for t in tensors_in(out)) * size
    except Exception:  # noqa: BLE001 - an op that cannot run on meta: estimate its output by its inputs
        running = max((t.numel() for t in inputs), default=0) * size
    return held, running
