"""What the channel analysis knows about each value flowing through the traced graph."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RawSeg:
    """A run of positions along an axis: the row-major product of ``spaces``, each element ``inner`` wide.

    Like :class:`mdprune.space.space.Seg`, but naming union-find space ids instead of dimension names.
    """

    spaces: tuple[int, ...]
    inner: int = 1

    def widen(self, factor: int) -> RawSeg:
        return RawSeg(self.spaces, self.inner * factor)


@dataclass(frozen=True)
class Chan:
    """A tensor whose axis ``axis`` carries channels made of ``segs``."""

    axis: int
    segs: tuple[RawSeg, ...]

    def moved(self, axis: int) -> Chan:
        return Chan(axis, self.segs)

    def widened(self, factor: int) -> Chan:
        return Chan(self.axis, tuple(s.widen(factor) for s in self.segs))


@dataclass(frozen=True)
class ParamRef:
    """A (view of a) parameter or buffer: value axis i is tensor axis ``axes[i]`` (None: an added axis)."""

    tensor: str
    axes: tuple[int | None, ...]


@dataclass(frozen=True)
class Several:
    """A tuple-valued node (e.g. ``nn.MultiheadAttention`` returns output and weights)."""

    items: tuple[object, ...]
