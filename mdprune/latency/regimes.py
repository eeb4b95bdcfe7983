"""Attention's two kernel regimes: on the diagonal (q/k width == v width) and off it.

PyTorch's fused attention picks its fastest kernel (FlashAttention) only when queries, keys and values share
one head width; anywhere off that diagonal it falls back to a slower kernel. Latency is then a surface with a
jump along ``qk == v``, which multilinear interpolation across the diagonal smooths away: a plan with q/k
width != v width (what mdprune's separate dimensions allow) would be predicted as fast as its diagonal
neighbours. So, where enabled (:attr:`mdprune.latency.LatencySettings.attention_regimes`), attention ops keep
two surfaces:

- the ordinary table entries: every grid point measured as the dispatcher runs it (on the diagonal, the fast
  kernel);
- the *off-diagonal* surface: the same product grid, with its diagonal points measured again with the fast
  kernel excluded (stored under :func:`regime_signature`), i.e. what the kernel used off the diagonal costs.

A prediction at ``qk == v`` interpolates the diagonal entries over (heads, width); any other point
interpolates the off-diagonal surface (:func:`attention_ms`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

OFFDIAG = "offdiag"
_SEP = "#"


def regime_signature(sig: str, regime: str | None) -> str:
    """The table key of an op signature measured in ``regime`` (the signature itself for the ordinary one)."""
    return sig if regime is None else f"{sig}{_SEP}{regime}"


@contextlib.contextmanager
def without_flash() -> Iterator[None]:
    """Scaled-dot-product attention with the FlashAttention kernels excluded (CUDA and CPU), restored after."""
    cuda = torch.backends.cuda
    old = cuda.flash_sdp_enabled()
    cuda.enable_flash_sdp(False)
    try:
        yield
    finally:
        cuda.enable_flash_sdp(old)


def diagonal_points(axes: list[np.ndarray]) -> list[tuple[int, int, int]]:
    """The (heads, qk, v) points of an attention grid on its diagonal: ``qk == v`` widths both axes hold."""
    common = sorted(set(int(w) for w in axes[1]) & set(int(w) for w in axes[2]))
    return [(int(h), w, w) for h in axes[0] for w in common]


def split_values(axes: list[np.ndarray], values: np.ndarray, offdiag: dict[tuple[int, int, int], float]
                 ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray] | None:
    """From an attention grid's ordinary ``values`` (heads x qk x v) and its off-diagonal measurements at the
    diagonal points: (off-diagonal surface on the full grid, diagonal axes [heads, width], diagonal values).
    None when the grid has no diagonal point or an off-diagonal measurement is missing."""
    common = sorted(set(int(w) for w in axes[1]) & set(int(w) for w in axes[2]))
    if not common:
        return None
    off = np.array(values, dtype=np.float64, copy=True)
    diag = np.zeros((len(axes[0]), len(common)))
    qi = {int(w): i for i, w in enumerate(axes[1])}
    vi = {int(w): i for i, w in enumerate(axes[2])}
    for h, hw in enumerate(axes[0]):
        for j, w in enumerate(common):
            m = offdiag.get((int(hw), w, w))
            if m is None:
                return None
            diag[h, j] = values[h, qi[w], vi[w]]
            off[h, qi[w], vi[w]] = m
    return off, [np.asarray(axes[0]), np.asarray(common)], diag


def attention_ms(axes: list[np.ndarray], off: np.ndarray, diag_axes: list[np.ndarray], diag: np.ndarray,
                 query: list[np.ndarray]) -> np.ndarray:
    """Latency at (broadcastable) ``query`` = [heads, qk, v]: the diagonal surface where ``qk == v`` (and the
    width lies within the diagonal's range), the off-diagonal one elsewhere."""
    from .model import interpolate

    h, q, v = np.broadcast_arrays(*[np.asarray(x, dtype=np.float64) for x in query])
    away = interpolate(axes, off, [h, q, v])
    on = interpolate(diag_axes, diag, [h, q])
    lo, hi = float(diag_axes[1][0]), float(diag_axes[1][-1])
    return np.where((q == v) & (q >= lo) & (q <= hi), on, away)
