"""Kept positions along tensor axes, from a plan's kept indices and an axis's segments."""

from __future__ import annotations

import torch

from ..space import Plan, PruningSpace, Seg


class Positions:
    """Computes which positions of each pruned tensor axis a plan keeps."""

    def __init__(self, space: PruningSpace, plan: Plan):
        self.dense = {n: d.size for n, d in space.dims.items()}
        self.kept = {n: torch.as_tensor(v, dtype=torch.long) for n, v in plan.kept(space).items()}

    def seg(self, seg: Seg) -> torch.Tensor:
        """Kept positions inside one segment, relative to its start (row-major over its dimensions)."""
        idx = torch.zeros(1, dtype=torch.long)
        for d in seg.dims:
            idx = (idx[:, None] * self.dense[d] + self.kept[d][None, :]).reshape(-1)
        if seg.inner == 1:
            return idx
        return (idx[:, None] * seg.inner + torch.arange(seg.inner)[None, :]).reshape(-1)

    def seg_width(self, seg: Seg) -> int:
        w = seg.inner
        for d in seg.dims:
            w *= self.dense[d]
        return w

    def axis(self, segs: tuple[Seg, ...]) -> torch.Tensor:
        """Kept positions of an axis made of ``segs``."""
        out, base = [], 0
        for s in segs:
            out.append(self.seg(s) + base)
            base += self.seg_width(s)
        return torch.cat(out)

    def axis_mask(self, segs: tuple[Seg, ...]) -> torch.Tensor:
        """Boolean mask over the dense axis: True where kept."""
        m = torch.zeros(sum(self.seg_width(s) for s in segs), dtype=torch.bool)
        m[self.axis(segs)] = True
        return m
