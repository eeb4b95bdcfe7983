"""Read the figures of a run result (result.json) tolerantly: missing, None and non-finite values become None."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def number(value: Any) -> float | None:
    """``value`` as a finite float, or None if it is missing, not numeric or NaN/inf."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def pair(value: Any) -> tuple[float | None, float | None]:
    """A ``[dense, pruned]`` pair (params, MACs) as two numbers, None where missing."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return number(value[0]), number(value[1])
    return None, None


def removed_block_names(result: dict[str, Any]) -> list[str]:
    """Names of the removed residual blocks, from ``removed_blocks`` or else from ``blocks``."""
    removed = result.get("removed_blocks")
    if removed:
        return [str(name) for name in removed]
    return [name for name, kept in (result.get("blocks") or {}).items() if not kept]


@dataclass(frozen=True)
class WidthRow:
    """One prunable dimension: how many of its ``size`` units the plan kept, and whether its block was removed."""

    name: str
    kept: int
    size: int
    kind: str
    block: str | None
    removed: bool

    @property
    def kept_fraction(self) -> float:
        """Fraction of the original width kept (0 when the whole block was removed)."""
        if self.removed or self.size <= 0:
            return 0.0
        return self.kept / self.size


def width_rows(result: dict[str, Any]) -> list[WidthRow]:
    """The ``widths`` entries in network order; dimensions inside removed blocks are flagged as removed."""
    removed = set(removed_block_names(result))
    rows = []
    for name, entry in (result.get("widths") or {}).items():
        entry = list(entry) + [None] * (4 - len(entry))
        kept, size, kind, block = entry[:4]
        size = int(number(size) or 0)
        kept_value = number(kept)
        kept = size if kept_value is None else int(kept_value)
        in_removed_block = block is not None and block in removed
        rows.append(WidthRow(str(name), kept, size, str(kind or "other"), block, in_removed_block))
    return rows


def format_ms(value: Any) -> str:
    """Latency in milliseconds, three decimals, or "n/a"."""
    v = number(value)
    return "n/a" if v is None else f"{v:.3f} ms"


def format_percent(value: Any, digits: int = 2) -> str:
    """A fraction in [0, 1] as a percentage, or "n/a"."""
    v = number(value)
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"


def format_count(value: Any) -> str:
    """A parameter or MAC count in human units (K, M, G), or "n/a"."""
    v = number(value)
    if v is None:
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f} {unit}"
    return f"{v:.0f}"
