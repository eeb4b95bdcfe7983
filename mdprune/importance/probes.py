"""Where each dimension's gate gradient is read from.

Multiplying the elements of a dimension by a gate ``g`` fixed at 1 and asking for ``dL/dg`` needs no gate in the
model: for a gate right after a layer that writes the dimension, ``dL/dg_e = sum over the slice of element e of
(p * dL/dp)`` over that layer's parameters. The slices used per dimension kind:

- ``channel``, ``linear``: the BatchNorm (gamma, beta) that follows the convolution (HALP/MDP's Taylor score);
  the producing layer's output slice where no BatchNorm exists;
- ``mlp``: the input columns of the layer that consumes the hidden activations (a gate after the activation);
- ``heads``: the output projection's input columns of each head (a gate on each head's output);
- ``qk``: the query rows of the input projection (a gate on each q/k column; gating q alone removes q.k);
- ``v``: the value rows of the input projection;
- ``embed``: every write to the residual stream (patch embedding, class and position tokens, each block's
  output projections), one gate shared by all of them.

The roles are those each layer kind's channel rule binds its tensors with (``mdprune.layers.bind``): a layer
registered by a user is read the same way (its per-channel scale bound as ``affine``, else its ``out`` slice).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..space import PruningSpace, Seg


@dataclass(frozen=True)
class Probe:
    """Read ``tensor`` along ``axis``, positions ``start:start + width`` (segment ``seg``), for dim ``dim``."""

    dim: str
    tensor: str
    axis: int
    start: int
    seg: Seg


def _seg_starts(space: PruningSpace, segs: tuple[Seg, ...]) -> list[tuple[int, Seg]]:
    sizes = space.dense_sizes()
    out, base = [], 0
    for s in segs:
        out.append((base, s))
        n = s.inner
        for d in s.dims:
            n *= sizes[d]
        base += n
    return out


def probes(space: PruningSpace, dims: list[str] | None = None) -> list[Probe]:
    """The gate-equivalent parameter slices of every prunable dimension (or of ``dims``)."""
    names = dims if dims is not None else [d.name for d in space.prunable_dims()]
    found: dict[str, dict[str, list[Probe]]] = {n: {} for n in names}
    for t in space.tensors.values():
        for axis, segs in t.axes.items():
            role = t.roles.get(axis, "out")
            for k, (start, seg) in enumerate(_seg_starts(space, segs)):
                for d in seg.dims:
                    if d in found:
                        key = f"{role}:{k}" if role == "out" else role
                        found[d].setdefault(key, []).append(Probe(d, t.name, axis, start, seg))
    return [p for n in names for p in _choose(space.dims[n].kind, found[n])]


def _choose(kind: str, by_role: dict[str, list[Probe]]) -> list[Probe]:
    outs = [p for k, v in by_role.items() if k.startswith("out:") for p in v]
    if kind in ("channel", "linear", "input"):
        return by_role.get("affine") or outs
    if kind in ("mlp", "heads"):
        return by_role.get("in") or outs
    if kind == "qk":
        return by_role.get("out:0") or outs  # the query segment of a fused q, k, v projection
    if kind == "v":
        return outs
    if kind == "embed":
        return outs + by_role.get("param", [])
    return outs


def bound_slices(space: PruningSpace, dims: list[str]) -> list[Probe]:
    """Every tensor slice bound to each of ``dims`` (all roles: weights, biases, norm scales, buffers)."""
    wanted = set(dims)
    out = []
    for t in space.tensors.values():
        for axis, segs in t.axes.items():
            for start, seg in _seg_starts(space, segs):
                out += [Probe(d, t.name, axis, start, seg) for d in seg.dims if d in wanted]
    return out


def per_element(vec: torch.Tensor, p: Probe, space: PruningSpace) -> torch.Tensor:
    """Sum a vector along ``p.axis`` over one segment's positions into the elements of dimension ``p.dim``."""
    sizes = [space.dims[d].size for d in p.seg.dims]
    width = int(np.prod(sizes)) * p.seg.inner
    block = vec[p.start:p.start + width].reshape(*sizes, p.seg.inner)
    k = p.seg.dims.index(p.dim)
    return block.sum(dim=[a for a in range(block.dim()) if a != k])
