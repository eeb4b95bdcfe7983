"""Masked stand-ins for norms without centring (RMSNorm, timm's SimpleNorm): the statistic over kept features only.

The masked model keeps the dense shapes; a norm over pruned features must still compute what the slim model's
smaller norm computes, so its statistic runs over the kept features (``set_keep``) and pruned ones come out as
zero. LayerNorm's stand-in lives with the masked model (``mdprune.apply.mask``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


class KeepMask(nn.Module):
    """A masked stand-in's mask over the features it restricts itself to (``set_keep``; all kept at first)."""

    def __init__(self, width: int, device: torch.device | None = None):
        super().__init__()
        self.register_buffer("keep", torch.ones(width, device=device))

    def set_keep(self, keep: torch.Tensor) -> None:
        self.keep.copy_(keep.to(self.keep))


class MaskedRMSNorm(KeepMask):
    """``x * rsqrt(statistic + eps) * weight`` over the kept features of ``axis`` (-1: last, 1: channels first).

    ``statistic`` is ``"rms"`` (the mean of squares: ``nn.RMSNorm``, timm's ``RmsNorm``/``RmsNorm2d``) or
    ``"var"`` (the unbiased variance, the output not centred: timm's ``SimpleNorm``/``SimpleNorm2d``). The weight
    keeps the norm's tensor name, so the masked model loads the dense state dict.
    """

    def __init__(self, norm: nn.Module, axis: int = -1, statistic: Literal["rms", "var"] = "rms"):
        shape = tuple(norm.normalized_shape)
        if len(shape) != 1:
            raise ValueError(f"{type(norm).__name__} normalises over {len(shape)} axes; only 1 is supported")
        weight = getattr(norm, "weight", None)
        super().__init__(shape[0], weight.device if weight is not None else None)
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad) \
            if weight is not None else None
        self.eps: float | None = norm.eps
        self.axis, self.statistic = axis, statistic

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return masked_rms_norm(x, self.keep, self.weight, self.eps, self.axis, self.statistic)

    def extra_repr(self) -> str:
        return f"{self.keep.numel()}, axis={self.axis}, statistic={self.statistic}, eps={self.eps}"


def masked_rms_norm(x: torch.Tensor, keep: torch.Tensor, weight: torch.Tensor | None, eps: float | None,
                    axis: int = -1, statistic: str = "rms") -> torch.Tensor:
    """An RMS norm (or, with ``statistic="var"``, a norm by the unbiased variance, not centred) along ``axis``
    over the features ``keep`` marks; the others come out as zero. ``eps=None``: the dtype's epsilon (as
    ``torch.nn.functional.rms_norm``)."""
    def view(t: torch.Tensor) -> torch.Tensor:  # along ``axis`` of x
        return t if axis % x.dim() == x.dim() - 1 else t.view(-1, *([1] * (x.dim() - 1 - axis % x.dim())))

    m = view(keep.to(x.dtype))
    n = m.sum()
    if statistic == "rms":
        stat = (x * x * m).sum(axis, keepdim=True) / n
    else:
        mean = (x * m).sum(axis, keepdim=True) / n
        stat = ((x - mean) ** 2 * m).sum(axis, keepdim=True) / (n - 1).clamp(min=1)
    y = x * torch.rsqrt(stat + (eps if eps is not None else torch.finfo(x.dtype).eps))
    if weight is not None:
        y = y * view(weight)
    return y * m
